"""The matrix runner: expand techniques x architectures x tasks x seeds into cells and run them.

Every (technique, arch, task, seed) becomes two cells, the trained organism and its
random-init control. Organism jobs (train one organism, or nothing if the zoo has it) and
cell jobs share one queue, ordered longest first by a cost model (`CostModel`: family x task
training times and technique x family x task cell times, refined from the times the store
recorded). A cell is released the moment its organism lands in the zoo (a control cell
too: it needs the organism's metadata for the gate); the cells of an organism that fails the
gate are recorded `n/a` by the driver without a worker. So no organism is trained twice,
every worker stays busy while long organisms train, and results appear from the start.

Jobs go through an executor (`local`: a process pool with one torch thread per worker, the
fastest layout for tiny models on a few cores; `ray`: one Ray task per job, on this machine
or a cluster, see archbench/ray_executor.py) with a small interface: `capacity` (how many
jobs to keep in flight), `submit(tag, fn, args)`, `next_done(timeout) -> (tag, result)`,
`cancel()` and `close()`. Dependencies and priorities live in the driver alone, so every
executor gets them. Each cell is isolated: an exception becomes an `error` row with its
traceback and the sweep goes on. The driver alone writes the store, one transaction per
finished cell, so a killed run resumes where it stopped; finished cells are skipped on
rerun (as in HELM's runner).
"""

from __future__ import annotations

import collections
import ctypes
import heapq
import itertools
import logging
import multiprocessing
import os
import resource
import signal
import sqlite3
import statistics
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from archbench import registry, zoo
from archbench.store import RunSpec, Store, cell_identity

# seeds per run profile (`archbench run --profile`); `--seeds` overrides
PROFILES: dict[str, int] = {"quick": 3, "default": 5, "full": 10}
QUICK_SEEDS = PROFILES["quick"]
DEFAULT_SEEDS = PROFILES["default"]


def expand(archs: Iterable[str], techniques: Iterable[str], tasks: Iterable[str],
           seeds: Iterable[int]) -> list[RunSpec]:
    """Every cell of the matrix, trained and control, in a stable order."""
    return [RunSpec(t, a, k, s, control)
            for a, k, s, t, control in itertools.product(archs, tasks, seeds, techniques, (False, True))]


def _init_worker() -> None:
    """One thread per worker for torch and for numpy/scipy's BLAS (reservoirpy's ridge
    solves would otherwise start a BLAS thread per core in every worker)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def _init_pool_worker(driver_pid: int) -> None:
    """`_init_worker`, and on Linux die with the driver even when it is SIGKILLed (an
    orphaned worker would otherwise go on training organisms nobody will read)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if os.getppid() != driver_pid:  # the driver died before the line above took effect
            os._exit(1)
    _init_worker()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _warning_lines(caught: list) -> list[str]:
    """Distinct warnings a job raised, one line each, for the driver to show above the bar."""
    return list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).strip().splitlines()[0]}"
                              for w in caught if str(w.message).strip()))


def train_organism(arch: str, task_name: str, seed: int, gate: float) -> dict[str, Any]:
    """An organism job (in a worker): train or load one organism; return its metadata and gate."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        try:
            task = registry.task(task_name)
            _, meta = zoo.organism(arch, task, seed)
            out = {"ok": True, "meta": meta, "gate": zoo.gate_reason(meta, gate)}
        except Exception:
            out = {"ok": False, "error": traceback.format_exc()}
    return out | {"wall_s": time.perf_counter() - start, "warnings": _warning_lines(caught)}


def _gated_row(meta: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"organism_accuracy": meta["accuracy"], "status": "n/a", "reason": f"gate failed: {reason}"}


def run_cell(spec: RunSpec, gate: float) -> dict[str, Any]:
    """A cell job (in a worker): one technique on one organism or control; never raises."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        try:
            task = registry.task(spec.task).for_seed(spec.seed)
            # a control cell needs the organism's metadata (its gate) but not its weights
            meta = zoo.cached_meta(spec.arch, task, spec.seed) if spec.control else None
            trained = None
            if meta is None:
                trained, meta = zoo.organism(spec.arch, task, spec.seed)
            reason = zoo.gate_reason(meta, gate)
            if reason:
                row = _gated_row(meta, reason)
            else:
                row = {"organism_accuracy": meta["accuracy"]}
                adapter = zoo.control(spec.arch, task, spec.seed) if spec.control else trained
                result = registry.technique(spec.technique)()(adapter, task, spec.seed)
                if result.applicable:
                    row |= {"status": "ok", "score": result.score, "per_example": result.per_example,
                            "metrics": result.metrics, "details": result.details}
                else:
                    row |= {"status": "n/a", "reason": result.reason}
        except Exception:
            row = {"status": "error", "error": traceback.format_exc()}
    return row | {"wall_s": time.perf_counter() - start, "peak_mem_mb": _peak_mb(),
                  "warnings": _warning_lines(caught)}


# ---------------------------------------------------------------------------------------
# executors: capacity, submit(tag, fn, args), next_done(timeout) -> (tag, result) | None,
# cancel(), close(); `map_calls` runs a plain list of calls through any of them


def map_calls(executor, fn: Callable, calls: Iterable[tuple], on_done: Callable[[tuple, Any], None]) -> None:
    """Run `fn(*args)` for every call, at most `executor.capacity` at a time, in order of
    submission; hand each result to `on_done(args, result)` in this process as it finishes."""
    pending = list(calls)
    todo = iter(enumerate(pending))
    in_flight = 0
    try:
        while True:
            for tag, args in itertools.islice(todo, max(0, executor.capacity - in_flight)):
                executor.submit(tag, fn, args)
                in_flight += 1
            if not in_flight:
                return
            got = executor.next_done(None)
            if got is not None:
                in_flight -= 1
                on_done(pending[got[0]], got[1])
    except BaseException:
        executor.cancel()
        raise


class LocalExecutor:
    """A process pool (or the calling process when workers == 1), one torch thread each.

    The pool is started on the first submitted job and kept for the rest of the run, so
    workers import torch and transformers once per run; `close` ends it.
    """

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Any, Any] = {}  # Future -> tag
        self._inline: collections.deque = collections.deque()  # (tag, fn, args) with 1 worker
        self._initialised = False

    @property
    def capacity(self) -> int:
        return self.workers

    def submit(self, tag: Any, fn: Callable, args: tuple) -> None:
        if self.workers == 1:  # in-process: run when the driver asks for the next result
            if not self._initialised:
                _init_worker()
                self._initialised = True
            self._inline.append((tag, fn, args))
            return
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx,
                                             initializer=_init_pool_worker, initargs=(os.getpid(),))
        self._futures[self._pool.submit(fn, *args)] = tag

    def next_done(self, timeout: float | None = None) -> tuple[Any, Any] | None:
        """The next finished job as (tag, result); None if none finished within `timeout` s."""
        if self._inline:
            tag, fn, args = self._inline.popleft()
            return tag, fn(*args)
        if not self._futures:
            raise RuntimeError("next_done() with no job in flight")
        done, _ = wait_futures(self._futures, timeout, return_when=FIRST_COMPLETED)
        if not done:
            return None
        future = next(iter(done))
        return self._futures.pop(future), future.result()

    def cancel(self) -> None:
        """Interrupted (Ctrl-C, SIGTERM) or the driver failed: stop the workers now rather
        than wait for their running jobs. concurrent.futures has no public way to kill running
        workers, hence the private process table."""
        self._inline.clear()
        self._futures.clear()
        if self._pool is not None:
            for proc in list((self._pool._processes or {}).values()):
                proc.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable, calls: list[tuple], on_done: Callable[[tuple, Any], None]) -> None:
        map_calls(self, fn, calls, on_done)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _ray_executor(workers: int | None, **options: Any):
    from archbench.ray_executor import RayExecutor  # imports ray only when asked for

    return RayExecutor(workers, **options)


# name -> factory(workers, **options) of an executor (see the section comment above)
EXECUTORS: dict[str, Callable[..., Any]] = {"local": LocalExecutor, "ray": _ray_executor}


# ---------------------------------------------------------------------------------------
# the cost model: seconds of one job on one worker

# Priors from the published quick matrix (results/archbench.db.gz, one core per worker).
# Organism training seconds per family x task:
ORGANISM_SECONDS: dict[tuple[str, str], float] = {
    ("diffusion", "count"): 33.3, ("diffusion", "facts"): 55.9, ("diffusion", "modadd"): 54.8,
    ("diffusion", "parity"): 172.3, ("diffusion", "recall"): 99.3,
    ("kan", "count"): 0.5, ("kan", "facts"): 1.0, ("kan", "modadd"): 6.6, ("kan", "parity"): 0.7,
    ("kan", "recall"): 10.2,
    ("looped", "count"): 16.2, ("looped", "facts"): 5.5, ("looped", "modadd"): 35.6,
    ("looped", "parity"): 42.5, ("looped", "recall"): 40.7,
    ("mamba", "count"): 21.5, ("mamba", "facts"): 8.4, ("mamba", "modadd"): 23.5,
    ("mamba", "parity"): 23.3, ("mamba", "recall"): 207.2,
    ("mamba2", "count"): 13.9, ("mamba2", "facts"): 3.1, ("mamba2", "modadd"): 31.3,
    ("mamba2", "parity"): 5.3, ("mamba2", "recall"): 63.1,
    ("moe", "count"): 8.8, ("moe", "facts"): 2.8, ("moe", "modadd"): 66.0, ("moe", "parity"): 36.2,
    ("moe", "recall"): 16.0,
    ("nvar", "count"): 7.4, ("nvar", "facts"): 24.8, ("nvar", "modadd"): 3.0, ("nvar", "parity"): 1.1,
    ("nvar", "recall"): 0.4,
    ("reservoir", "count"): 1.2, ("reservoir", "facts"): 0.7, ("reservoir", "modadd"): 0.5,
    ("reservoir", "parity"): 1.7, ("reservoir", "recall"): 1.1,
    ("rwkv", "count"): 4.1, ("rwkv", "facts"): 1.3, ("rwkv", "modadd"): 13.8, ("rwkv", "parity"): 9.5,
    ("rwkv", "recall"): 52.9,
    ("spiking", "count"): 1.3, ("spiking", "facts"): 2.0, ("spiking", "modadd"): 5.1,
    ("spiking", "parity"): 13.5, ("spiking", "recall"): 13.6,
    ("transformer", "count"): 3.3, ("transformer", "facts"): 0.9, ("transformer", "modadd"): 3.5,
    ("transformer", "parity"): 16.5, ("transformer", "recall"): 4.8,
}
DEFAULT_ORGANISM_SECONDS = 20.0
# A cell's seconds ~ technique seconds x family factor x task factor (a log-linear fit to the
# ok cells of the same store; unknown names get 1 s, 1 and 1):
TECHNIQUE_SECONDS = {"ablation": 0.84, "attribution": 0.33, "logit_lens": 0.032, "patching": 0.36,
                     "probe": 0.49, "sae": 1.11, "steering": 0.18, "tuned_lens": 0.21, "cka": 0.058}
FAMILY_FACTOR = {"diffusion": 0.84, "kan": 0.31, "looped": 1.72, "mamba": 5.37, "mamba2": 2.83, "moe": 0.93,
                 "reservoir": 1.41, "rwkv": 0.8, "spiking": 0.27, "transformer": 0.51}
TASK_FACTOR = {"count": 1.61, "facts": 0.68, "modadd": 0.53, "parity": 1.41, "recall": 1.23}


class CostModel:
    """Estimated seconds of organism and cell jobs on one worker.

    A (family, task) training time or (technique, family, task) cell time that the store has
    recorded (organisms' `seconds`, ok cells' `wall_s`; medians) is used as it is; any other
    comes from the priors above, scaled by how much faster or slower this machine has been
    than the priors on the jobs the store knows.
    """

    def __init__(self, store: Store | None = None):
        self.organisms: dict[tuple[str, str], float] = {}
        self.cells: dict[tuple[str, str, str], float] = {}
        if store is not None:
            try:
                rows = store.db.execute("SELECT arch, task, seconds FROM organisms WHERE seconds > 0").fetchall()
                self.organisms = self._medians(rows)
                rows = store.db.execute("SELECT technique, arch, task, wall_s FROM cells "
                                        "WHERE status = 'ok' AND wall_s > 0").fetchall()
                self.cells = self._medians(rows)
            except sqlite3.DatabaseError:
                pass
        self.organism_speed = self._speed({k: (v, self._organism_prior(*k)) for k, v in self.organisms.items()})
        self.cell_speed = self._speed({k: (v, self._cell_prior(*k)) for k, v in self.cells.items()})

    @staticmethod
    def _medians(rows) -> dict:
        groups: dict[tuple, list[float]] = collections.defaultdict(list)
        for *key, seconds in rows:
            groups[tuple(key)].append(seconds)
        return {k: statistics.median(v) for k, v in groups.items()}

    @staticmethod
    def _speed(pairs: dict) -> float:
        ratios = [seen / prior for seen, prior in pairs.values() if prior > 0]
        return min(max(statistics.median(ratios), 0.05), 20.0) if ratios else 1.0

    @staticmethod
    def _organism_prior(arch: str, task: str) -> float:
        return ORGANISM_SECONDS.get((arch, task), DEFAULT_ORGANISM_SECONDS)

    @staticmethod
    def _cell_prior(technique: str, arch: str, task: str) -> float:
        return TECHNIQUE_SECONDS.get(technique, 1.0) * FAMILY_FACTOR.get(arch, 1.0) * TASK_FACTOR.get(task, 1.0)

    def organism(self, arch: str, task: str) -> float:
        seen = self.organisms.get((arch, task))
        return seen if seen is not None else self._organism_prior(arch, task) * self.organism_speed

    def cell(self, technique: str, arch: str, task: str) -> float:
        seen = self.cells.get((technique, arch, task))
        return seen if seen is not None else self._cell_prior(technique, arch, task) * self.cell_speed


# ---------------------------------------------------------------------------------------
# the scheduler: one queue of organism and cell jobs, longest first, cells behind organisms

Organism = tuple[str, str, int]  # (arch, task, seed)


@dataclass(frozen=True)
class Job:
    kind: str  # "organism" or "cell"
    organism: Organism
    cost: float  # estimated seconds on one worker
    spec: RunSpec | None = None

    def call(self, gate: float) -> tuple[Callable, tuple]:
        if self.kind == "organism":
            return train_organism, (*self.organism, gate)
        return run_cell, (self.spec, gate)


class Scheduler:
    """Ready jobs longest first (organisms before cells at equal cost, then matrix order);
    the cells of an organism still to be trained wait until `release` is called for it."""

    def __init__(self, costs: CostModel):
        self.costs = costs
        self._ready: list[tuple[float, int, int, Job]] = []
        self._order = itertools.count()
        self.waiting: dict[Organism, list[Job]] = {}

    def add_organism(self, organism: Organism, cells: list[RunSpec]) -> None:
        """An organism to train, and its cells, which wait for it."""
        self._push(Job("organism", organism, self.costs.organism(organism[0], organism[1])))
        self.waiting[organism] = [self.cell_job(s) for s in cells]

    def cell_job(self, spec: RunSpec) -> Job:
        return Job("cell", (spec.arch, spec.task, spec.seed), self.costs.cell(spec.technique, spec.arch, spec.task),
                   spec)

    def add_cells(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self._push(job)

    def release(self, organism: Organism) -> list[Job]:
        """The organism has landed (or failed): its waiting cells, for the caller to queue or record."""
        return self.waiting.pop(organism, [])

    def _push(self, job: Job) -> None:
        heapq.heappush(self._ready, (-job.cost, job.kind != "organism", next(self._order), job))

    def pop(self) -> Job | None:
        return heapq.heappop(self._ready)[-1] if self._ready else None

    def __len__(self) -> int:
        return len(self._ready)

    def queued_cost(self) -> float:
        return sum(job.cost for *_, job in self._ready) + sum(j.cost for jobs in self.waiting.values() for j in jobs)


# ---------------------------------------------------------------------------------------
# progress: organisms and cells, elapsed and ETA, refreshed every second


class Progress:
    """One status line: organisms trained, cells recorded, jobs running, elapsed time and an
    ETA from the cost model (rescaled by how fast this run's finished jobs went, divided by
    the number of workers). Warnings from the driver, its loggers and the workers are
    written above the line instead of through it. Disabled, it prints nothing."""

    def __init__(self, enabled: bool, organisms: int, cells: int, capacity: int, work: float):
        self.enabled = enabled
        self.organisms_total, self.cells_total = organisms, cells
        self.organisms_done = self.cells_done = self.errors = 0
        self.capacity = max(1, capacity)
        self.remaining_est = work  # estimated seconds of jobs not yet finished (incl. running)
        self.finished_est = self.finished_actual = 0.0
        self.running: dict[Any, tuple[float, float]] = {}  # tag -> (start, estimated seconds)
        self.start = time.perf_counter()
        self._lock = threading.RLock()
        self._seen_warnings: set[str] = set()
        self._bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._restore: list[Callable[[], None]] = []
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=1000, dynamic_ncols=True, bar_format="{desc}{percentage:3.0f}%|{bar}| {unit}")
            self._route_warnings()
            self._ticker = threading.Thread(target=self._tick, name="archbench-progress", daemon=True)
            self._ticker.start()
            self.refresh()

    # events (called by the driver)
    def started(self, tag: Any, job: Job) -> None:
        with self._lock:
            self.running[tag] = (time.perf_counter(), job.cost)

    def finished(self, tag: Any, job: Job, seconds: float) -> None:
        with self._lock:
            self.running.pop(tag, None)
            self.remaining_est -= job.cost
            self.finished_est += job.cost
            self.finished_actual += seconds
            if job.kind == "organism":
                self.organisms_done += 1
        self.refresh()

    def recorded(self, status: str, without_worker: Job | None = None) -> None:
        """A cell was written to the store: by a finished job, or by the driver without a
        worker (`without_worker`: gate failed or organism failed), whose cost is then dropped."""
        with self._lock:
            self.cells_done += 1
            self.errors += status == "error"
            if without_worker is not None:
                self.remaining_est -= without_worker.cost

    def warn(self, message: str) -> None:
        """Show a warning once per run, above the status line."""
        with self._lock:
            if message in self._seen_warnings:
                return
            self._seen_warnings.add(message)
        self._write(f"warning: {message}")

    # reading
    def speed(self) -> float:
        """Actual over estimated seconds of this run's finished jobs (1 before any finished)."""
        with self._lock:
            if self.finished_est <= 0 or self.finished_actual <= 0:
                return 1.0
            return min(max(self.finished_actual / self.finished_est, 0.05), 20.0)

    def eta(self) -> float:
        """Estimated seconds until the run ends."""
        now = time.perf_counter()
        with self._lock:
            speed = self.speed()
            running_est = sum(est for _, est in self.running.values())
            left_running = [max(est * speed - (now - t0), 0.0) for t0, est in self.running.values()]
            queued = max(self.remaining_est - running_est, 0.0) * speed
            return max((queued + sum(left_running)) / self.capacity, max(left_running, default=0.0))

    def line(self) -> tuple[str, str, float]:
        """(counts, times, fraction done) as shown."""
        from tqdm import tqdm

        now = time.perf_counter()
        with self._lock:
            elapsed = now - self.start
            eta = self.eta()
            done = self.finished_actual + sum(now - t0 for t0, _ in self.running.values())
            fraction = done / (done + eta * self.capacity) if done + eta > 0 else 0.0
            counts = (f"organisms {self.organisms_done}/{self.organisms_total}, "
                      f"cells {self.cells_done}/{self.cells_total}"
                      + (f" ({self.errors} errors)" if self.errors else "") + " ")
            times = (f"{len(self.running)} running, elapsed {tqdm.format_interval(elapsed)}, "
                     f"ETA {tqdm.format_interval(eta)}")
        return counts, times, min(max(fraction, 0.0), 1.0)

    # output
    def refresh(self) -> None:
        if self._bar is None:
            return
        counts, times, fraction = self.line()
        with self._lock:
            self._bar.n = int(fraction * 1000)
            self._bar.set_description_str(counts, refresh=False)
            self._bar.unit = times  # the bar format shows {unit} after the bar
            self._bar.refresh()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.refresh()
            except Exception:  # never let the display kill the run
                return

    def _write(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            with self._lock:
                tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def _route_warnings(self) -> None:
        """Driver warnings and log records go through tqdm.write while the bar is shown."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            self.warn(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")

        warnings.showwarning = show
        self._restore.append(lambda: setattr(warnings, "showwarning", previous))
        redirect = logging_redirect_tqdm([logging.getLogger()])
        redirect.__enter__()
        self._restore.append(lambda: redirect.__exit__(None, None, None))

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self._bar is not None:
            self.refresh()
            self._bar.close()
            self._bar = None
        while self._restore:
            self._restore.pop()()


# ---------------------------------------------------------------------------------------
# the run


@dataclass
class RunSummary:
    total: int
    skipped: int
    ok: int = 0
    na: int = 0
    error: int = 0
    seconds: float = 0.0
    errors: list[str] | None = None
    organisms_trained: int = 0
    started: list[str] = field(default_factory=list)  # job labels in the order they were submitted


def _label(job: Job) -> str:
    return job.spec.label() if job.kind == "cell" else "organism {}/{}/seed{}".format(*job.organism)


def run_matrix(specs: list[RunSpec], results_dir, workers: int | None = None, gate: float = zoo.DEFAULT_GATE,
               executor: str | Any = "local", progress: bool = True) -> RunSummary:
    """Run every cell not already in the store; return counts. Errors are collected, not raised.

    `executor` is a name in EXECUTORS or an already built executor (e.g. a configured
    RayExecutor, or any object with the interface described at the top of this module).
    """
    start = time.perf_counter()
    cell_identity.cache_clear()  # configs, versions and formats are read afresh each run
    workers = workers or os.cpu_count() or 1
    with Store(results_dir) as store:
        done = store.done_keys()
        todo = [s for s in specs if s.key() not in done]
        summary = RunSummary(total=len(specs), skipped=len(specs) - len(todo), errors=[])
        if not todo:
            return summary
        sched = Scheduler(CostModel(store))

        by_organism: dict[Organism, list[RunSpec]] = collections.defaultdict(list)
        for s in todo:
            by_organism[(s.arch, s.task, s.seed)].append(s)
        cached = {o: zoo.cached_meta(o[0], registry.task(o[1]), o[2]) for o in by_organism}
        missing = [o for o in by_organism if cached[o] is None]
        gated: list[tuple[Job, dict]] = []  # cells the driver records without a worker
        for o, meta in cached.items():  # cached organisms need no worker (and no worker start-up)
            if meta is None:
                sched.add_organism(o, by_organism[o])
                continue
            reason = zoo.gate_reason(meta, gate)
            store.put_organism(meta, reason)
            jobs = [sched.cell_job(s) for s in by_organism[o]]
            if reason:
                gated += [(j, _gated_row(meta, reason)) for j in jobs]
            else:
                sched.add_cells(jobs)

        # organism and cell jobs that may need a worker (cells of an organism may yet be gated)
        n_jobs = len(sched) + sum(len(v) for v in sched.waiting.values())
        if isinstance(executor, str):
            pool = EXECUTORS[executor](max(1, min(workers, n_jobs)))
        else:
            pool = executor
        work = sched.queued_cost() + sum(j.cost for j, _ in gated)
        bar = Progress(progress, len(missing), len(todo), _capacity(pool) if n_jobs else 1, work)

        def record(job: Job, row: dict[str, Any], ran: bool) -> None:
            spec = job.spec
            store.put_cell(spec, row)
            key = {"ok": "ok", "n/a": "na", "error": "error"}[row["status"]]
            setattr(summary, key, getattr(summary, key) + 1)
            if row["status"] == "error":
                summary.errors.append(f"{spec.label()}: {row['error'].strip().splitlines()[-1]}")
            bar.recorded(row["status"], None if ran else job)

        def landed(job: Job, out: dict[str, Any]) -> None:
            cells = sched.release(job.organism)
            if not out["ok"]:
                last = out["error"].strip().splitlines()[-1]
                summary.errors.append(f"organism {'/'.join(map(str, job.organism))}: {last}")
                for cell in cells:  # recorded as errors (retried on rerun), never trained again here
                    record(cell, {"status": "error", "error": f"organism failed to train:\n{out['error']}"}, False)
                return
            summary.organisms_trained += 1
            store.put_organism(out["meta"], out["gate"])
            if out["gate"]:
                for cell in cells:
                    record(cell, _gated_row(out["meta"], out["gate"]), False)
            else:
                sched.add_cells(cells)

        in_flight: dict[int, Job] = {}
        tags = itertools.count()
        try:
            for job, row in gated:
                record(job, row | {"wall_s": 0.0}, False)
            capacity = _capacity(pool) if n_jobs else 1
            while True:
                while len(in_flight) < capacity and (job := sched.pop()) is not None:
                    tag = next(tags)
                    in_flight[tag] = job
                    summary.started.append(_label(job))
                    bar.started(tag, job)
                    fn, args = job.call(gate)
                    pool.submit(tag, fn, args)
                if not in_flight:
                    break
                got = pool.next_done(1.0)
                if got is None:
                    continue
                tag, out = got
                job = in_flight.pop(tag)
                for message in out.get("warnings") or []:
                    bar.warn(message)
                bar.finished(tag, job, out.get("wall_s") or 0.0)
                if job.kind == "organism":
                    landed(job, out)
                else:
                    record(job, out, True)
            assert not sched.waiting, "cells left waiting for organisms that never ran"
        except BaseException:
            getattr(pool, "cancel", lambda: None)()
            raise
        finally:
            getattr(pool, "close", lambda: None)()
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _capacity(pool) -> int:
    return max(1, int(getattr(pool, "capacity", getattr(pool, "workers", 1) or 1)))

"""The matrix runner: expand techniques x architectures x tasks x seeds into cells and run them.

Every (technique, arch, task, seed) becomes two cells, the trained organism and its
random-init control. Organism jobs (train one organism, or nothing if the zoo has it) and
cell jobs share one queue, the reference family's first, then longest first by a cost model (`CostModel`: family x task
training times and technique x family x task cell times, refined from the times the store
recorded). A cell is released the moment its organism lands in the zoo (a control cell
too: it needs the organism's metadata for the gate); the cells of an organism that fails the
gate are recorded `n/a` by the driver without a worker. So no organism is trained twice,
every worker stays busy while long organisms train, and results appear from the start.

Jobs go through an executor (`local`: a process pool with one torch thread per worker, the
fastest layout for tiny models on a few cores; `ray`: one Ray task per job, on this machine
or a cluster, see archbench/ray_executor.py; `slurm`: one Slurm job per job through submitit,
see archbench/slurm_executor.py) with a small interface: `capacity` (how many
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
import multiprocessing
import os
import resource
import signal
import sys
import time
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from archbench import integrity, registry, zoo
from archbench.costs import CostModel
from archbench.progress import Progress
from archbench.results_dir import run_lock
from archbench.verdict import Settings as VerdictSettings
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


def train_organism(arch: str, task_name: str, seed: int, gate: float, no_retrain: bool = False) -> dict[str, Any]:
    """An organism job (in a worker): train or load one organism; return its metadata and gate.

    With `no_retrain` a cached organism that fails its integrity checks is not rebuilt: the
    result carries `refused`, the one line saying which file and why."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        try:
            task = registry.task(task_name)
            _, meta = zoo.organism(arch, task, seed, no_retrain=no_retrain)
            out = {"ok": True, "meta": meta, "gate": zoo.gate_reason(meta, gate)}
        except zoo.CorruptOrganism as exc:  # raised only with no_retrain
            out = {"ok": False, "error": str(exc), "refused": str(exc)}
        except Exception:
            out = {"ok": False, "error": traceback.format_exc()}
    return out | {"wall_s": time.perf_counter() - start, "warnings": _warning_lines(caught)}


def _gated_row(meta: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"organism_accuracy": meta["accuracy"], "status": "n/a", "reason": f"gate failed: {reason}"}


def _scored_row(adapter, spec: RunSpec, task) -> dict[str, Any]:
    """The technique's row on one adapter: ok with a finite score, n/a with a reason, or an
    error when the model's activations or the technique's numbers are not finite."""
    problem = integrity.nonfinite_activations(adapter, task, spec.seed)
    if problem:
        return {"status": "error", "error": f"{spec.label()}: {problem}"}
    result = registry.technique(spec.technique)()(adapter, task, spec.seed)
    if not result.applicable:
        return {"status": "n/a", "reason": result.reason}
    problem = integrity.nonfinite_result(result)
    if problem:
        return {"status": "error", "error": f"{spec.label()}: {problem}"}
    return {"status": "ok", "score": float(result.score), "per_example": result.per_example,
            "metrics": result.metrics, "details": result.details}


def run_cell(spec: RunSpec, gate: float, no_retrain: bool = False) -> dict[str, Any]:
    """A cell job (in a worker): one technique on one organism or control; never raises.

    NaN and infinities never become scores: they make an `error` row (rerun next time).
    With `no_retrain` an organism that fails its integrity checks makes a row with
    `refused` (the one line saying which file and why), which the driver stops on."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        try:
            task = registry.task(spec.task).for_seed(spec.seed)
            # a control cell needs the organism's metadata (its gate) but not its weights
            meta = zoo.cached_meta(spec.arch, task, spec.seed, no_retrain) if spec.control else None
            trained = None
            if meta is None:
                trained, meta = zoo.organism(spec.arch, task, spec.seed, no_retrain=no_retrain)
            reason = zoo.gate_reason(meta, gate)
            if reason:
                row = _gated_row(meta, reason)
            else:
                adapter = zoo.control(spec.arch, task, spec.seed) if spec.control else trained
                row = {"organism_accuracy": meta["accuracy"]} | _scored_row(adapter, spec, task)
        except zoo.CorruptOrganism as exc:  # raised only with no_retrain
            row = {"status": "error", "error": str(exc), "refused": str(exc)}
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


def _slurm_executor(workers: int | None, **options: Any):
    from archbench.slurm_executor import SlurmExecutor  # imports submitit only when asked for

    return SlurmExecutor(workers, **options)


# name -> factory(workers, **options) of an executor (see the section comment above)
EXECUTORS: dict[str, Callable[..., Any]] = {"local": LocalExecutor, "ray": _ray_executor,
                                            "slurm": _slurm_executor}


# ---------------------------------------------------------------------------------------
# the scheduler: one queue of organism and cell jobs, longest first, cells behind organisms

Organism = tuple[str, str, int]  # (arch, task, seed)


@dataclass(frozen=True)
class Job:
    kind: str  # "organism" or "cell"
    organism: Organism
    cost: float  # estimated seconds on one worker
    spec: RunSpec | None = None

    def call(self, gate: float, no_retrain: bool = False) -> tuple[Callable, tuple]:
        if self.kind == "organism":
            return train_organism, (*self.organism, gate, no_retrain)
        return run_cell, (self.spec, gate, no_retrain)


class Scheduler:
    """Ready jobs of the reference family first, then longest first (organisms before cells at
    equal cost, then matrix order); the cells of an organism still to be trained wait until
    `release` is called for it. The reference goes first because every verdict divides by it:
    a run stopped part-way should still have the row the others are read against."""

    def __init__(self, costs: CostModel, reference: str | None = VerdictSettings.reference):
        self.costs = costs
        self.reference = reference
        self._ready: list[tuple[bool, float, bool, int, Job]] = []
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
        first = job.organism[0] != self.reference  # False sorts first
        heapq.heappush(self._ready, (first, -job.cost, job.kind != "organism", next(self._order), job))

    def pop(self) -> Job | None:
        return heapq.heappop(self._ready)[-1] if self._ready else None

    def __len__(self) -> int:
        return len(self._ready)

    def queued_cost(self) -> float:
        return sum(job.cost for *_, job in self._ready) + sum(j.cost for jobs in self.waiting.values() for j in jobs)


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


    def kept(self) -> str:
        """What this run added to the store and the zoo, in words (for an interrupted run)."""
        cells = self.ok + self.na + self.error
        errors = f" ({self.error} of them errors, retried on rerun)" if self.error else ""
        return (f"{cells} cell{'' if cells == 1 else 's'}{errors} and {self.organisms_trained} trained "
                f"organism{'' if self.organisms_trained == 1 else 's'}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during `run_matrix`; `summary` counts what the run kept."""

    def __init__(self, summary: RunSummary):
        super().__init__(summary.kept())
        self.summary = summary


def _label(job: Job) -> str:
    return job.spec.label() if job.kind == "cell" else "organism {}/{}/seed{}".format(*job.organism)


def run_matrix(specs: list[RunSpec], results_dir, workers: int | None = None, gate: float = zoo.DEFAULT_GATE,
               executor: str | Any = "local", progress: bool = True, no_retrain: bool = False,
               wait: bool = False) -> RunSummary:
    """Run every cell not already in the store; return counts. Errors are collected, not raised.

    With `no_retrain` a cached organism that fails its integrity checks raises
    `zoo.CorruptOrganism` (finished cells are kept) instead of being rebuilt.

    `executor` is a name in EXECUTORS or an already built executor (e.g. a configured
    RayExecutor, or any object with the interface described at the top of this module).
    The results directory's run lock is held throughout: another run on it raises
    `results_dir.Busy` (or, with `wait`, is waited for). Ctrl-C or SIGTERM raises
    `Interrupted`, whose summary counts the cells and organisms kept.
    """
    start = time.perf_counter()
    cell_identity.cache_clear()  # configs, versions and formats are read afresh each run
    workers = workers or os.cpu_count() or 1
    summary = RunSummary(total=len(specs), skipped=0, errors=[])
    try:
        with run_lock(results_dir, wait), Store(results_dir) as store:  # the schema is checked here, first
            _run(specs, store, summary, workers, gate, executor, progress, no_retrain)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(summary) from None
    summary.seconds = time.perf_counter() - start
    return summary


def _run(specs: list[RunSpec], store: Store, summary: RunSummary, workers: int, gate: float,
         executor: str | Any, progress: bool, no_retrain: bool = False) -> None:
    """`run_matrix`'s body: queue and run the cells not in `store`, counting into `summary`."""
    done = store.done_keys()
    todo = [s for s in specs if s.key() not in done]
    summary.skipped = len(specs) - len(todo)
    if not todo:
        return
    sched = Scheduler(CostModel(store))

    by_organism: dict[Organism, list[RunSpec]] = collections.defaultdict(list)
    for s in todo:
        by_organism[(s.arch, s.task, s.seed)].append(s)
    cached = {o: zoo.cached_meta(o[0], registry.task(o[1]), o[2], no_retrain) for o in by_organism}
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
                fn, args = job.call(gate, no_retrain)
                pool.submit(tag, fn, args)
            if not in_flight:
                break
            got = pool.next_done(1.0)
            if got is None:
                continue
            tag, out = got
            job = in_flight.pop(tag)
            if out.get("refused"):
                raise zoo.CorruptOrganism(out["refused"])
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


def _capacity(pool) -> int:
    return max(1, int(getattr(pool, "capacity", getattr(pool, "workers", 1) or 1)))

"""The matrix runner: expand techniques x architectures x tasks x seeds into cells and run them.

Every (technique, arch, task, seed) becomes two cells, the trained organism and its
random-init control. The run has two phases so that no organism is trained twice: first
each needed organism is trained (or read from the zoo) and gated, then every cell runs.
Both phases go through an executor (`local`: a process pool with one torch thread per
worker, the fastest layout for tiny models on a few cores; `ray`: one Ray task per call,
on this machine or a cluster, see archbench/ray_executor.py). Each cell is isolated: an
exception becomes an `error` row with its traceback and the sweep goes on. The driver alone
writes the store, one transaction per finished cell, so a killed run resumes where it
stopped; finished cells are skipped on rerun (as in HELM's runner).
"""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import resource
import signal
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from archbench import registry, zoo
from archbench.store import RunSpec, Store, cell_identity

QUICK_SEEDS = 3
DEFAULT_SEEDS = 5


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


def train_organism(arch: str, task_name: str, seed: int, gate: float) -> dict[str, Any]:
    """Phase 1 (in a worker): train or load one organism; return its metadata and gate."""
    try:
        task = registry.task(task_name)
        _, meta = zoo.organism(arch, task, seed)
        return {"ok": True, "meta": meta, "gate": zoo.gate_reason(meta, gate)}
    except Exception:
        return {"ok": False, "error": traceback.format_exc()}


def run_cell(spec: RunSpec, gate: float) -> dict[str, Any]:
    """Phase 2 (in a worker): one technique on one organism or control; never raises."""
    start = time.perf_counter()
    try:
        task = registry.task(spec.task).for_seed(spec.seed)
        # a control cell needs the organism's metadata (its gate) but not its weights
        meta = zoo.cached_meta(spec.arch, task, spec.seed) if spec.control else None
        trained = None
        if meta is None:
            trained, meta = zoo.organism(spec.arch, task, spec.seed)
        row: dict[str, Any] = {"organism_accuracy": meta["accuracy"]}
        reason = zoo.gate_reason(meta, gate)
        if reason:
            row |= {"status": "n/a", "reason": f"gate failed: {reason}"}
        else:
            adapter = zoo.control(spec.arch, task, spec.seed) if spec.control else trained
            result = registry.technique(spec.technique)()(adapter, task, spec.seed)
            if result.applicable:
                row |= {"status": "ok", "score": result.score, "per_example": result.per_example,
                        "metrics": result.metrics, "details": result.details}
            else:
                row |= {"status": "n/a", "reason": result.reason}
    except Exception:
        row = {"status": "error", "error": traceback.format_exc()}
    return row | {"wall_s": time.perf_counter() - start, "peak_mem_mb": _peak_mb()}


class LocalExecutor:
    """A process pool (or the calling process when workers == 1), one torch thread each.

    The pool is started on the first call that needs it and kept for later ones (organisms,
    then cells), so workers import torch and transformers once per run; `close` ends it.
    """

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable, calls: list[tuple], on_done: Callable[[tuple, Any], None]) -> None:
        if self.workers == 1 or (len(calls) <= 1 and self._pool is None):
            _init_worker()
            for args in calls:
                on_done(args, fn(*args))
            return
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx,
                                             initializer=_init_pool_worker, initargs=(os.getpid(),))
        try:
            futures = {self._pool.submit(fn, *args): args for args in calls}
            for future in as_completed(futures):
                on_done(futures[future], future.result())
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or the driver failed: stop the workers now rather
            # than wait for their running calls. concurrent.futures has no public way to kill
            # running workers, hence the private process table.
            for proc in list((self._pool._processes or {}).values()):
                proc.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _ray_executor(workers: int | None, **options: Any):
    from archbench.ray_executor import RayExecutor  # imports ray only when asked for

    return RayExecutor(workers, **options)


# name -> factory(workers, **options) of an object with `map(fn, calls, on_done)`
EXECUTORS: dict[str, Callable[..., Any]] = {"local": LocalExecutor, "ray": _ray_executor}


@dataclass
class RunSummary:
    total: int
    skipped: int
    ok: int = 0
    na: int = 0
    error: int = 0
    seconds: float = 0.0
    errors: list[str] | None = None


def run_matrix(specs: list[RunSpec], results_dir, workers: int | None = None, gate: float = zoo.DEFAULT_GATE,
               executor: str | Any = "local", progress: bool = True) -> RunSummary:
    """Run every cell not already in the store; return counts. Errors are collected, not raised.

    `executor` is a name in EXECUTORS or an already built executor (e.g. a configured RayExecutor).
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
        pool = EXECUTORS[executor](workers) if isinstance(executor, str) else executor
        bar = _progress(len(todo), progress)

        organisms = sorted({(s.arch, s.task, s.seed) for s in todo})
        cached = {o: zoo.cached_meta(o[0], registry.task(o[1]), o[2]) for o in organisms}
        missing = [o for o in organisms if cached[o] is None]
        bar.set_description(f"training {len(missing)} organisms")

        def organism_done(args, out):
            if out["ok"]:
                store.put_organism(out["meta"], out["gate"])
            else:
                summary.errors.append(f"organism {args[:3]}: {out['error'].splitlines()[-1]}")

        for o in organisms:  # cached organisms need no worker (and no worker start-up)
            if cached[o] is not None:
                organism_done((*o, gate), {"ok": True, "meta": cached[o], "gate": zoo.gate_reason(cached[o], gate)})
        try:
            pool.map(train_organism, [(*o, gate) for o in missing], organism_done)
        except BaseException:
            getattr(pool, "close", lambda: None)()
            raise

        bar.set_description("cells")

        def cell_done(args, row):
            spec = args[0]
            store.put_cell(spec, row)
            key = {"ok": "ok", "n/a": "na", "error": "error"}[row["status"]]
            setattr(summary, key, getattr(summary, key) + 1)
            if row["status"] == "error":
                summary.errors.append(f"{spec.label()}: {row['error'].strip().splitlines()[-1]}")
            bar.update(1)

        try:
            pool.map(run_cell, [(s, gate) for s in todo], cell_done)
        finally:
            getattr(pool, "close", lambda: None)()
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="cell", dynamic_ncols=True)

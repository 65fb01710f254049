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
`cancel()` and `close()` (`archbench/executors.py`; the jobs themselves, `train_organism`
and `run_cell`, are in `archbench/jobs.py`, which every executor imports instead of this
module). Dependencies and priorities live in the driver alone, so every executor gets them. Each cell is isolated: an exception becomes an `error` row with its
traceback and the sweep goes on. The driver alone writes the store, one transaction per
finished cell, so a killed run resumes where it stopped; finished cells are skipped on
rerun (as in HELM's runner).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from archbench import checkpoints, variants, zoo
from archbench.costs import CostModel
from archbench.jobs import gated_row, run_cell, train_organism
from archbench.local_executor import LocalExecutor
from archbench.progress import Progress
from archbench.results_dir import run_lock
from archbench.verdict import Settings as VerdictSettings
from archbench.store import RunSpec, Store, cell_identity, organism_identity

# seeds per run profile (`archbench run --profile`); `--seeds` overrides
PROFILES: dict[str, int] = {"quick": 3, "default": 5, "full": 10}
QUICK_SEEDS = PROFILES["quick"]
DEFAULT_SEEDS = PROFILES["default"]


def expand(archs: Iterable[str], techniques: Iterable[str], tasks: Iterable[str],
           seeds: Iterable[int]) -> list[RunSpec]:
    """Every cell of the matrix, trained and control, in a stable order."""
    return [RunSpec(t, a, k, s, control)
            for a, k, s, t, control in itertools.product(archs, tasks, seeds, techniques, (False, True))]


# ---------------------------------------------------------------------------------------
# executors (archbench/executors.py has the interface): the local pool, Ray, Slurm

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

    def add_organism(self, organism: Organism, cells: list[RunSpec], after: Organism | None = None) -> None:
        """An organism to train, and its cells, which wait for it; with `after`, the organism
        job itself waits until that organism has landed (a development row's snapshot is cut
        from its family's organism, which must be trained once, not once per stage)."""
        job = Job("organism", organism, self.costs.organism(organism[0], organism[1]))
        if after is None:
            self._push(job)
        else:
            self.waiting.setdefault(after, []).append(job)
        self.waiting.setdefault(organism, []).extend(self.cell_job(s) for s in cells)

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
    organism_identity.cache_clear()
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
    cached = {o: zoo.cached_meta(o[0], checkpoints.task(o[0], o[1]), o[2], no_retrain) for o in by_organism}
    missing = [o for o in by_organism if cached[o] is None]
    gated: list[tuple[Job, dict]] = []  # cells the driver records without a worker
    for o, meta in cached.items():  # cached organisms need no worker (and no worker start-up)
        if meta is None:
            base = (variants.base_of(o[0]), o[1], o[2]) if "stage=" in o[0] else None
            sched.add_organism(o, by_organism[o], after=base if base in missing else None)
            continue
        reason = zoo.gate_reason(meta, gate)
        store.put_organism(meta, reason)
        jobs = [sched.cell_job(s) for s in by_organism[o]]
        if reason:
            gated += [(j, gated_row(meta, reason)) for j in jobs]
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
        waiting = sched.release(job.organism)
        sched.add_cells(j for j in waiting if j.kind == "organism")  # snapshots of this organism
        cells = [j for j in waiting if j.kind == "cell"]
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
                record(cell, gated_row(out["meta"], out["gate"]), False)
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

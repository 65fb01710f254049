"""The Slurm executor: every organism-training call and every cell runs as one Slurm job.

Jobs are submitted through submitit (Facebook AI Research, https://github.com/facebookincubator/submitit,
MIT licence), the usual Python front end to Slurm's `sbatch`, `sacct` and `scancel`. Same
interface (`archbench.executors.Executor`) as `local_executor.LocalExecutor` and
`ray_executor.RayExecutor`: `capacity` (jobs to keep in flight), `submit(tag, fn, args)`
submits `fn(*args)` as one job, `next_done(timeout)` returns the next finished (tag, result)
to the driver, `cancel()` scancels what is in flight, `map(fn, calls, on_done)` runs a plain list of calls. The driver keeps the queue (longest job
first, cells behind their organism) and alone writes the store (a job only returns its row),
so resume works unchanged.

    archbench run --matrix --executor slurm --slurm-partition cpu --slurm-time 1:00:00
    archbench run --matrix --executor slurm --workers 200 --slurm-cpus-per-task 2

Shared filesystem: organisms are cached under `$ARCHBENCH_CACHE` (the driver's value, resolved
to an absolute path, handed to every job), and submitit exchanges each job's call and result
as pickles in `--slurm-folder` (default `$ARCHBENCH_CACHE/slurm/%j`, `%j` being the job id).
Both must be on a filesystem every node mounts at the same path (home, project or scratch;
never /tmp), and archbench must be installed in an environment the nodes see at the same path
(jobs run this driver's Python, `sys.executable`). An organism job trains each organism once
into the cache and its cells read it back on whichever node runs them.

Failures become rows, never hangs: a job that raised, was killed (time limit, memory, node
failure, scancel) or that `sbatch` refused comes back as an `error` cell (an organism job: an
organism that failed to train, whose cells are errors), retried on rerun; its text ends with
the job id, its Slurm state and its log. Jobs that died without a result are seen through
`sacct` (Slurm accounting), polled by submitit at most every few seconds to ten minutes; a
result on disk is seen at once. Before the first job, `sbatch --test-only` checks the
partition, time limit and CPUs (and any `SBATCH_*` variables, e.g. `SBATCH_ACCOUNT`, which
sbatch reads for every job), so a bad setting is a one-line usage error, not a sweep of
errors. Jobs in flight when the run is interrupted are scancelled; if the driver itself is
killed (SIGKILL) they run on, and what they leave in the cache (organisms) is reused.

Resources: a job asks for `--slurm-cpus-per-task` CPUs (default 1) and sets torch to as many
threads (one by default: on a few cores, one thread per process is the fastest layout for
tiny models). Slurm's queue wait and each job's start (Python, torch) add seconds per job,
which dominate the cheapest cells; the win is the number of jobs in flight (`--workers`,
default 32), which should stay under the cluster's per-user submit limit.
Finished jobs' pickles are deleted once the driver has their row; their logs, and everything
of failed jobs, stay in the folder.

submitit is imported only when this executor is built; without it, `archbench run --executor
slurm` says to `pip install "archbench[slurm]"` and exits with status 2.
"""

from __future__ import annotations

import collections
import math
import os
import subprocess
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

from archbench import zoo
from archbench.executors import map_calls
from archbench.jobs import failed_result

INSTALL_HINT = 'the slurm executor needs submitit: pip install "archbench[slurm]"'
DEFAULT_JOBS = 32  # jobs in flight without --workers
DEFAULT_MINUTES = 60  # per job; the longest organism of the quick matrix (mamba, parity) took ~9 min on one CPU
POLL_SECONDS = 1.0  # between looks at the jobs in flight (result files, submitit's cached sacct states)
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm")


class SlurmError(Exception):
    """The executor cannot run here as configured (no Slurm, a refused test job, a node-local
    path); the command line reports it as a one-line usage error."""


def slurm_minutes(text: str) -> int:
    """Minutes (rounded up) of a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    text = text.strip()
    days, dash, clock = text.partition("-")
    if not dash:
        days, clock = "0", text
    parts = [int(p) for p in clock.split(":")]  # ValueError on anything but digits
    d = int(days)
    if d < 0 or any(p < 0 for p in parts) or len(parts) > 3:
        raise ValueError(f"not a Slurm time limit: {text!r}")
    if dash:  # D-H, D-H:M, D-H:M:S
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:  # M
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:  # M:S
        h, m, s = 0, *parts
    else:  # H:M:S
        h, m, s = parts
    minutes = math.ceil(((d * 24 + h) * 60 + m) + s / 60)
    if minutes < 1:
        raise ValueError(f"a Slurm time limit must be at least a minute, got {text!r}")
    return minutes


def _call(fn: Callable, args: tuple, threads: int, cache: str, checkpoints: str | None = None) -> Any:
    """Body of every job: the driver's cache (and its description of researchers' checkpoints,
    `ARCHBENCH_CHECKPOINTS`), one torch thread per reserved CPU, then the call."""
    os.environ["ARCHBENCH_CACHE"] = cache  # whatever the cluster's environment export policy is
    if checkpoints:
        os.environ["ARCHBENCH_CHECKPOINTS"] = checkpoints
    import torch

    from archbench.jobs import init_worker

    init_worker()  # what the local pool's workers do: one torch (and BLAS) thread
    torch.set_num_threads(threads)
    return fn(*args)


def _node_local(path: Path) -> bool:
    roots = {Path(p) for p in NODE_LOCAL} | {Path(tempfile.gettempdir()).resolve()}
    return any(path == root or root in path.parents for root in roots)


class SlurmExecutor:
    """Run calls as Slurm jobs through submitit.

    `workers`: jobs in flight (default DEFAULT_JOBS). `partition`, `minutes` (time limit) and
    `cpus_per_task` go to sbatch; `folder` holds submitit's pickles and logs (default
    `$ARCHBENCH_CACHE/slurm/%j`). `cluster` is submitit's: "slurm", or "local" (jobs as local
    processes) and "debug" (in this process) to try a run without a cluster. `python` is the
    command that starts Python in a job (default this interpreter; e.g. a container's).
    """

    def __init__(self, workers: int | None = None, partition: str | None = None,
                 minutes: int = DEFAULT_MINUTES, folder: str | os.PathLike | None = None,
                 cpus_per_task: int = 1, cluster: str = "slurm", python: str | None = None):
        try:
            import submitit
            from submitit.core import utils as submitit_utils
        except ImportError as exc:
            raise ImportError(f"{INSTALL_HINT} ({exc})") from None
        if minutes < 1 or cpus_per_task < 1:
            raise ValueError(f"a Slurm job needs minutes >= 1 and cpus_per_task >= 1, got {minutes}, {cpus_per_task}")
        self._submitit, self._errors = submitit, submitit_utils
        self.workers = workers or DEFAULT_JOBS
        self.partition, self.minutes, self.cpus_per_task = partition, minutes, cpus_per_task
        self.cluster = cluster
        cache = zoo.cache_root().expanduser().resolve()
        self.folder = Path(folder).expanduser().absolute() if folder else cache / "slurm" / "%j"
        if cluster == "slurm":
            for what, path in (("$ARCHBENCH_CACHE", cache), ("--slurm-folder", self.folder)):
                if _node_local(path):
                    raise SlurmError(f"{what} is {path}, which is local to each node; point it at a "
                                     "filesystem every node mounts (home, project or scratch)")
            self._test_job()
        options = {f"{cluster}_python": python} if python is not None and cluster != "debug" else {}
        try:
            self._executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster, **options)
        except RuntimeError as exc:  # submitit found no `srun`
            raise SlurmError(f"submitit cannot submit to Slurm here ({exc}); run archbench on a "
                             "machine with Slurm's commands, such as a login node") from None
        params: dict[str, Any] = {"timeout_min": minutes, "cpus_per_task": cpus_per_task, "name": "archbench"}
        if partition:
            params["slurm_partition"] = partition
        self._executor.update_parameters(**params)
        self._in_flight: dict[Any, tuple[Any, Callable]] = {}  # submitit Job -> (tag, fn)
        self._finished: collections.deque = collections.deque()  # (tag, result) not yet handed out

    def _test_job(self) -> None:
        """`sbatch --test-only`: Slurm validates the job's settings and queues nothing."""
        command = ["sbatch", "--test-only", f"--time={self.minutes}", f"--cpus-per-task={self.cpus_per_task}",
                   "--output=/dev/null", "--wrap=true"]
        if self.partition:
            command.insert(2, f"--partition={self.partition}")
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise SlurmError("no `sbatch` on PATH; run archbench on a machine with Slurm's commands, "
                             "such as a login node") from None
        except subprocess.TimeoutExpired:
            raise SlurmError("`sbatch --test-only` got no answer from Slurm within 120 s; is slurmctld up?") from None
        if out.returncode:
            lines = [line.strip() for line in (out.stderr + out.stdout).splitlines() if line.strip()]
            said = lines[-1] if lines else f"exit status {out.returncode}"
            raise SlurmError(f"Slurm refused a test job ({said}); check --slurm-partition, --slurm-time, "
                             "--slurm-cpus-per-task and any SBATCH_* variables")

    @property
    def capacity(self) -> int:
        return self.workers

    def submit(self, tag: Any, fn: Callable, args: tuple) -> None:
        cache = str(zoo.cache_root().expanduser().resolve())
        try:
            job = self._executor.submit(_call, fn, args, self.cpus_per_task, cache,
                                        os.environ.get("ARCHBENCH_CHECKPOINTS"))
        except (self._errors.FailedJobError, self._errors.FailedSubmissionError, OSError) as exc:
            # sbatch said no to this one job (a submit limit, a busy controller): an error row,
            # retried on rerun; settings that fail every job were caught by the test job
            said = str(exc).strip().splitlines()
            self._finished.append((tag, failed_result(fn, f"sbatch refused the job: {said[-1] if said else exc}")))
            return
        self._in_flight[job] = (tag, fn)

    def next_done(self, timeout: float | None = None) -> tuple[Any, Any] | None:
        """The next finished job as (tag, result); None if none finished within `timeout` s."""
        if not self._finished and not self._in_flight:
            raise RuntimeError("next_done() with no job in flight")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished:
            for job in [j for j in self._in_flight if j.done()]:
                tag, fn = self._in_flight.pop(job)
                self._finished.append((tag, self._outcome(job, fn)))
            if self._finished:
                break
            wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - time.monotonic())
            if wait <= 0:
                return None
            time.sleep(wait)
        return self._finished.popleft()

    def _outcome(self, job, fn: Callable) -> Any:
        """The job's result; for a job that raised, died or left an unreadable result, its error row."""
        try:
            result = job.result()
        except Exception as exc:  # submitit's UncompletedJobError and FailedJobError, or a damaged pickle
            try:
                state = job.state
            except Exception:  # the state is only for the message
                state = "state unknown"
            said = "".join(traceback.format_exception_only(exc)).strip()
            return failed_result(fn, f"{said}\nslurm job {job.job_id} failed ({state}); its log: {job.paths.stderr}")
        for pickle in (job.paths.submitted_pickle, job.paths.result_pickle):  # the row is the record now
            pickle.unlink(missing_ok=True)
        return result

    def cancel(self) -> None:
        """After an error or Ctrl-C: scancel what is in flight; the store keeps what finished."""
        jobs = list(self._in_flight)
        self._in_flight.clear()
        self._finished.clear()
        on_slurm = [job.job_id for job in jobs if isinstance(job, self._submitit.SlurmJob)]
        if on_slurm:  # one scancel for all of them
            try:
                subprocess.run(["scancel", *on_slurm], capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                warnings.warn(f"could not scancel jobs {' '.join(on_slurm)} ({exc}); cancel them by hand")
        for job in jobs:
            if not isinstance(job, self._submitit.SlurmJob):
                job.cancel(check=False)

    def close(self) -> None:
        """Nothing to shut down: jobs are Slurm's, and none is left in flight after a run."""

    def map(self, fn: Callable, calls: list[tuple], on_done: Callable[[tuple, Any], None]) -> None:
        if calls:
            map_calls(self, fn, calls, on_done)


"""The Ray executor: every organism-training call and every cell runs as one Ray task.

Same interface (`archbench.executors.Executor`) as `local_executor.LocalExecutor`: `capacity` (tasks to keep in flight),
`submit(tag, fn, args)` starts `fn(*args)` as a Ray task, `next_done(timeout)` returns the
next finished (tag, result) to the driver, `cancel()` stops what is in flight. The driver
keeps the queue (longest job first, cells behind their organism) and alone writes the
store (one transaction per cell), so resume works unchanged; `map(fn, calls, on_done)` runs
a plain list of calls.

    archbench run --matrix --executor ray                       # a local Ray on this machine
    archbench run --matrix --executor ray --address auto        # a running cluster
    archbench run --matrix --executor ray --address ray://head:10001 --ray-gpus-per-task 0.5

Organisms are cached under `$ARCHBENCH_CACHE` (the driver's value, resolved to an absolute
path) and every task gets that path through Ray's `runtime_env` `env_vars`. On a cluster it
must be a filesystem every node mounts at the same path (NFS, Lustre, EFS, ...): an organism
job trains each organism once into the cache and its cells read it back on whichever node runs
the cell. Every node also needs archbench installed in the same environment as the driver.

Resources: a task asks for `num_cpus` (default 1) and `num_gpus` (default 0) and sets torch
to as many threads as its CPUs (one by default: on a few cores, one thread per process is
the fastest layout for tiny models). archbench's models run on CPU; `num_gpus` only reserves
devices for plugins that use them. Ray retries a task whose worker died `max_retries` times
(default 3; its calls are idempotent: organisms are renamed into place atomically, cells are
written by the driver); after that the job comes back as an error row (`jobs.failed_result`:
the next run retries it), never as a traceback or a hang, and every finished cell is kept.
The driver keeps `capacity` tasks in flight (by default as many as the instance's CPUs hold
tasks of `num_cpus`), so its priorities, not Ray's queue, decide what runs next.

Ray is imported only when this executor is built; without it, `archbench run --executor ray`
says to `pip install "archbench[ray]"` and exits with status 2.

Joining a cluster is bounded: `ray.init` retries an address nobody answers on for minutes,
so a `host:port` or `ray://host:port` address (given, or in `RAY_ADDRESS`) is first tried
with a plain TCP connection of at most `CONNECT_TIMEOUT_S` seconds, and an address that
refuses, times out or does not resolve raises `ClusterUnreachable` (one line, exit status 2
on the command line) before anything is computed.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

from archbench import zoo
from archbench.executors import map_calls
from archbench.jobs import failed_result

# ray.exceptions raised for a task whose worker process, node or raylet died
WORKER_LOST = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "OutOfMemoryError")
INSTALL_HINT = 'the ray executor needs Ray: pip install "archbench[ray]"'
CONNECT_TIMEOUT_S = 10.0


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the address; the message is one line naming the fix."""


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for `auto`, `local`
    and anything else Ray resolves itself."""
    if address.startswith("ray://"):
        address = address[len("ray://"):]
    elif "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def probe(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ClusterUnreachable unless something accepts a TCP connection at `address`."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except socket.timeout:
        why = f"no answer within {timeout:g} s"
    except OSError as exc:
        why = exc.strerror or str(exc)
    else:
        return
    raise ClusterUnreachable(f"no Ray cluster at {address} ({why}): check --address (the head's host:port, "
                             "e.g. head:6379, or ray://head:10001, or auto), or drop it to start a local Ray")


_worker_threads: int | None = None  # set once per Ray worker process


def _call(fn: Callable, args: tuple, threads: int) -> Any:
    """Body of every Ray task: one torch thread per reserved CPU, then the call itself."""
    global _worker_threads
    if _worker_threads != threads:
        import torch

        from archbench.jobs import init_worker

        init_worker()  # what the local pool's workers do: one torch (and BLAS) thread
        torch.set_num_threads(threads)
        _worker_threads = threads
    return fn(*args)


class RayExecutor:
    """Run calls as Ray tasks on a local Ray instance or on a cluster at `address`.

    `workers`: with no cluster (no `address`, no `RAY_ADDRESS`), the number of CPUs the local
    Ray instance gets (default: every core); on a cluster, at most this many tasks in flight
    (default: as many as the cluster will schedule). If Ray is already initialised in this
    process (a notebook, a test), that instance is used as it is.
    """

    def __init__(self, workers: int | None = None, address: str | None = None,
                 num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3):
        try:
            import ray
        except ImportError as exc:
            raise ImportError(f"{INSTALL_HINT} ({exc})") from None
        if num_cpus <= 0 or num_gpus < 0:
            raise ValueError(f"a Ray task needs num_cpus > 0 and num_gpus >= 0, got {num_cpus}, {num_gpus}")
        self._ray = ray
        self.workers = workers
        self.address = address
        if address or os.environ.get("RAY_ADDRESS"):
            probe(address or os.environ["RAY_ADDRESS"])
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.max_retries = max_retries  # Ray's retries of a task whose worker died
        # what Ray raises for a task whose worker (or node) died rather than returned
        self._worker_lost = tuple(getattr(ray.exceptions, name) for name in WORKER_LOST
                                  if hasattr(ray.exceptions, name))
        self.started = False  # True if this executor started the Ray instance it uses
        self._in_flight: dict[Any, tuple[Any, Callable]] = {}  # ObjectRef -> (tag, fn)
        self._tasks: dict[tuple, Any] = {}  # (function name, *environment items) -> remote task

    @property
    def cluster(self) -> bool:
        return self.address is not None or "RAY_ADDRESS" in os.environ

    def _connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        if self.cluster:
            try:
                ray.init(address=self.address)
            except ConnectionError as exc:  # e.g. `auto` with no cluster running
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ClusterUnreachable(f"cannot join a Ray cluster at {self.address or os.environ['RAY_ADDRESS']}"
                                         f" ({first}): check --address, or drop it to start a local Ray") from None
        else:
            ray.init(num_cpus=self.workers or os.cpu_count() or 1, include_dashboard=False)
            self.started = True

    def close(self) -> None:
        """Shut down the local Ray instance if this executor started it (else leave it running)."""
        if self.started:
            self._ray.shutdown()
            self.started = False

    @property
    def capacity(self) -> int:
        """Tasks to keep in flight: `workers` on a cluster if given, else what the Ray
        instance's CPUs (and GPUs, if tasks reserve them) hold at once."""
        self._connect()
        if self.cluster and self.workers:
            return self.workers
        resources = self._ray.cluster_resources()
        slots = int(resources.get("CPU", 1) // self.num_cpus)
        if self.num_gpus:
            slots = min(slots, int(resources.get("GPU", 0) // self.num_gpus))
        return max(1, slots)

    def submit(self, tag: Any, fn: Callable, args: tuple) -> None:
        self._in_flight[self._start(fn, args)] = (tag, fn)

    def _start(self, fn: Callable, args: tuple) -> Any:
        """Start `fn(*args)` as a Ray task; its ObjectRef."""
        self._connect()
        cache = str(zoo.cache_root().expanduser().resolve())
        env = {"ARCHBENCH_CACHE": cache}
        if os.environ.get("ARCHBENCH_CHECKPOINTS"):  # researchers' checkpoints, as the driver described them
            env["ARCHBENCH_CHECKPOINTS"] = os.environ["ARCHBENCH_CHECKPOINTS"]
        name = getattr(fn, "__name__", "archbench")
        key = (name, *sorted(env.items()))
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = self._ray.remote(_call).options(
                num_cpus=self.num_cpus, num_gpus=self.num_gpus, name=name, max_retries=self.max_retries,
                runtime_env={"env_vars": env})
        return task.remote(fn, args, max(1, int(self.num_cpus)))

    def next_done(self, timeout: float | None = None) -> tuple[Any, Any] | None:
        """The next finished task as (tag, result); None if none finished within `timeout` s."""
        if not self._in_flight:
            raise RuntimeError("next_done() with no task in flight")
        ready, _ = self._ray.wait(list(self._in_flight), num_returns=1, timeout=timeout)
        if not ready:
            return None
        tag, fn = self._in_flight.pop(ready[0])
        try:
            return tag, self._ray.get(ready[0])
        except self._worker_lost as exc:
            said = str(exc).strip().splitlines()
            return tag, failed_result(fn, f"the Ray worker running {getattr(fn, '__name__', 'the job')} died "
                                          f"({type(exc).__name__}: {said[0] if said else 'no message'})")

    def cancel(self) -> None:
        """After an error or Ctrl-C: stop what is in flight; the store keeps what finished."""
        for ref in self._in_flight:
            self._ray.cancel(ref)
        self._in_flight.clear()

    def map(self, fn: Callable, calls: list[tuple], on_done: Callable[[tuple, Any], None]) -> None:
        if calls:
            map_calls(self, fn, calls, on_done)

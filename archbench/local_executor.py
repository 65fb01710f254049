"""The local executor: a spawn-context process pool, or the calling process with one worker.

Each worker runs `jobs.init_worker` (one torch thread, one BLAS thread: on a few cores, one
thread per process and one process per core is the fastest layout for tiny models) and on
Linux dies with the driver even when the driver is SIGKILLed.
"""

from __future__ import annotations

import collections
import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Callable

from archbench.executors import map_calls
from archbench.jobs import init_worker


def _init_pool_worker(driver_pid: int) -> None:
    """`init_worker`, and on Linux die with the driver even when it is SIGKILLed (an
    orphaned worker would otherwise go on training organisms nobody will read)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if os.getppid() != driver_pid:  # the driver died before the line above took effect
            os._exit(1)
    init_worker()


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
                init_worker()
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

"""The executor interface every executor (local, Ray, Slurm) offers the runner, and `map_calls`.

An executor runs jobs (`archbench.jobs`) somewhere else than the driver:

- `capacity`: how many jobs to keep in flight;
- `submit(tag, fn, args)`: start `fn(*args)`;
- `next_done(timeout) -> (tag, result) | None`: the next finished job, None after `timeout` s;
- `cancel()`: stop what is in flight (after an error or Ctrl-C);
- `close()`: release what the executor started.

`map_calls` runs a plain list of calls through any of them. Executors import this module and
`archbench.jobs`, never the runner; the runner picks one (`runner.EXECUTORS`).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Protocol


class Executor(Protocol):
    @property
    def capacity(self) -> int: ...

    def submit(self, tag: Any, fn: Callable, args: tuple) -> None: ...

    def next_done(self, timeout: float | None = None) -> tuple[Any, Any] | None: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


def map_calls(executor: Executor, fn: Callable, calls: Iterable[tuple], on_done: Callable[[tuple, Any], None]) -> None:
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

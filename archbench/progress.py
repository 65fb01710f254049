"""The matrix runner's progress line: organisms and cells done, running jobs, elapsed, ETA.

One status line (tqdm), refreshed every second from the start; warnings from the driver and
from workers are written above it, each distinct message once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from archbench.runner import Job


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

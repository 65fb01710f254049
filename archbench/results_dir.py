"""A results directory as a place on disk: its default, its run lock, crash-safe writes into
it, and one true sentence when it cannot be used.

- `DEFAULT` (`./archbench-results`) is where a run writes unless told otherwise; the
  published leaderboard in `results/` is written only with `--results results`.
- `check(value)` refuses a path that can never be a directory (under a file, a dangling
  symlink) before anything is computed.
- `write_atomic(path, data)` writes a temporary file in the same directory and renames it
  over `path` (`os.replace`), so a report file is either the old one or the new one, never
  a truncated mix, whatever kills the process. A process killed between the write and the
  rename (SIGKILL) leaves its temporary file behind: the next run removes every such
  leftover when it takes the run lock (`remove_stale_temps`).
- `run_lock(dir)` is an advisory lock (`filelock`) held by a run for its whole length: two
  runs on one directory would compute every cell twice.
- `explain(exc, dir)` turns an OSError or SQLite error into one line that says what is
  true: read-only, disk full, damaged store, or the error itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Callable, Iterator

DEFAULT = "archbench-results"
LOCK_NAME = "archbench.lock"


def check(value: str | os.PathLike) -> Path:
    """`value` as a results directory path; ValueError (one line) if it cannot be one."""
    path = Path(value)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"--results {value} is a dangling symlink (to {os.readlink(path)}); "
                         "remove it or give another directory")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--results {value} is a file; give a directory")
    for parent in path.absolute().parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--results {value} is under {parent}, which is a file; give a directory")
            break
        if parent.is_symlink():
            raise ValueError(f"--results {value} is under {parent}, a dangling symlink; give another directory")
    return path


# ---------------------------------------------------------------------------------------
# crash-safe writes


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# write_atomic's temporary names: ".NAME." + mkstemp's 8 random characters + ".tmp"
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
TEMP_DIRS = (".", "figures")  # where the report writes, relative to the results directory


def stale_temps(results_dir: str | os.PathLike) -> list[Path]:
    """The temporary files `write_atomic` left in the results directory (a killed writer's)."""
    root = Path(results_dir)
    return sorted(p for d in TEMP_DIRS if (root / d).is_dir() for p in (root / d).iterdir()
                  if TEMP_NAME.fullmatch(p.name) and p.is_file())


def remove_stale_temps(results_dir: str | os.PathLike) -> list[Path]:
    """Remove `stale_temps`; only safe while holding the run lock (no writer is running)."""
    gone = []
    for path in stale_temps(results_dir):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove: leave it
            path.unlink()
            gone.append(path)
    return gone


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to a temporary file next to `path`, flush it to disk and rename it over
    `path`; on any failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide published files from others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------
# the run lock


class Busy(Exception):
    """Another run holds the results directory's lock."""


_held: dict[Path, list] = {}  # resolved lock path -> [FileLock, depth]: re-entrant within a process


@contextlib.contextmanager
def run_lock(results_dir: str | os.PathLike, wait: bool = False,
             on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold `results_dir`'s advisory lock. Held by another process: raise `Busy`, or with
    `wait` call `on_wait()` and block until it is released. Re-entrant in one process (the
    command line holds it around a run and its report; `run_matrix` takes it too)."""
    from filelock import FileLock, Timeout

    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = (root / LOCK_NAME).resolve()
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        if not wait:
            raise Busy(f"another archbench run holds {root} (lock {path}); let it finish, pass --wait to "
                       "queue behind it, or give another --results directory") from None
        if on_wait:
            on_wait()
        lock.acquire(timeout=-1)
    _held[path] = [lock, 1]
    try:
        remove_stale_temps(root)  # a killed run's half-written files: no writer runs now
        yield
    finally:
        del _held[path]
        lock.release()


# ---------------------------------------------------------------------------------------
# saying what is wrong

_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def _sqlite_name(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None) or ""  # Python >= 3.11
    if name:
        return name
    text = str(exc).lower()  # older Pythons: SQLite's own messages
    for needle, guess in (("readonly", "SQLITE_READONLY"), ("disk is full", "SQLITE_FULL"),
                          ("not a database", "SQLITE_NOTADB"), ("malformed", "SQLITE_CORRUPT"),
                          ("unable to open", "SQLITE_CANTOPEN"), ("locked", "SQLITE_BUSY"),
                          ("disk i/o", "SQLITE_IOERR")):
        if needle in text:
            return guess
    return ""


def explain(exc: BaseException, results_dir: str | os.PathLike | None) -> str:
    """One line for a failed read or write of a results directory: what is true, and what to do."""
    where = str(results_dir) if results_dir is not None else "the results directory"
    keep = "every finished cell is in the store"
    if isinstance(exc, sqlite3.Error):
        name = _sqlite_name(exc)
        db = f"{where}/archbench.db"
        if name.startswith("SQLITE_FULL"):
            return f"the disk holding {db} is full ({exc}); free space and rerun to resume ({keep})"
        if name.startswith("SQLITE_READONLY") or (name.startswith("SQLITE_CANTOPEN") and results_dir is not None
                                                   and not os.access(results_dir, os.W_OK)):
            return (f"{db} cannot be written: {where} is read-only ({exc}); make it writable "
                    "or point --results at another directory")
        if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return (f"the results store {db} is damaged ({exc}); point --results at another directory "
                    "or move the damaged archbench.db away")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return f"{db} is locked by another process ({exc}); let it finish and rerun"
        return f"the results store {db} failed: {exc}"
    if isinstance(exc, OSError):
        target = exc.filename or where
        if exc.errno in _FULL:
            return f"no space left on the device holding {target}; free space and rerun ({keep})"
        if exc.errno in _READ_ONLY:
            return (f"{target} cannot be written ({exc.strerror}): make {where} writable "
                    "or point --results at another directory")
        return f"{target}: {exc.strerror or exc}"
    return str(exc)

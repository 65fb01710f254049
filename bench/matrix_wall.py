"""Matrix wall time: `archbench run --matrix` on a slice (or a whole matrix), cold and warm, with 1 and 2 workers.

By default a small slice of the quick matrix runs (DEFAULT_SLICE: three cheap families, two
tasks, two techniques, 3 seeds: minutes on two cores); `--quick-matrix` runs the whole quick
matrix and `--full` the whole default one (hours). For each worker count, in a fresh temporary directory (its own results store and its own
$ARCHBENCH_CACHE, so nothing is reused from earlier runs), this runs the real command line
three times, one after another:

  cold     empty store, empty organism cache: every organism is trained, every cell runs
  warm     the same store again: every cell is already done and skipped (resume cost)
  cached   a new empty store, the organisms now cached: every cell runs, nothing trains

and prints the wall time of each, the cell counts, the peak resident memory of the
processes that ran the cells (`peak_mem_mb` in the store; with 1 worker the cells run in
the driver itself, so that figure includes the driver), and the speed-up of each worker
count over the smallest one, cold and cached.

    python bench/matrix_wall.py                                   # the slice, 1 and 2 workers
    python bench/matrix_wall.py --arch transformer --technique probe --task modadd --workers 1
    python bench/matrix_wall.py --quick-matrix                    # the whole quick matrix
    python bench/matrix_wall.py --full --workers 2                # the full default matrix (hours)

--arch/--technique/--task/--seeds/--executor are passed through to `archbench run`; any of
the first three replaces the default slice.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


DEFAULT_SLICE = {"arch": "transformer,kan,spiking", "task": "facts,count", "technique": "probe,cka"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--quick-matrix", action="store_true", help="the whole quick matrix instead of the slice")
    p.add_argument("--full", action="store_true", help="the whole default matrix (5 seeds) instead of the slice")
    p.add_argument("--arch")
    p.add_argument("--technique")
    p.add_argument("--task")
    p.add_argument("--seeds")
    p.add_argument("--executor", default="local")
    p.add_argument("--runs", default="cold,warm,cached", help="which of cold,warm,cached to run (default: all)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (printed)")
    a = p.parse_args()
    a.slice = not (a.quick_matrix or a.full or a.arch or a.technique or a.task)
    if a.slice:
        for flag, value in DEFAULT_SLICE.items():
            setattr(a, flag, value)
    return a


def archbench_run(a, workers: int, results: Path, cache: Path) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "archbench.cli", "run", "--matrix", "--workers", str(workers),
           "--results", str(results), "--no-progress", "--executor", a.executor]
    if not a.full:
        cmd.append("--quick")  # --profile quick (the alias also runs older checkouts, for comparisons)
    for flag in ("arch", "technique", "task", "seeds"):
        if getattr(a, flag):
            cmd += [f"--{flag}", getattr(a, flag)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "ARCHBENCH_CACHE": str(cache)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: some cells errored, which the table shows
        sys.exit(f"archbench run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    summary = next((line for line in done.stdout.splitlines() if " cells: " in line), done.stdout.strip())
    return wall, summary


def counts(summary: str) -> dict[str, int]:
    found = {k: int(v) for v, k in re.findall(r"(\d+) (cells|already done|ok|n/a|errors)", summary)}
    return {k: found.get(k, 0) for k in ("cells", "already done", "ok", "n/a", "errors")}


def peak_mb(results: Path) -> tuple[float, float]:
    con = sqlite3.connect(results / "archbench.db")
    peaks = [r for (r,) in con.execute("SELECT peak_mem_mb FROM cells WHERE peak_mem_mb IS NOT NULL")]
    con.close()
    return (max(peaks), statistics.median(peaks)) if peaks else (float("nan"), float("nan"))


def main() -> None:
    a = parse_args()
    workers = [int(w) for w in a.workers.split(",")]
    rows = []
    for w in workers:
        root = Path(tempfile.mkdtemp(prefix=f"archbench-wall-w{w}-"))
        cache = root / "cache"
        try:
            for run, results in (("cold", root / "results"), ("warm", root / "results"),
                                 ("cached", root / "results-cached")):
                if run not in a.runs.split(","):
                    continue
                wall, summary = archbench_run(a, w, results, cache)
                n = counts(summary)
                peak = peak_mb(results) if run != "warm" else (None, None)
                rows.append((w, run, wall, n, peak))
                print(f"workers {w} {run:<6}: {wall:8.1f} s  {summary}", file=sys.stderr)
        finally:
            if a.keep:
                print(f"kept {root}", file=sys.stderr)
            else:
                shutil.rmtree(root, ignore_errors=True)

    import torch

    matrix = "full default matrix" if a.full else "quick profile" + (" (default slice)" if a.slice else "")
    filters = " ".join(f"--{f} {getattr(a, f)}" for f in ("arch", "technique", "task", "seeds") if getattr(a, f))
    print(f"matrix wall time, {datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
          f"torch {torch.__version__}; {matrix} {filters} --executor {a.executor}")
    print("cold: empty store and cache; warm: rerun on the same store (all skipped); "
          "cached: new store, organisms cached")
    print()
    print(f"| {'workers':>7} | {'run':<6} | {'wall s':>8} | {'cells':>5} | {'skipped':>7} | {'ok':>4} | "
          f"{'n/a':>4} | {'err':>4} | {'peak MB/worker max':>18} | {'median':>7} |")
    print(f"|{'-' * 9}|{'-' * 8}|{'-' * 10}|{'-' * 7}|{'-' * 9}|{'-' * 6}|{'-' * 6}|{'-' * 6}|{'-' * 20}|{'-' * 9}|")
    for w, run, wall, n, (peak_max, peak_med) in rows:
        mem = f"{peak_max:>18.0f} | {peak_med:>7.0f}" if peak_max is not None else f"{'-':>18} | {'-':>7}"
        print(f"| {w:>7} | {run:<6} | {wall:>8.1f} | {n['cells']:>5} | {n['already done']:>7} | {n['ok']:>4} | "
              f"{n['n/a']:>4} | {n['errors']:>4} | {mem} |")
    for kind in ("cold", "cached"):
        walls = {w: wall for w, run, wall, _, _ in rows if run == kind}
        if len(walls) > 1:
            base = min(walls)
            print(f"\n{kind}: " + "; ".join(f"{w} workers / {base}: {walls[base] / t:.2f}x speed-up"
                                            for w, t in walls.items() if w != base), end="")
    print()
    print(f"max RSS of any child process: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

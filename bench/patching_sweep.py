"""Patching sweep: one batched forward per site versus one forward per intervention.

Activation patching asks, for every site and every position, how often putting the source
run's activation into the base run turns the answer into the counterfactual one. For S
sites, T positions and N pairs that is S*T*N interventions. `techniques/patching.py` runs
one forward per site: all T positions and N pairs stacked into one batch of T*N rows, each
row with its own patch position. This script times, side by side in one process (one torch
thread, repetitions interleaved, median):

  batched per site                 S forwards of T*N rows (what techniques/patching.py does)
  one forward per (site, position) S*T forwards of N rows (pairs batched, positions not)
  one forward per intervention     S*T*N forwards of 1 row (the naive loop)

on the reference transformer (random-init by default; `--trained` trains or loads the zoo
organism), over the sites patching.py patches (roles embed, stream, state). Every way must
give the same hit table; the source run's cache is computed once and not timed. The run of
the Patching technique itself (source run, pair filtering, scoring included) is printed too.

    python bench/patching_sweep.py                          # recall: 9 positions, 256 pairs
    python bench/patching_sweep.py --task modadd --reps 5
Target: batched >= 10x faster than one forward per intervention.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from archbench import registry, zoo
from archbench.hooks import Patch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="transformer")
    p.add_argument("--task", default="recall")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--trained", action="store_true", help="a trained zoo organism (trains it if not cached)")
    return p.parse_args()


def batched(adapter, base, src, names):
    """One forward per site: rows (position, pair), position-major, as in techniques/patching.py."""
    n, T = base.shape
    hits = {}
    position = torch.arange(T).repeat_interleave(n)  # (T*n,) patch position of each row
    for name in names:
        src_rows = src[name].repeat(T, *([1] * (src[name].dim() - 1)))  # (T*n, T, *f)
        out = adapter.run(base.repeat(T, 1), interventions={name: Patch(src_rows, positions=position)})
        hits[name] = out.logits[:, -1].argmax(-1).view(T, n)  # (T, n) predicted answers
    return hits


def per_position(adapter, base, src, names):
    """One forward per (site, position), the N pairs batched."""
    n, T = base.shape
    return {name: torch.stack([adapter.run(base, interventions={name: Patch(src[name], positions=p)})
                               .logits[:, -1].argmax(-1) for p in range(T)])  # (T, n)
            for name in names}


def per_intervention(adapter, base, src, names):
    """One forward per (site, position, pair): batch of one."""
    n, T = base.shape
    hits = {}
    for name in names:
        pred = torch.empty(T, n, dtype=torch.long)
        for p in range(T):
            for j in range(n):
                out = adapter.run(base[j:j + 1], interventions={name: Patch(src[name][j:j + 1], positions=p)})
                pred[p, j] = out.logits[0, -1].argmax()
        hits[name] = pred  # (T, n)
    return hits


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    from archbench.techniques.patching import SITE_ROLES, Patching

    task = registry.task(a.task)
    if a.trained:
        adapter, meta = zoo.organism(a.arch, task, a.seed)
        organism = f"trained organism (accuracy {meta['accuracy']:.2f})"
    else:
        adapter, organism = registry.adapter(a.arch).for_task(task, a.seed), "random-init"
    cf = task.counterfactuals(a.pairs, a.seed, "test")
    base, n_pos = cf.base, cf.base.shape[1]  # (N, T)
    names = adapter.names(list(SITE_ROLES))
    with torch.no_grad():
        src = adapter.run(cf.source, cache=names).cache  # name -> (N, T, *features)

    ways = {"batched per site (patching.py)": batched, "one forward per (site, position)": per_position,
            "one forward per intervention": per_intervention}
    forwards = {"batched per site (patching.py)": len(names),
                "one forward per (site, position)": len(names) * n_pos,
                "one forward per intervention": len(names) * n_pos * a.pairs}
    technique = Patching(n_pairs=a.pairs)
    times = {name: {"cpu": [], "wall": []} for name in [*ways, "Patching technique, whole run"]}
    results = {}
    with torch.no_grad():
        for r in range(a.reps):
            order = list(times)[r % len(times):] + list(times)[:r % len(times)]
            for name in order:
                cpu, wall = time.process_time(), time.perf_counter()
                if name in ways:
                    results[name] = ways[name](adapter, base, src, names)
                else:
                    technique(adapter, task, a.seed)
                times[name]["cpu"].append(time.process_time() - cpu)
                times[name]["wall"].append(time.perf_counter() - wall)

    ref = results["batched per site (patching.py)"]
    agree = {name: sum(int((res[s] == ref[s]).sum()) for s in names) / (len(names) * n_pos * a.pairs)
             for name, res in results.items()}

    print(f"patching sweep, {datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
          f"torch {torch.__version__} (1 thread)")
    print(f"{a.arch} ({organism}) on {a.task}: {len(names)} sites ({', '.join(names)}) x {n_pos} positions "
          f"x {a.pairs} pairs = {len(names) * n_pos * a.pairs} interventions; median of {a.reps} interleaved "
          f"repetitions; the source run (1 forward) is shared and not timed")
    print()
    print(f"| {'way':<34} | {'forwards':>8} | {'cpu s':>8} | {'wall s':>8} | {'x batched (cpu)':>15} | "
          f"{'same answers':>12} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 17}|{'-' * 14}|")
    fast = statistics.median(times["batched per site (patching.py)"]["cpu"])
    for name, ts in times.items():
        cpu, wall = statistics.median(ts["cpu"]), statistics.median(ts["wall"])
        same = f"{agree[name]:.4f}" if name in agree else "-"
        print(f"| {name:<34} | {forwards.get(name, '-'):>8} | {cpu:>8.3f} | {wall:>8.3f} | "
              f"{cpu / fast:>14.1f}x | {same:>12} |")
    slow = statistics.median(times["one forward per intervention"]["cpu"])
    mid = statistics.median(times["one forward per (site, position)"]["cpu"])
    print(f"\nbatched per site is {slow / fast:.1f}x faster than one forward per intervention "
          f"(target >= 10x: {'met' if slow / fast >= 10 else 'NOT met'}); one forward per (site, position) "
          f"takes {mid / fast:.2f}x the batched time (below 1: on this CPU smaller batches run faster per row)")


if __name__ == "__main__":
    main()

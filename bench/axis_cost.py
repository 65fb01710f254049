"""What the development and scale axes and the findings cost, read from a results store.

Every organism records its training seconds and every cell its wall seconds (one worker),
so a finished run's store says what each axis cost without running anything again. This
prints, per family and axis, the training and cell worker-seconds of the axis' rows against
those of the family's own rows on the same tasks and techniques, and their ratio:

  development   FAMILY@stage=f rows (their organisms are snapshots: no training; the cost
                is the cells at nine more stages)
  scale         FAMILY@d_model=W,n_layers=L rows (organisms trained from scratch)
  findings      the cells archbench/findings.py names, and their organisms

    python bench/axis_cost.py                       # the published store in results/
    python bench/axis_cost.py --results archbench-results

Times are of whatever machine ran the store (its provenance says which), one worker each;
on a shared machine they are noisy, so read ratios within one store.
"""

from __future__ import annotations

import argparse

import pandas as pd

from archbench import findings, variants
from archbench.store import reading


def axis_of(arch: str) -> str:
    if not variants.is_variant(arch):
        return "family"
    return "development" if "stage=" in arch else "scale"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results")
    args = ap.parse_args(argv)
    with reading(args.results) as store:
        cells, organisms = store.cells(), store.organisms()
    cells["axis"] = cells.arch.map(axis_of)
    cells["family"] = cells.arch.map(variants.base_of)
    organisms["axis"] = organisms.arch.map(axis_of)
    organisms["family"] = organisms.arch.map(variants.base_of)
    needed = {(s.technique, s.arch, s.task) for s in findings.specs(range(1))}
    in_findings = cells.apply(lambda r: (r.technique, r.arch, r.task) in needed, axis=1)
    rows = []
    for axis in ("development", "scale"):
        part = cells[cells.axis == axis]
        for family, g in part.groupby("family"):
            keys = set(zip(g.technique, g.task))
            base = cells[(cells.arch == family) & cells.apply(lambda r: (r.technique, r.task) in keys, axis=1)]
            train = organisms[(organisms.axis == axis) & (organisms.family == family)].seconds.sum()
            base_train = organisms[(organisms.arch == family) & organisms.task.isin({k for _, k in keys})].seconds.sum()
            rows.append({"axis": axis, "family": family, "rows": g.arch.nunique(), "cells": len(g),
                         "cell_s": g.wall_s.sum(), "train_s": train, "family_cell_s": base.wall_s.sum(),
                         "family_train_s": base_train})
    table = pd.DataFrame(rows)
    if not table.empty:
        base = table.family_cell_s + table.family_train_s
        # rows on a task the family's own row never ran (the findings' 6-block rows on facts_long) have no ratio
        table["ratio"] = ((table.cell_s + table.train_s) / base).where(base > 0)
        print(table.round(1).to_string(index=False))
        for axis, g in table.groupby("axis"):
            g = g[g.ratio.notna()]
            print(f"{axis}: {g.cell_s.sum() + g.train_s.sum():.0f} worker-s over {len(g)} families, "
                  f"{(g.cell_s.sum() + g.train_s.sum()) / max(1.0, (g.family_cell_s + g.family_train_s).sum()):.1f}× "
                  "the same cells of the families' own rows (training included); median ratio "
                  f"{g.ratio.median():.1f}×")
    f_cells = cells[in_findings]
    f_orgs = organisms[organisms.organism.isin(set(f_cells.identity.map(lambda i: (i or {}).get("organism"))))]
    print(f"findings: {len(f_cells)} cells, {f_cells.wall_s.sum():.0f} cell worker-s, "
          f"{len(f_orgs)} organisms, {f_orgs.seconds.sum():.0f} training worker-s")


if __name__ == "__main__":
    main()

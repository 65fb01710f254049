"""The report's architecture-similarity table, built from the `cka` technique's cells.

Each cka cell stores its scored site's normalised centred Gram on the first test inputs of
its task and seed (the same inputs for every architecture), so the report can compute exact
linear CKA between two architectures' best sites without rerunning either model
(`cka_exact`). Stores from before the Grams were kept get bounds instead (`cka_bounds`),
from each model's CKA with the one-hot primary variable. `CKA.report_tables` hands the
table (`similarity`) to the report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from archbench.report_tables import Table, arch_order, fmt
from archbench.techniques.cka import CKA, cka_from_packed


def trained_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The finished cka cells of trained organisms (controls are not compared)."""
    return cells[(cells.technique == CKA.name) & (cells.status == "ok") & ~cells.control]


def cka_bounds(cells: pd.DataFrame) -> pd.DataFrame:
    """Long form (arch_a, arch_b, lo, hi, n): CKA bounds between two architectures' best sites.

    Linear CKA is the cosine of the angle between centred Gram matrices, and angles between
    vectors obey the triangle inequality. With theta_A = arccos CKA(A, Y) and theta_B the same
    for B, both measured against the one-hot primary variable Y on the same test examples
    (same task and seed), cos(theta_A + theta_B) <= CKA(A, B) <= cos|theta_A - theta_B|; CKA
    of PSD Grams is >= 0. Bounds are averaged over the (task, seed) pairs both have.
    """
    ok = trained_cells(cells)
    if ok.empty:
        return pd.DataFrame(columns=["arch_a", "arch_b", "lo", "hi", "n"])
    # the triangle bounds hold for the ordinary (biased) CKA at the stored Gram's site; the
    # cell's score is the debiased estimator, kept in metrics["cka_biased"] beside it
    ordinary = ok.apply(lambda r: (r.metrics or {}).get("cka_biased", r.score), axis=1).astype(float)
    theta = ok.assign(theta=np.arccos(ordinary.clip(0, 1))).set_index(["task", "seed", "arch"]).theta
    rows = []
    archs = sorted(ok.arch.unique())
    for a in archs:
        ta = theta.xs(a, level="arch")
        for b in archs:
            tb = theta.xs(b, level="arch")
            both = ta.index.intersection(tb.index)
            if not len(both):
                continue
            x, y = ta.loc[both].to_numpy(), tb.loc[both].to_numpy()
            lo = np.maximum(0.0, np.cos(np.minimum(x + y, np.pi / 2)))
            hi = np.cos(np.abs(x - y))
            if a == b:
                lo = hi = np.ones_like(x)
            rows.append({"arch_a": a, "arch_b": b, "lo": lo.mean(), "hi": hi.mean(), "n": len(both)})
    return pd.DataFrame(rows)


def cka_exact(cells: pd.DataFrame) -> pd.DataFrame:
    """Long form (arch_a, arch_b, cka, n): exact linear CKA between two architectures' best
    sites, from the normalised Grams the cka cells store, averaged over the (task, seed)
    pairs both have. Empty when the cells hold no Grams (stores from before they were kept)."""
    ok = trained_cells(cells)
    grams = {(r.task, int(r.seed), r.arch): (r.metrics["gram"], r.metrics["gram_n"])
             for r in ok.itertuples() if isinstance(r.metrics, dict) and "gram" in r.metrics}
    if not grams:
        return pd.DataFrame(columns=["arch_a", "arch_b", "cka", "n"])
    archs = sorted({k[2] for k in grams})
    pairs = sorted({k[:2] for k in grams})
    rows = []
    for a in archs:
        for b in archs:
            vals = [cka_from_packed(grams[(t, s, a)][0], grams[(t, s, b)][0], grams[(t, s, a)][1])
                    for t, s in pairs if (t, s, a) in grams and (t, s, b) in grams
                    and grams[(t, s, a)][1] == grams[(t, s, b)][1]]
            if vals:
                rows.append({"arch_a": a, "arch_b": b, "cka": float(np.mean(vals)), "n": len(vals)})
    return pd.DataFrame(rows)


def _grid(cells: pd.DataFrame, pairs: pd.DataFrame, reference: str, value) -> tuple[list[str], list[list[str]]]:
    """(archs, rows): one row per architecture, its mean CKA with the truth, then `value(a, c, row)`
    of each pair (the empty string where the pair has no row)."""
    archs = arch_order(pairs.arch_a.unique(), reference)
    gt = trained_cells(cells).groupby("arch").score.mean()
    rows = []
    for a in archs:
        row = [a, fmt(gt.get(a))]
        for c in archs:
            r = pairs[(pairs.arch_a == a) & (pairs.arch_b == c)]
            row.append("" if r.empty else value(a, c, r.iloc[0]))
        rows.append(row)
    return archs, rows


def similarity(cells: pd.DataFrame, reference: str) -> Table | None:
    exact = cka_exact(cells)
    if not exact.empty:
        archs, rows = _grid(cells, exact, reference, lambda a, c, r: f"{r.cka:.2f}")
        note = ("Linear CKA (Kornblith et al. 2019) between the best sites of two trained architectures "
                "on the same test inputs (each cka cell stores its best site's normalised centred Gram "
                "matrix on the first test examples of its task and seed; CKA is their Frobenius inner "
                "product), averaged over the tasks and seeds both architectures have. 'truth' is the "
                "mean CKA with the one-hot primary variable.")
        return Table("similarity", "Architecture similarity (linear CKA, arch × arch)", ["arch", "truth"] + archs,
                     rows, note, extra={"exact": exact})
    b = cka_bounds(cells)
    if b.empty:
        return None
    archs, rows = _grid(cells, b, reference, lambda a, c, r: "1" if a == c else f"{r.lo:.2f}–{r.hi:.2f}")
    note = ("Linear CKA (Kornblith et al. 2019) between the best sites of two trained architectures, as an "
            "interval: each cka cell stores its CKA with the one-hot primary variable on test examples "
            "shared by every architecture (same task and seed); CKA is the cosine of the angle between "
            "centred Gram matrices, so the triangle inequality gives cos(θA+θB) ≤ CKA(A, B) ≤ cos|θA−θB| with "
            "θ = arccos CKA(·, truth). A lower bound near 1 means both carry the variable the same way; "
            "exact pairwise CKA needs both models' activations (`archbench.techniques.cka.cka_matrix`). "
            "Intervals are averaged over tasks and seeds; 'truth' is the mean CKA with the primary variable.")
    return Table("similarity", "Architecture similarity (linear CKA, arch × arch)", ["arch", "truth"] + archs,
                 rows, note, extra={"bounds": b})

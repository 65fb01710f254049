"""The report's glitch tables, built from the `glitch` cells and the mechanism-level cells beside them.

- `position_table` (key `glitch-position`): per architecture and task, the Spearman rank
  correlation between the per-position glitch rate (the glitch cells' `details`) and the
  per-position weight a mechanism-level technique puts on the same positions: attribution's
  normalised magnitude (its `details`) and patching's best interchange accuracy over sites.
  Only the positions where glitches are searched enter: positions irrelevant in some test
  example whose token varies (glitch rows with `n_tried` > 0). The question is whether the
  positions a mechanism technique weighs although the rule ignores them are the positions
  where the model's answer breaks under edits the rule allows.
- `family_table` (key `glitch-family`): the glitch rate per architecture, trained and
  random-init control side by side.

Both read the store's cells only (no model is rerun). Spearman's rho is from
`scipy.stats.spearmanr`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from archbench.report_tables import Table, arch_order, fmt

GLITCH = "glitch"
MECHANISMS = ("attribution", "patching")
# patching cells that only hand the model the source's input or output: not a site's weight
STRUCTURAL = ("input embedding", "readout input")
MIN_POSITIONS = 3


def _ok(cells: pd.DataFrame, technique: str, control: bool = False) -> pd.DataFrame:
    if cells.empty or "technique" not in cells:
        return cells.iloc[0:0]
    return cells[(cells.technique == technique) & (cells.status == "ok") & (cells.control == control)]


def _rows(details) -> list[dict]:
    return details if isinstance(details, list) else []


def _is_position(x) -> bool:
    """A fixed integer position (patching also labels the per-pair `aligned` position)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def glitch_positions(row) -> dict[int, float]:
    """position -> glitch rate, at the positions where substitutions were tried."""
    return {int(d["position"]): float(d["glitch_rate"]) for d in _rows(row.details)
            if d.get("n_tried") and d.get("glitch_rate") is not None}


def attribution_positions(row) -> dict[int, float]:
    """position -> attribution weight: the normalised magnitude averaged over the examples where
    the position is irrelevant (`mean_abs_attribution_irrelevant`; a position relevant in every
    example has none and is left out), or over all examples in rows without that key."""
    out = {}
    for d in _rows(row.details):
        key = "mean_abs_attribution_irrelevant" if "mean_abs_attribution_irrelevant" in d else "mean_abs_attribution"
        if d.get(key) is not None and _is_position(d.get("position")):
            out[int(d["position"])] = float(d[key])
    return out


def patching_positions(row) -> dict[int, float]:
    """position -> the best IIA over sites at that fixed position (the input embedding and the
    readout's input left out; the `aligned` label is not a fixed position)."""
    out: dict[int, float] = {}
    for d in _rows(row.details):
        if not _is_position(d.get("position")) or d.get("trivial_reason") in STRUCTURAL or d.get("iia") is None:
            continue
        p = int(d["position"])
        out[p] = max(out.get(p, -np.inf), float(d["iia"]))
    return out


READERS = {GLITCH: glitch_positions, "attribution": attribution_positions, "patching": patching_positions}


def pooled(cells: pd.DataFrame, technique: str, searched: dict | None = None) -> pd.DataFrame:
    """Long form (arch, task, position, value, n_seeds): a technique's trained per-position
    values, averaged over seeds. With `searched` ((arch, task, seed) -> positions), only the
    positions the glitch cell of the same organism searched, so a position relevant in one
    seed (parity's secret is drawn per seed) enters only from the seeds where it is not."""
    read = READERS[technique]
    long = [{"arch": r.arch, "task": r.task, "seed": r.seed, "position": p, "value": v}
            for r in _ok(cells, technique).itertuples() for p, v in read(r).items()
            if searched is None or p in searched.get((r.arch, r.task, r.seed), ())]
    if not long:
        return pd.DataFrame(columns=["arch", "task", "position", "value", "n_seeds"])
    return (pd.DataFrame(long).groupby(["arch", "task", "position"])
            .agg(value=("value", "mean"), n_seeds=("seed", "nunique")).reset_index())


def rank_correlation(glitch: pd.Series, other: pd.Series, name: str) -> tuple[float | None, int, str]:
    """(rho, n positions, reason): Spearman's rho over the positions both have; rho None
    with the reason where it is undefined (fewer than 3 positions, a constant vector)."""
    both = glitch.index.intersection(other.index)
    n = len(both)
    if n < MIN_POSITIONS:
        return None, n, f"{name}: {n} shared position{'' if n == 1 else 's'} (fewer than {MIN_POSITIONS})"
    x, y = glitch.loc[both].to_numpy(float), other.loc[both].to_numpy(float)
    if np.ptp(x) == 0:
        return None, n, f"{name}: glitch rate constant ({x[0]:.2f}) over the {n} positions"
    if np.ptp(y) == 0:
        return None, n, f"{name}: its value is constant ({y[0]:.2f}) over the {n} positions"
    return float(spearmanr(x, y)[0]), n, ""


def position_correlations(cells: pd.DataFrame) -> pd.DataFrame:
    """Long form (arch, task, technique, rho, n, reason) for every trained (arch, task) with
    glitch details; a technique with no cells there has reason 'no cells'."""
    searched: dict[tuple, set[int]] = {}
    for r in _ok(cells, GLITCH).itertuples():
        searched.setdefault((r.arch, r.task, r.seed), set()).update(glitch_positions(r))
    g = pooled(cells, GLITCH)
    others = {t: pooled(cells, t, searched) for t in MECHANISMS}
    out = []
    for (arch, task), gg in g.groupby(["arch", "task"], sort=True):
        rates = gg.set_index("position").value
        for t, frame in others.items():
            mine = frame[(frame.arch == arch) & (frame.task == task)]
            if mine.empty:
                out.append({"arch": arch, "task": task, "technique": t, "rho": None, "n": 0,
                            "reason": f"{t}: no cells"})
                continue
            rho, n, reason = rank_correlation(rates, mine.set_index("position").value, t)
            out.append({"arch": arch, "task": task, "technique": t, "rho": rho, "n": n, "reason": reason})
    return pd.DataFrame(out, columns=["arch", "task", "technique", "rho", "n", "reason"])


def _glitch_rate(cells: pd.DataFrame) -> pd.DataFrame:
    """(arch, task, seed, rate) of the cells that record a glitch rate."""
    rows = [{"arch": r.arch, "task": r.task, "seed": r.seed, "rate": float(r.metrics["glitch_rate"])}
            for r in cells.itertuples() if isinstance(r.metrics, dict) and r.metrics.get("glitch_rate") is not None]
    return pd.DataFrame(rows, columns=["arch", "task", "seed", "rate"])


def position_table(cells: pd.DataFrame, reference: str) -> Table | None:
    corr = position_correlations(cells)
    if corr.empty:
        return None
    trained = _glitch_rate(_ok(cells, GLITCH))
    order = {a: i for i, a in enumerate(arch_order(corr.arch.unique(), reference))}
    rows = []
    for (task, _, arch), c in corr.assign(_o=corr.arch.map(order)).groupby(["task", "_o", "arch"], sort=True):
        rates = trained[(trained.arch == arch) & (trained.task == task)]
        cell = {}
        for t in MECHANISMS:
            r = c[c.technique == t].iloc[0]
            cell[t] = "" if r.reason.endswith("no cells") else "—" if pd.isna(r.rho) else f"ρ={r.rho:.2f} (n={r.n})"
        reasons = "; ".join(r for r in c.reason if r)
        rows.append([task, arch, fmt(rates.rate.mean()), str(rates.seed.nunique()),
                     cell["attribution"], cell["patching"], reasons])
    note = ("Spearman rank correlation, over input positions, between the glitch rate at a position (the "
            "share of rule-preserving token substitutions there that flip the trained model's answer) and "
            "the weight a mechanism-level technique gives that position: attribution's magnitude normalised "
            "per example to sum 1, averaged over the examples where the position is irrelevant; patching's "
            "best interchange-intervention accuracy over sites at that fixed position (the per-pair "
            "'aligned' position, the input embedding and the readout's input left out). Only positions "
            "where glitches are searched enter (irrelevant in some example, token varying; per seed, so a "
            "position relevant in one seed's task enters from the others), so ρ > 0 says "
            "the positions a mechanism technique weighs although the rule ignores them are where the model "
            "breaks. Trained cells only, each per-position value averaged over seeds; n = positions; — where "
            f"fewer than {MIN_POSITIONS} positions are shared or a vector is constant (reason in the last "
            "column); empty where the technique has no cells. Ablation scores components, not positions, so "
            "it is not comparable at position level and has no column.")
    return Table("glitch-position", "Glitches vs mechanism-level position weight (Spearman ρ)",
                 ["task", "arch", "glitch rate", "seeds", "attribution", "patching", "note"], rows, note,
                 shape="list", extra={"correlations": corr})


def family_table(cells: pd.DataFrame, reference: str) -> Table | None:
    trained, control = _glitch_rate(_ok(cells, GLITCH)), _glitch_rate(_ok(cells, GLITCH, control=True))
    if trained.empty and control.empty:
        return None

    def per_family(frame: pd.DataFrame) -> pd.DataFrame:  # mean over tasks of the per-task seed mean
        return frame.groupby(["arch", "task"]).rate.mean().groupby("arch").agg(["mean", "count"])

    t, c = per_family(trained), per_family(control)
    rows = []
    for arch in arch_order(set(t.index) | set(c.index), reference):
        tasks = sorted(set(trained[trained.arch == arch].task) | set(control[control.arch == arch].task))
        rows.append([arch, fmt(t["mean"].get(arch)), fmt(c["mean"].get(arch)), ", ".join(tasks)])
    note = ("Glitch rate (the share of correctly answered test examples whose answer a rule-preserving "
            "substitution at irrelevant positions flips; robustness = 1 − glitch rate) per architecture: "
            "the mean over tasks of each task's mean over seeds, for the trained organisms and for their "
            "random-init controls. A control that answers nearly one token whatever its input glitches "
            "rarely: read the trained rate against it.")
    return Table("glitch-family", "Glitch rate per architecture (trained vs control)",
                 ["arch", "trained", "control", "tasks"], rows, note, shape="list")


def glitch_tables(cells: pd.DataFrame, reference: str) -> list[Table]:
    return [t for t in (position_table(cells, reference), family_table(cells, reference)) if t is not None]

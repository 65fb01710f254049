"""The report's view along the development and scale axes (variant rows, archbench/variants.py).

Development. For each family with stage rows (`FAMILY@stage=f`) and each (technique, task):
the trained score (mean over seeds) at every stage and at the end (the family's own row),
beside the held-out accuracy of the same snapshots; the table says whether the technique
finds its variable *before*, *with* or *after* the behaviour appears. The behaviour appears
at the first stage whose mean accuracy reaches the gate (0.9 by default); the technique
finds the variable at the first stage whose effect over the control (trained − control,
seed means) reaches half of the final organism's effect. "before" means the technique's
signal precedes the behaviour by at least one stage (hidden progress, Barak et al. 2022),
"with" the same stage, "after" later; "—" where the final effect is not above 0.05 (there is
nothing to find). The figure draws, per family and task, each technique's score against the
fraction of training, with the accuracy overlaid (black, dashed).

Scale. For each family with scale rows (`FAMILY@d_model=W,n_layers=L`, the family's own row
standing for its default size), each task the scale rows ran and each technique: the
verdict at every (width, depth) of the grid, on that task. A verdict that is `transfers` or
`partial` at one size and `fails` at another is flagged as flipping with scale. The figure
draws, per family, each technique's effect on each task against depth, one line style per width.

Both read the store's verdicts and cells only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from archbench import variants
from archbench.report_tables import Table, fmt, glyph

HALF = 0.5  # the share of the final effect at which a technique "finds" the variable
MIN_FINAL_EFFECT = 0.05
SIGNAL = ("transfers", "partial")


def _split(arch: str) -> tuple[str, dict]:
    if not variants.is_variant(arch):
        return arch, {}
    return variants.parse(arch)


def is_axis_row(arch: str) -> bool:
    return variants.is_variant(arch)


def development_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (family, technique, task, stage): trained and control means, effect and the
    snapshot's held-out accuracy (stage 1.0 is the family's own organism)."""
    ok = cells[cells.status == "ok"]
    families = {variants.base_of(a) for a in ok.arch if "stage=" in a}
    rows = []
    for arch in sorted(set(ok.arch)):
        base, knobs = _split(arch)
        if base not in families or (knobs and "stage" not in knobs):
            continue
        stage = knobs.get("stage", 1.0)
        for (tech, task), g in ok[ok.arch == arch].groupby(["technique", "task"]):
            trained, control = g[~g.control], g[g.control]
            if trained.empty:
                continue
            by_seed = trained.set_index("seed").score
            ctrl = control.set_index("seed").score.reindex(by_seed.index)
            rows.append({"family": base, "technique": tech, "task": task, "stage": stage,
                         "trained": by_seed.mean(), "effect": (by_seed - ctrl.fillna(0.0)).mean(),
                         "accuracy": trained.organism_accuracy.mean(), "n_seeds": len(by_seed)})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    # the family's own row only where some stage row has the same technique and task
    staged = frame[frame.stage < 1.0].groupby(["family", "technique", "task"]).size()
    keep = frame.set_index(["family", "technique", "task"]).index.isin(staged.index)
    return frame[keep].reset_index(drop=True)


def _first(stages: pd.Series, mask: pd.Series):
    hit = stages[mask.values]
    return None if hit.empty else float(hit.iloc[0])


def development_table(cells: pd.DataFrame, gate: float = 0.9) -> Table | None:
    frame = development_frame(cells)
    if frame.empty:
        return None
    stages = sorted(frame.stage.unique())
    header = ["family", "task", "technique", *[f"{s:g}" for s in stages], "finds", "behaviour at", "order"]
    rows = []
    for (family, task, tech), g in frame.groupby(["family", "task", "technique"]):
        g = g.sort_values("stage")
        by_stage = dict(zip(g.stage, g.trained))
        final = g[g.stage == 1.0]
        acc = g.drop_duplicates("stage")
        behaviour = _first(acc.stage, acc.accuracy >= gate)
        finds, order = None, "—"
        if not final.empty and final.effect.iloc[0] > MIN_FINAL_EFFECT:
            finds = _first(g.stage, g.effect >= HALF * final.effect.iloc[0])
            if finds is not None and behaviour is not None:
                i, j = stages.index(finds), stages.index(behaviour)
                order = "before" if i < j else "with" if i == j else "after"
        rows.append([family, task, tech, *[fmt(by_stage.get(s)) for s in stages],
                     "—" if finds is None else f"{finds:g}", "—" if behaviour is None else f"{behaviour:g}", order])
    accuracy = frame.drop_duplicates(["family", "task", "stage"])
    for (family, task), g in accuracy.groupby(["family", "task"]):
        by_stage = dict(zip(g.stage, g.accuracy))
        rows.append([family, task, "held-out accuracy", *[fmt(by_stage.get(s)) for s in stages], "", "", ""])
    rows.sort(key=lambda r: (r[0], r[1], r[2] != "held-out accuracy", r[2]))
    return Table("development", "Development: trained score by fraction of training", header, rows,
                 note=(f"Columns are fractions of the steps each organism trained (1 is the organism itself); "
                       f"values are trained scores, means over seeds. `finds`: first stage whose effect over "
                       f"the control reaches {HALF:g} of the final effect; `behaviour at`: first stage whose "
                       f"held-out accuracy reaches {gate:g}; `order`: the technique finds the variable "
                       "before, with or after the behaviour appears (— where the final effect is not above "
                       f"{MIN_FINAL_EFFECT:g} or the behaviour never appears)."),
                 shape="list")


def scale_frame(verdicts: pd.DataFrame) -> pd.DataFrame:
    """One row per (family, technique, task, d_model, n_layers) from the per-task verdicts, the
    family's own row standing at its default size; only (technique, task) pairs that some
    scale row of the family has, at two sizes or more (a size is compared on the same task)."""
    families = {variants.base_of(a) for a in verdicts.arch if variants.is_variant(a) and "stage=" not in a}
    rows = []
    for r in verdicts.itertuples():
        base, knobs = _split(r.arch)
        if base not in families or "stage" in knobs:
            continue
        size = size_of(r.arch)
        if size is None:
            continue
        width, depth = size
        rows.append({"family": base, "technique": r.technique, "task": r.task, "d_model": width, "n_layers": depth,
                     "verdict": r.verdict, "provisional": bool(r.provisional), "effect": r.effect, "rho": r.rho,
                     "scale_row": bool(knobs)})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    keys = ["family", "technique", "task"]
    has_scale = frame.groupby(keys).scale_row.transform("any")
    sizes = frame.groupby(keys).d_model.transform("size")
    return frame[has_scale & (sizes >= 2)].drop(columns="scale_row").reset_index(drop=True)


def size_of(arch: str) -> tuple[int, int] | None:
    """(d_model, blocks) of a scale row; a family's own row sits at the grid point whose scaled
    config is its default config (d_model 64 with 2 blocks for most; the looped transformer's
    4 iterations), None if none is."""
    from archbench import registry

    base, knobs = _split(arch)
    cls = registry.adapter(base)
    if knobs:
        return knobs.get("d_model", 64), knobs.get("n_layers", 2)
    for width, depth in variants.SCALE_GRID:
        try:
            if {**cls.default_config, **cls.scaled_config(width, depth)} == cls.default_config:
                return width, depth
        except ValueError:
            return None
    return None


def scale_table(verdicts: pd.DataFrame) -> Table | None:
    frame = scale_frame(verdicts)
    if frame.empty:
        return None
    grid = sorted({(w, d) for w, d in zip(frame.d_model, frame.n_layers)})
    header = ["family", "task", "technique", *[f"{w}×{d}" for w, d in grid], "stable"]
    rows = []
    for (family, task, tech), g in frame.groupby(["family", "task", "technique"]):
        at = {(r.d_model, r.n_layers): r for r in g.itertuples()}
        cells = [glyph(at[p].verdict, at[p].provisional) + (f" {fmt(at[p].rho)}" if p in at and pd.notna(at[p].rho)
                                                            else "") if p in at else "" for p in grid]
        found = {r.verdict for r in g.itertuples()}
        scored = found & {*SIGNAL, "fails"}
        flips = bool(found & set(SIGNAL)) and "fails" in found
        rows.append([family, task, tech, *cells, "flips" if flips else ("yes" if scored else "—")])
    return Table("scale", "Scale: verdict by width × depth", header, rows,
                 note=("Columns are d_model × blocks; each cell is the verdict on that task of the organisms of "
                       "that size, read against the reference at its default size (ρ after the glyph). "
                       "`flips`: transfers or partial at one size and fails at another; `yes`: the same side "
                       "everywhere it was scored; — where no size was scored (n/a, no-reference)."),
                 shape="list")


def development_figures(cells: pd.DataFrame):
    """Family -> a matplotlib Figure: per task a panel, each technique's trained score against
    the fraction of training, the held-out accuracy overlaid (black, dashed)."""
    from matplotlib.figure import Figure

    frame = development_frame(cells)
    out = {}
    if frame.empty:
        return out
    for family, f in frame.groupby("family"):
        tasks = sorted(f.task.unique())
        fig = Figure(figsize=(3.4 * len(tasks), 3.0))
        for i, task in enumerate(tasks):
            ax = fig.add_subplot(1, len(tasks), i + 1)
            g = f[f.task == task]
            for tech, t in g.groupby("technique"):
                t = t.sort_values("stage")
                ax.plot(t.stage, t.trained, marker="o", markersize=3, label=tech)
            acc = g.drop_duplicates("stage").sort_values("stage")
            ax.plot(acc.stage, acc.accuracy, color="black", linestyle="--", linewidth=2, label="held-out accuracy")
            ax.set_title(f"{family} · {task}", fontsize=9)
            ax.set_xlabel("fraction of training")
            ax.set_ylim(-0.05, 1.05)
            if i == 0:
                ax.set_ylabel("trained score")
        fig.axes[-1].legend(fontsize=6, loc="lower right")
        out[family] = fig
    return out


def scale_figures(verdicts: pd.DataFrame):
    """Family -> a matplotlib Figure: each (technique, task)'s effect against depth, one line
    per width (solid, dashed, dotted from narrow to wide)."""
    from matplotlib.figure import Figure

    frame = scale_frame(verdicts)
    out = {}
    if frame.empty:
        return out
    styles = ["-", "--", ":", "-."]
    for family, f in frame.groupby("family"):
        panels = sorted(set(zip(f.technique, f.task)))
        fig = Figure(figsize=(2.6 * len(panels), 2.6))
        for i, (tech, task) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            g = f[(f.technique == tech) & (f.task == task)]
            for j, (width, w) in enumerate(sorted(g.groupby("d_model"), key=lambda x: x[0])):
                w = w.sort_values("n_layers")
                ax.plot(w.n_layers, w.effect.astype(float), linestyle=styles[j % len(styles)], marker="o",
                        markersize=3, label=f"d_model {width}")
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.set_title(f"{family} · {tech} · {task}", fontsize=8)
            ax.set_xlabel("blocks")
            if i == 0:
                ax.set_ylabel("effect (trained − control)")
        fig.axes[-1].legend(fontsize=6)
        out[family] = fig
    return out


def axis_rows(frame: pd.DataFrame) -> np.ndarray:
    """Bool mask of the rows of a cells, verdicts or organisms frame that belong to an axis."""
    return frame.arch.map(is_axis_row).to_numpy(dtype=bool) if len(frame) else np.zeros(0, dtype=bool)

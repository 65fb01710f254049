"""The leaderboard: Markdown tables rendered from the results store alone.

Reads cells and organisms, computes verdicts (archbench.verdict) and writes
`LEADERBOARD.md` into the results directory. It never runs a model or recomputes a cell,
and it renders stores that hold `error` and `n/a` rows.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from archbench import verdict
from archbench.store import Store, provenance


def _f(x, digits: int = 2) -> str:
    return "" if x is None or pd.isna(x) else f"{x:.{digits}f}"


def _ci(lo, hi) -> str:
    return "" if lo is None or pd.isna(lo) else f"[{lo:.2f}, {hi:.2f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def transfer_matrix(summary: pd.DataFrame) -> str:
    archs = sorted(summary.arch.unique())
    rows = []
    for tech, g in summary.groupby("technique", sort=True):
        row = [tech]
        for arch in archs:
            r = g[g.arch == arch]
            if r.empty:
                row.append("")
                continue
            r = r.iloc[0]
            cell = f"{verdict.GLYPHS[r.verdict]} {r.verdict}"
            if "rho" in r and not pd.isna(r.get("rho")):
                cell += f" ρ={r.rho:.2f} {_ci(r.rho_lo, r.rho_hi)}"
            row.append(cell)
        rows.append(row)
    return _table(["technique"] + archs, rows)


def behaviour_table(organisms: pd.DataFrame) -> str:
    if organisms.empty:
        return "_no organisms trained_"
    acc = organisms.groupby(["task", "arch"]).accuracy.agg(["mean", "min", "count"]).reset_index()
    archs = sorted(acc.arch.unique())
    rows = []
    for task, g in acc.groupby("task", sort=True):
        row = [task]
        for arch in archs:
            r = g[g.arch == arch]
            row.append("" if r.empty else f"{r['mean'].iloc[0]:.3f} (min {r['min'].iloc[0]:.2f}, n={r['count'].iloc[0]})")
        rows.append(row)
    return _table(["task"] + archs, rows)


def per_task_table(v: pd.DataFrame, technique: str) -> str:
    rows = []
    for r in v[v.technique == technique].sort_values(["task", "arch"]).itertuples():
        rows.append([r.task, r.arch, _f(getattr(r, "trained", None)), _f(getattr(r, "control", None)),
                     _f(getattr(r, "effect", None)), _ci(getattr(r, "effect_lo", None), getattr(r, "effect_hi", None)),
                     _f(getattr(r, "rho", None)), f"{verdict.GLYPHS[r.verdict]} {r.verdict}",
                     getattr(r, "reason", "") or ""])
    return _table(["task", "arch", "trained", "control", "effect", "95% CI", "ρ", "verdict", "note"], rows)


def render(results_dir: str | Path, settings: verdict.Settings = verdict.Settings()) -> str:
    with Store(results_dir) as store:
        cells, organisms = store.cells(), store.organisms()
    if cells.empty:
        return "# archbench leaderboard\n\n_the store holds no cells yet_\n"
    v = verdict.verdicts(cells, settings)
    s = verdict.summary(cells, settings)
    counts = cells.status.value_counts().to_dict()
    prov = cells.provenance.dropna().iloc[0] if cells.provenance.notna().any() else provenance()
    parts = [
        "# archbench leaderboard",
        "Each cell: does the technique recover the task's known mechanism on this architecture as "
        "well as on the reference, measured as the effect over a random-init control of the same "
        "architecture and seed? Glyphs: " + ", ".join(f"{g} {k}" for k, g in verdict.GLYPHS.items()) + ".",
        f"Thresholds: {settings.describe()}.",
        "## Transfer matrix (technique × architecture, tasks pooled)",
        transfer_matrix(s),
        "## Behaviour (held-out accuracy of the trained organisms, task × architecture)",
        behaviour_table(organisms),
    ]
    for tech in sorted(cells.technique.unique()):
        parts += [f"## {tech}: scores per task (trained vs random-init control)", per_task_table(v, tech)]
    errors = cells[cells.status == "error"]
    if len(errors):
        parts += ["## Errors", _table(["cell", "last line"], [
            [f"{r.technique}/{r.arch}/{r.task}/seed{r.seed}{'/control' if r.control else ''}",
             (r.error or "").strip().splitlines()[-1] if r.error else ""] for r in errors.itertuples()])]
    parts += ["## Provenance", _table(["key", "value"], [[k, v_] for k, v_ in prov.items()] + [
        ["cells", ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))],
        ["seeds", ", ".join(map(str, sorted(cells.seed.unique())))],
        ["compute (cell wall time, s)", _f(cells.wall_s.sum(), 1)],
        ["organism training (s)", _f(organisms.seconds.sum(), 1) if len(organisms) else "0"],
    ])]
    return "\n\n".join(parts) + "\n"


def write(results_dir: str | Path, settings: verdict.Settings = verdict.Settings()) -> Path:
    path = Path(results_dir) / "LEADERBOARD.md"
    path.write_text(render(results_dir, settings))
    return path

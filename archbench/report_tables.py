"""The report's tables, as data: every output format (Markdown, LaTeX, HTML) renders these.

A `Table` is a title, a header and rows of display strings (Unicode glyphs included; each
renderer escapes them its own way). Everything here reads the results store's DataFrames
only: verdicts come from `archbench.verdict`, nothing is recomputed from a model.

- `transfer_matrix`: technique x architecture, verdict glyph and rho with its CI.
- `behaviour`: task x architecture, held-out organism accuracy (mean, minimum, gate passes).
- `per_task`: for one technique, task x architecture scores of trained organisms and of
  random-init controls, each with a 95% seed-level t-interval, the effect and rho.
- `technique_tables`: the tables a technique contributes from its own cells
  (`Technique.report_tables`; `cka`'s architecture similarity, `techniques/cka_similarity.py`).
- `high_controls`, `errors`, `provenance`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal

import numpy as np
import pandas as pd

from archbench import registry, verdict
from archbench.version import __version__


@dataclass
class Table:
    key: str  # a short identifier: anchor in HTML, label in LaTeX
    title: str
    header: list[str]
    rows: list[list[str]]  # display strings; "\n" marks a line break inside a cell
    note: str = ""  # one paragraph under the title that says how to read the table
    shape: str = "matrix"  # "matrix": few rows, many columns; "list": many rows, a free-text last column
    extra: dict = field(default_factory=dict)


def fmt(x, digits: int = 2) -> str:
    return "" if x is None or pd.isna(x) else f"{x:.{digits}f}"


def ci(lo, hi, digits: int = 2) -> str:
    return "" if lo is None or pd.isna(lo) else f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def floor_digits(x: float, digits: int = 3) -> str:
    """x rounded *down* to `digits` decimals (0.8996 -> 0.899), so it never reads as passing a gate."""
    return str(Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_FLOOR))


def glyph(v: str, provisional: bool = False) -> str:
    return f"{verdict.label(v, provisional)} {v}"


def _provisional(r) -> bool:
    x = getattr(r, "provisional", False)
    return bool(x) if isinstance(x, (bool, np.bool_)) else False


def arch_order(archs, reference: str) -> list[str]:
    """The reference architecture first, then the others alphabetically."""
    archs = set(archs)
    return ([reference] if reference in archs else []) + sorted(archs - {reference})


def arch_grid(frame: pd.DataFrame, by: str, archs: list[str], cell) -> list[list[str]]:
    """One row per value of `by` (sorted), one column per architecture: `cell(rows)`, or ""."""
    rows = []
    for key, g in frame.groupby(by, sort=True):
        groups = dict(tuple(g.groupby("arch")))
        rows.append([key] + [cell(groups[a]) if a in groups else "" for a in archs])
    return rows


# ---- transfer matrix -------------------------------------------------------------------------

def transfer_matrix(summary: pd.DataFrame, settings: verdict.Settings) -> Table:
    archs = arch_order(summary.arch.unique(), settings.reference) if len(summary) else []

    def cell(r: pd.DataFrame) -> str:
        r = r.iloc[0]
        if "rho" in r and not pd.isna(r.get("rho")):  # glyph and rho, then its CI on a second line
            return f"{verdict.label(r.verdict, _provisional(r))} ρ={r.rho:.2f}\n{ci(r.rho_lo, r.rho_hi)}"
        return glyph(r.verdict, _provisional(r))

    rows = arch_grid(summary, "technique", archs, cell)
    note = ("Tasks pooled: each cell averages the effect (trained − control) over the tasks on which the "
            f"technique works on the reference ({settings.reference}); ρ = effect / reference effect, "
            "with its 95% Fieller interval from seed-level t-intervals; ≈ weak-reference: the reference "
            f"effect's lower bound is below {settings.weak_reference}, so no ρ is shown; "
            f"{verdict.PROVISIONAL} provisional: fewer than {settings.min_seeds} seeds.")
    return Table("transfer", "Transfer matrix (technique × architecture)", ["technique"] + archs, rows, note)


# ---- behaviour ---------------------------------------------------------------------------------

def organism_frame(organisms: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """(arch, task, seed, accuracy, passed) per organism: the organisms table, or else the cells."""
    if len(organisms):
        o = organisms[["arch", "task", "seed", "accuracy"]].copy()
        o["passed"] = organisms.gate.isna() | (organisms.gate.fillna("") == "")
        return o
    c = cells[cells.organism_accuracy.notna()]
    o = c.groupby(["arch", "task", "seed"]).agg(
        accuracy=("organism_accuracy", "first"),
        passed=("reason", lambda r: not r.fillna("").str.startswith("gate failed").any())).reset_index()
    return o


def behaviour(organisms: pd.DataFrame, cells: pd.DataFrame, reference: str) -> Table:
    o = organism_frame(organisms, cells)
    archs = arch_order(o.arch.unique(), reference)

    def cell(r: pd.DataFrame) -> str:
        passed = int(r.passed.sum())
        mark = "" if passed == len(r) else " ✗"
        return f"{r.accuracy.mean():.3f} · min {floor_digits(r.accuracy.min())} · {passed}/{len(r)} pass{mark}"

    rows = arch_grid(o, "task", archs, cell)
    note = ("Held-out accuracy of the trained organisms: mean over seeds · minimum over seeds (rounded "
            "down, so a minimum just below the gate never reads as passing) · organisms that pass the "
            "behavioural gate / organisms trained. Cells of an organism that fails the gate are n/a.")
    return Table("behaviour", "Behaviour (task × architecture)", ["task"] + archs, rows, note)


# ---- per-task scores with CIs ------------------------------------------------------------------

def score_ci(cells: pd.DataFrame, settings: verdict.Settings) -> tuple[float, float]:
    """95% interval of the mean score over seeds (one cell per seed), as the verdict's effect."""
    scores = [verdict.cell_score(r.per_example, r.score) for r in cells.itertuples()]
    se = verdict._example_se(cells.per_example.iloc[0]) if len(cells) == 1 else None
    return verdict.interval(scores, settings.confidence, se)


def _get(row, name):
    """A column of a verdict row, or None where the row has no such value (NaN included)."""
    x = getattr(row, name, None)
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else x


def per_task(v: pd.DataFrame, cells: pd.DataFrame, technique: str, settings: verdict.Settings) -> Table:
    ok = cells[(cells.technique == technique) & (cells.status == "ok")]
    vt = v[v.technique == technique]
    order = {a: i for i, a in enumerate(arch_order(vt.arch.unique(), settings.reference))}
    rows = []
    for r in vt.assign(_o=vt.arch.map(order)).sort_values(["task", "_o"]).itertuples():
        g = ok[(ok.task == r.task) & (ok.arch == r.arch)]
        seeds = sorted(set(g[~g.control].seed) & set(g[g.control].seed))  # as the verdict pairs them
        scores = []
        for control in (False, True):
            lo, hi = score_ci(g[g.seed.isin(seeds) & (g.control == control)], settings)
            scores.append(f"{fmt(_get(r, 'control' if control else 'trained'))} {ci(lo, hi)}".strip())
        n_seeds = _get(r, "n_seeds")
        rows.append([r.task, r.arch, *scores,
                     f"{fmt(_get(r, 'effect'))} {ci(_get(r, 'effect_lo'), _get(r, 'effect_hi'))}".strip(),
                     f"{fmt(_get(r, 'rho'))} {ci(_get(r, 'rho_lo'), _get(r, 'rho_hi'))}".strip(),
                     glyph(r.verdict, _provisional(r)), "" if n_seeds is None else str(int(n_seeds)), _get(r, "reason") or ""])
    note = ("Scores in [0, 1] of the trained organism and of its random-init control (0 is the technique's "
            "chance level, and a cell below chance counts as 0; 1 is perfect): the mean over seeds with a 95% "
            "t-interval over seeds; effect = trained − control per seed, with its seed-level interval; "
            f"ρ = effect / effect on {settings.reference} for the same task.")
    return Table(f"task-{technique}", f"{technique}: scores per task",
                 ["task", "arch", "trained [95% CI]", "control [95% CI]", "effect [95% CI]", "ρ [95% CI]",
                  "verdict", "seeds", "note"], rows, note, shape="list")


# ---- what each technique contributes --------------------------------------------------------

def technique_class(name: str):
    """The registered technique class of that name, or None where this installation has none."""
    try:
        return registry.technique(name)
    except (registry.UnknownName, ImportError):
        return None


def technique_tables(cells: pd.DataFrame, reference: str) -> list[Table]:
    """The tables each technique of the store contributes from its cells (`Technique.report_tables`),
    techniques in name order."""
    out: list[Table] = []
    for name in sorted(cells.technique.unique()):
        cls = technique_class(name)
        out += cls.report_tables(cells, reference) if cls is not None else []
    return out


# ---- errors and provenance ------------------------------------------------------------------------

HIGH_CONTROL = 0.2  # a control mean above this is listed with its explanation


def high_controls(v: pd.DataFrame, settings: verdict.Settings) -> Table | None:
    """Every (technique, task, arch) whose random-init control scores above HIGH_CONTROL on
    average, with the technique's own account of why its control can (`control_floor`)."""
    if v.empty or "control" not in v:
        return None
    high = v[v.control > HIGH_CONTROL].sort_values(["technique", "task", "control"], ascending=[True, True, False])
    if high.empty:
        return None
    why = {}
    for tech in high.technique.unique():
        cls = technique_class(tech)
        why[tech] = ("a technique this installation does not have" if cls is None
                     else cls.control_floor or "no account given: read this cell with care")
    rows = [[r.technique, r.task, r.arch, fmt(r.control), fmt(r.trained), fmt(r.effect),
             glyph(r.verdict, _provisional(r))] for r in high.itertuples()]
    note = (f"Controls whose mean over seeds is above {HIGH_CONTROL}: the random-init model already scores "
            "there, so only the trained − control effect is evidence. Why each technique's control can: "
            + " ".join(f"{tech}: {text}" for tech, text in why.items()))
    return Table("high-controls", f"Controls above {HIGH_CONTROL}", ["technique", "task", "arch", "control",
                                                                     "trained", "effect", "verdict"], rows, note)


def last_line(text) -> str:
    return (text or "").strip().splitlines()[-1] if isinstance(text, str) and text.strip() else ""


def errors(cells: pd.DataFrame) -> Table | None:
    err = cells[cells.status == "error"]
    if err.empty:
        return None
    rows = [[f"{r.technique}/{r.arch}/{r.task}/seed{r.seed}{'/control' if r.control else ''}", last_line(r.error)]
            for r in err.itertuples()]
    return Table("errors", "Errors", ["cell", "last line of the traceback"], rows,
                 "Cells whose technique raised; `archbench run` retries them.", shape="list")


def gate_thresholds(organisms: pd.DataFrame, cells: pd.DataFrame) -> list[str]:
    """The gate thresholds recorded in gate-failure reasons (the store keeps no other record)."""
    texts = list(organisms.gate.dropna()) if len(organisms) else []
    texts += list(cells.reason.dropna())
    return sorted({m for t in texts for m in re.findall(r"accuracy [0-9.]+ < ([0-9.]+)", t)})


def provenance(cells: pd.DataFrame, organisms: pd.DataFrame, settings: verdict.Settings) -> Table:
    from archbench.store import provenance as here

    prov = [p for p in cells.provenance if isinstance(p, dict)]
    keys = list(dict.fromkeys(k for p in prov for k in p))
    rows = [[k, "; ".join(sorted({str(p.get(k)) for p in prov}))] for k in keys]
    counts = cells.status.value_counts().to_dict()
    gates = gate_thresholds(organisms, cells)
    wall = cells.wall_s.sum()
    rows += [
        ["report rendered by", f"archbench {__version__} (git {here().get('git_sha') or 'unknown'})"],
        ["cells", ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) + f" (total {len(cells)})"],
        ["techniques", ", ".join(sorted(cells.technique.unique()))],
        ["architectures", ", ".join(arch_order(cells.arch.unique(), settings.reference))],
        ["tasks", ", ".join(sorted(cells.task.unique()))],
        ["seeds", ", ".join(map(str, sorted(cells.seed.unique())))],
        ["verdict thresholds", settings.describe()],
        ["behavioural gate", ", ".join(gates) + " (from gate-failure reasons)" if gates
         else "not recorded in the store (no organism failed it)"],
        ["compute: cells (sum of wall_s)", f"{wall:.1f} s ({wall / 3600:.2f} h)"],
        ["compute: organism training", f"{organisms.seconds.sum():.1f} s" if len(organisms) else "0 s (none recorded)"],
        ["peak memory per cell", f"{cells.peak_mem_mb.max():.0f} MB" if cells.peak_mem_mb.notna().any() else "unknown"],
        ["cells written", f"{cells.created.min()} – {cells.created.max()}" if "created" in cells else ""],
    ]
    return Table("provenance", "Provenance", ["key", "value"], rows,
                 "Library versions, git SHA and hardware as recorded with the cells (several values when "
                 "cells came from several runs).", shape="list")

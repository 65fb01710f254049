"""The publishable report, rendered from the results store alone.

`write(results_dir)` reads the cells and organisms once, computes verdicts
(`archbench.verdict`), builds the tables (`archbench.report_tables`) and figures
(`archbench.figures`), and writes into the results directory:

  LEADERBOARD.md     the tables in Markdown (this module), figures linked
  leaderboard.tex    a standalone booktabs document that inputs leaderboard_table.tex
  leaderboard_table.tex  the booktabs tables alone, to input into a paper (`archbench.report_latex`)
  cells.csv          one tidy row per cell (this module)
  index.html         one self-contained page, sortable tables, figures inline (`archbench.report_html`)
  figures/*.{png,svg,pdf}  transfer heatmap, score-by-depth panels per technique

It never runs a model or recomputes a cell, and it renders stores that hold `error` and
`n/a` rows. Output depends only on the store and the settings, so rendering twice gives the
same files. It reads `archbench.db`, or the published `archbench.db.gz` through a temporary
copy.

Crash-safe: every file is rendered in memory first, then written to a temporary name in the
same directory and renamed into place, so a killed or failed render leaves each file either
as it was or complete. The store then records the digest of what the files were rendered
from (cells, organisms, settings, formats, code version) and of each file as written;
`is_current` compares both, so a rerun re-renders when the cells changed, when a file is
missing or differs (truncated, edited), or when a render never finished.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from archbench import findings_figures, report_axes, report_html, report_known_answer, report_latex, verdict
from archbench import report_tables as tables
from archbench.report_tables import Table
from archbench.results_dir import write_atomic
from archbench.store import Store, reading

FORMATS = ("md", "tex", "csv", "html", "png")
TITLE = "archbench leaderboard"


@dataclass
class ReportData:
    cells: pd.DataFrame
    organisms: pd.DataFrame
    verdicts: pd.DataFrame  # one row per (technique, task, arch)
    summary: pd.DataFrame  # one row per (technique, arch), tasks pooled
    settings: verdict.Settings
    localisation: pd.DataFrame | None = None  # known-answer organisms' rows (archbench iit --results)


class MixedScoring(ValueError):
    """A store holds cells of several scoring versions, which no table may mix."""


def load(results_dir: str | Path, settings: verdict.Settings = verdict.Settings(),
         scoring: int | None = None) -> ReportData:
    """The store's cells and verdicts; cells of one scoring version only (`scoring`, or the
    only one present: a store with several raises `MixedScoring`, naming the fix)."""
    with reading(results_dir) as store:
        return _load(store, results_dir, settings, scoring)


def _load(store: Store, results_dir, settings: verdict.Settings, scoring: int | None) -> ReportData:
    cells, organisms, loc = store.cells(), store.organisms(), store.localisation()
    versions = sorted(set(cells.scoring)) if len(cells) else []
    if scoring is not None:
        cells = cells[cells.scoring == scoring]
    elif len(versions) > 1:
        raise MixedScoring(
            f"{results_dir} holds cells of scoring versions {', '.join(map(str, versions))}, which no table "
            f"may mix: rerun `archbench run --matrix --results {results_dir}` with the same filters to "
            f"recompute the old cells, or render one version with `archbench report --scoring {versions[-1]}`")
    if cells.empty:
        return ReportData(cells, organisms, pd.DataFrame(), pd.DataFrame(), settings, loc)
    measured = verdict.effects(cells, settings)
    return ReportData(cells, organisms, verdict.verdicts(cells, settings, measured),
                      verdict.summary(cells, settings, measured), settings, loc)


def intro(settings: verdict.Settings, cells: pd.DataFrame | None = None) -> list[str]:
    lines = [
        "Each cell asks: does the technique recover the task's known mechanism on this architecture as "
        f"well as on the reference ({settings.reference}), measured as the effect over a random-init "
        "control of the same architecture and seed?",
        f"Thresholds: {settings.describe()}.",
    ]
    if cells is not None and len(cells) and settings.reference not in set(cells.arch):
        lines.append(f"Warning: the reference architecture ({settings.reference}) has no cells here, so no "
                     "verdict has a reference effect to divide by; run archbench run --matrix with "
                     f"--arch {settings.reference} and the same techniques, tasks and seeds.")
    return lines


def main_rows(d: ReportData) -> ReportData:
    """The report data without the development and scale rows (archbench/variants.py): the
    main tables compare families at their own size and training; the axis rows get tables of
    their own (`archbench.report_axes`)."""
    keep = lambda frame: frame[~report_axes.axis_rows(frame)] if len(frame) else frame  # noqa: E731
    return ReportData(keep(d.cells), keep(d.organisms), keep(d.verdicts), keep(d.summary), d.settings,
                      d.localisation)


def build_tables(d: ReportData) -> list[Table]:
    s = d.settings
    from archbench import findings

    axes = [t for t in (findings.table(d.cells, d.organisms), report_axes.development_table(d.cells),
                        report_axes.scale_table(d.verdicts)) if t]
    d = main_rows(d)
    out = [tables.transfer_matrix(d.summary, s), tables.behaviour(d.organisms, d.cells, s.reference)]
    out += axes
    out += report_known_answer.tables(d.localisation, s.reference, s)
    out += tables.technique_tables(d.cells, s.reference)
    high = tables.high_controls(d.verdicts, s)
    out += [high] if high is not None else []
    out += [tables.per_task(d.verdicts, d.cells, tech, s) for tech in sorted(d.cells.technique.unique())]
    err = tables.errors(d.cells)
    out += [err] if err is not None else []
    return out + [tables.provenance(d.cells, d.organisms, s)]


def figure_captions(names) -> dict[str, list[tuple[str, str]]]:
    """Table key -> (figure file name, caption) for the figures that belong after it."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name in sorted(names):
        if name == "transfer_matrix.png":
            out.setdefault("transfer", []).append((name, "Transfer ratio ρ (colour) and verdict (glyph)."))
        elif name.startswith("findings_"):
            out.setdefault("findings", []).append((name, FINDING_CAPTIONS.get(name[:-len(".png")], name)))
        elif name.startswith(("development_", "scale_")):
            axis, family = name[:-len(".png")].split("_", 1)
            out.setdefault(axis, []).append(
                (name, f"{family}: trained score by fraction of training, held-out accuracy dashed"
                 if axis == "development" else f"{family}: effect (trained − control) by depth on each task, one line per width"))
        elif name.startswith("depth_"):
            tech = name[len("depth_"):-len(".png")]
            out.setdefault(f"task-{tech}", []).append(
                (name, f"{tech}: best site per depth, trained (solid) and random-init control (dotted); "
                       "bands: 95% t-intervals over seeds."))
    return out


FINDING_CAPTIONS = {
    "findings_nanda": "Nanda et al. 2023: the transformer's modadd embedding spectrum, ranked, per seed "
                      "(dashed: an even spread).",
    "findings_tracing": "Meng et al. 2022 / Sen Sharma et al. 2024: causal tracing's IE/TE per block × position "
                        "on facts_long, mean over seeds.",
    "findings_zoology": "Arora et al. 2023: mqar held-out accuracy against the number of pairs.",
}


def _md_table(t: Table) -> str:
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, t.header)) + " |", "|" + "---|" * len(t.header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in t.rows])


def markdown(tabs: list[Table], settings: verdict.Settings, captions: dict | None = None,
             cells: pd.DataFrame | None = None) -> str:
    legend = ", ".join(f"{g} {k}" for k, g in verdict.GLYPHS.items())
    parts = [f"# {TITLE}", *intro(settings, cells), f"Glyphs: {legend}.",
             "Also in this directory: `index.html` (sortable tables, figures), `leaderboard.tex`, "
             "`cells.csv`, `figures/`. References: `archbench cite --results <this directory>`."]
    for t in tabs:
        parts += [f"## {t.title}", t.note, _md_table(t)]
        parts += [f"![{cap}](figures/{name})" for name, cap in (captions or {}).get(t.key, [])]
    return "\n\n".join(parts) + "\n"


CSV_COLUMNS = ["technique", "arch", "task", "seed", "control", "status", "score", "n_examples", "reason",
               "error", "organism_accuracy", "wall_s", "peak_mem_mb", "metrics", "key", "created"]


def cells_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """One tidy row per cell: scalar columns, the traceback's last line, metrics as JSON."""
    df = cells.copy()
    df["n_examples"] = df.per_example.map(lambda p: len(p) if isinstance(p, list) else 0)
    df["error"] = df.error.map(tables.last_line)
    # scalar metrics only: list-valued ones (such as stored Gram matrices) stay in the store
    df["metrics"] = df.metrics.map(lambda m: json.dumps({k: v for k, v in m.items() if not isinstance(v, list)},
                                                        sort_keys=True, default=str) if m else "")
    return df[[c for c in CSV_COLUMNS if c in df]].sort_values(["technique", "arch", "task", "seed", "control"])


EMPTY = f"# {TITLE}\n\n_the store holds no cells yet_\n"


def render_files(d: ReportData, formats=FORMATS) -> dict[str, bytes]:
    """Every requested file's content, by path relative to the results directory, figures
    first and LEADERBOARD.md last (it links the figures)."""
    settings = d.settings
    if d.cells.empty:  # nothing to score yet; a known-answer track stands alone
        track = report_known_answer.tables(d.localisation, settings.reference, settings)
        return {"LEADERBOARD.md": (EMPTY + "".join(f"\n## {t.title}\n\n{t.note}\n\n{_md_table(t)}\n"
                                                   for t in track)).encode()}
    from archbench import figures as figs  # matplotlib: imported only when a report is drawn

    tabs = build_tables(d)
    lines = intro(settings, d.cells)
    drawn: dict[str, bytes] = {}
    if {"png", "html"} & set(formats):
        main = main_rows(d)
        fig_formats = figs.FORMATS if "png" in formats else ("png",)
        drawn = figs.render(main.cells, main.summary, settings, fig_formats)
        axis_figs = {f"development_{k}": f for k, f in report_axes.development_figures(d.cells).items()}
        axis_figs |= {f"scale_{k}": f for k, f in report_axes.scale_figures(d.verdicts).items()}
        axis_figs |= findings_figures.render(d.cells, d.organisms)
        drawn |= {f"{stem}.{fmt}": data for stem, fig in axis_figs.items()
                  for fmt, data in figs.save(fig, fig_formats).items()}
    pngs = {name: data for name, data in drawn.items() if name.endswith(".png")}
    files: dict[str, bytes] = {}
    if "png" in formats:  # each figure as PNG, and as SVG and PDF for papers
        files |= {f"figures/{name}": data for name, data in drawn.items()}
    captions = figure_captions(pngs) if "png" in formats else {}
    if "tex" in formats:
        tex_figs = {k: [(f"figures/{n.removesuffix('.png')}.pdf", c) for n, c in v] for k, v in captions.items()}
        files[f"{report_latex.TABLES_FILE}.tex"] = report_latex.tables_file(TITLE, tabs).encode()
        files["leaderboard.tex"] = report_latex.render(TITLE, lines, tabs, tex_figs).encode()
    if "csv" in formats:
        files["cells.csv"] = cells_frame(d.cells).to_csv(index=False).encode()
    if "html" in formats:
        html_figs = {k: [(pngs[n], c) for n, c in v] for k, v in figure_captions(pngs).items()}
        files["index.html"] = report_html.render(TITLE, lines, tabs, html_figs).encode()
    if "md" in formats:
        files["LEADERBOARD.md"] = markdown(tabs, settings, captions, d.cells).encode()
    return files


def _source(store: Store, settings: verdict.Settings, formats, scoring: int | None) -> str:
    """The digest of everything a rendering depends on: the store's cells and organisms,
    the settings, the formats and the code that renders them."""
    from archbench.store import provenance

    # `scoring` only selects rows: a store of one version renders (and digests) the same either way
    payload = {"store": store.content_digest(scoring), "settings": repr(settings), "formats": sorted(formats),
               "archbench": provenance()["archbench"], "git": provenance()["git_sha"]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(results_dir: str | Path, settings: verdict.Settings = verdict.Settings(),
          formats=FORMATS, scoring: int | None = None) -> Path:
    """Write the requested formats into `results_dir` (each file atomically) and record
    what they were rendered from; return the path of LEADERBOARD.md."""
    root = Path(results_dir)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown report format(s) {', '.join(sorted(unknown))}; choose from {', '.join(FORMATS)}")
    with reading(root) as store:
        source = _source(store, settings, formats, scoring)  # before reading: a cell landing later re-renders
        files = render_files(_load(store, root, settings, scoring), formats)
        if any(name.startswith("figures/") for name in files):
            (root / "figures").mkdir(exist_ok=True)
        for name, data in files.items():
            write_atomic(root / name, data)
        if not store.copy:  # a temporary copy of archbench.db.gz keeps no record
            store.put_reports(source, {name: _sha(data) for name, data in files.items()})
    return root / "LEADERBOARD.md"


def is_current(results_dir: str | Path, settings: verdict.Settings = verdict.Settings(),
               formats=FORMATS, scoring: int | None = None) -> bool:
    """Whether the report files in `results_dir` are exactly what `write` would produce now:
    the last finished rendering was of the same cells and settings, and every file it wrote
    is there, byte for byte."""
    root = Path(results_dir)
    with reading(root) as store:
        if store.copy:
            return False
        source = _source(store, settings, formats, scoring)
        record = store.reports()
    if "LEADERBOARD.md" not in record:
        return False
    for name, (rendered_from, sha) in record.items():
        path = root / name
        if rendered_from != source or not path.is_file() or _sha(path.read_bytes()) != sha:
            return False
    return True


def render(results_dir: str | Path, settings: verdict.Settings = verdict.Settings(),
           scoring: int | None = None) -> str:
    """LEADERBOARD.md's text, without writing anything (figures not linked)."""
    d = load(results_dir, settings, scoring)
    if d.cells.empty:
        return EMPTY
    return markdown(build_tables(d), settings, cells=d.cells)

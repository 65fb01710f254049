"""The report from a synthetic store: every file is written, holds the known numbers, and needs no model.

The store is filled through the store API with fabricated cells whose scores are known
exactly (no training): probe and patching with per-depth details, attribution without,
cka rows for the similarity table, a gate failure, an `error` row and an `n/a` row.
"""

import csv
import html.parser
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from archbench import report
from archbench.cli import main
from archbench.report_latex import escape
from archbench.report_tables import floor_digits
from archbench.store import RunSpec, Store

N = 40  # examples per cell
SEEDS = (0, 1, 2)
WALL = 0.25  # seconds per cell
ACCURACY = {"transformer": (1.0, 1.0, 1.0), "mamba": (0.95, 0.97, 0.99), "kan": (0.8996, 0.95, 0.97)}


def fraction(p: float) -> list[float]:
    """N 0/1 values whose mean is exactly p (p a multiple of 1/N)."""
    k = round(p * N)
    return [1.0] * k + [0.0] * (N - k)


def put(store, technique, arch, task, seed, control, per_example=None, details=(), status="ok", **extra):
    row = {"status": status, "wall_s": WALL, "organism_accuracy": ACCURACY[arch][seed], **extra}
    if status == "ok":
        row |= {"score": float(np.clip(np.mean(per_example), 0, 1)), "per_example": per_example,
                "details": list(details), "metrics": {"best_layer": 1}}
    store.put_cell(RunSpec(technique, arch, task, seed, control), row)


def depth_details(key, values, **flags):
    return [{"site": f"blocks.{i}.resid_post", "role": "stream", "layer": i, key: v, **flags}
            for i, v in enumerate(values)]


# Scores of trained organisms (controls score 0): transformer 1.0, mamba half of it (rho 0.5).
TRAINED = {"transformer": 1.0, "mamba": 0.5, "kan": 0.9}
CKA = {"transformer": 0.9, "mamba": 0.8, "kan": 0.7}


def fill(results):
    with Store(results) as store:
        for arch, accs in ACCURACY.items():
            for task in ("modadd", "count"):
                for seed in SEEDS:
                    acc = accs[seed]
                    store.put_organism({"organism": f"{arch}/{task}/{seed}", "arch": arch, "task": task,
                                        "seed": seed, "accuracy": acc, "seconds": 2.0},
                                       None if acc >= 0.9 else f"accuracy {acc:.2f} < 0.90")
                    for control in (False, True):
                        if acc < 0.9:  # the runner writes gate failures as n/a cells
                            for tech in ("probe", "patching", "attribution", "cka"):
                                put(store, tech, arch, task, seed, control, status="n/a",
                                    reason=f"gate failed: accuracy {acc:.2f} < 0.90")
                            continue
                        p = 0.0 if control else TRAINED[arch]
                        put(store, "probe", arch, task, seed, control, fraction(p),
                            depth_details("selectivity", [0.1, p, p / 2]))
                        put(store, "patching", arch, task, seed, control, fraction(p),
                            depth_details("normalised", [1.0, p, 1.0], trivial=False)[:2]
                            + [{"site": "x", "layer": 2, "normalised": 1.0, "trivial": True}])
                        put(store, "attribution", arch, task, seed, control, fraction(0.5 if control else 0.75))
                        c = 0.2 if control else CKA[arch]
                        put(store, "cka", arch, task, seed, control, [c] * N, depth_details("cka", [c / 2, c]))
        put(store, "logit_lens", "mamba", "modadd", 0, False, status="error",
            error="Traceback (most recent call last):\n  ...\nRuntimeError: boom in the lens")
        put(store, "logit_lens", "mamba", "modadd", 0, True, status="n/a", reason="mamba lacks readout")
    return results


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    results = fill(tmp_path_factory.mktemp("r"))
    report.write(results)
    return results


CI = r"\[\d\.\d\d, \d\.\d\d\]"


def md_row(text, first):
    return next(line for line in text.splitlines() if line.startswith(f"| {first} |"))


def test_every_file_is_written(written):
    for name in ("LEADERBOARD.md", "leaderboard.tex", "leaderboard_table.tex", "cells.csv", "index.html",
                 "figures/transfer_matrix.png", "figures/depth_probe.png", "figures/depth_patching.png",
                 "figures/depth_cka.png"):
        assert (written / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (written / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((written / "figures").glob("depth_attribution.*"))  # no per-depth details


def test_markdown_holds_the_known_numbers(written):
    md = (written / "LEADERBOARD.md").read_text()
    # transfer matrix: transformer first, then alphabetical; kan's rho comes from its two gated-in seeds
    assert re.fullmatch(rf"\| probe \| ✓ ρ=1.00 \[1.00, 1.00\] \| ✓\* ρ=0.90 {CI} \| ◐ ρ=0.50 {CI} \|",
                        md_row(md, "probe"))
    assert "∅ no-reference" in md_row(md, "logit_lens")  # no reference cells at all
    # per-task table: trained and control with seed-level CIs, effect, rho, verdict (* provisional), seeds; seeds with
    # equal means have no spread, so their CIs are exact
    assert "| modadd | transformer | 1.00 [1.00, 1.00] | 0.00 [0.00, 0.00] | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] | ✓ transfers | 3 |" in md
    assert re.search(rf"\| modadd \| mamba \| 0.50 {CI} \| 0.00 \[0.00, 0.00\] \| 0.50 {CI} \| 0.50 {CI} \| ◐ partial \| 3 \|", md)
    assert re.search(rf"\| count \| kan \| 0.90 {CI} \| 0.00 \[0.00, 0.00\] \| 0.90 {CI} \| 0.90 {CI} \| ✓\* transfers \| 2 \|", md)
    assert "| modadd | mamba |  |  |  |  | – n/a |  | error; mamba lacks readout |" in md  # logit_lens
    lo, hi = re.search(r"\| modadd \| mamba \| 0\.50 \[(\d\.\d\d), (\d\.\d\d)\]", md).groups()
    assert float(lo) == 0.5 == float(hi)  # every seed's mean is exactly 0.5: a seed-level interval has no width
    # behaviour: the minimum is rounded down, and the failed gate is counted, not hidden
    beh = md[md.index("## Behaviour"):md.index("## Architecture similarity")]
    assert "min 0.899 · 2/3 pass ✗" in beh and "1.000 · min 1.000 · 3/3 pass |" in beh
    assert "min 0.90 " not in beh
    # errors and provenance
    assert "RuntimeError: boom in the lens" in md
    n_cells = 2 * 3 * 3 * 4 * 2 + 2
    assert f"compute: cells (sum of wall_s) | {n_cells * WALL:.1f} s" in md
    assert "organism training | 36.0 s" in md and "behavioural gate | 0.90" in md
    assert "seeds | 0, 1, 2" in md and "torch" in md


def test_similarity_table_bounds_cka_through_the_ground_truth(written):
    md = (written / "LEADERBOARD.md").read_text()
    sim = md[md.index("## Architecture similarity"):md.index("## attribution")]
    a, b = np.arccos(CKA["transformer"]), np.arccos(CKA["mamba"])
    lo, hi = np.cos(a + b), np.cos(a - b)
    row = md_row(sim, "transformer")
    assert row.startswith("| transformer | 0.90 | 1 |") and f"{lo:.2f}–{hi:.2f}" in row
    assert f"{lo:.2f}–{hi:.2f}" in md_row(sim, "mamba")  # symmetric


def test_cells_csv_is_one_tidy_row_per_cell(written):
    with open(written / "cells.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 3 * 4 * 2 + 2
    assert {"technique", "arch", "task", "seed", "control", "status", "score", "wall_s", "metrics"} <= set(rows[0])
    status = {r["status"] for r in rows}
    assert status == {"ok", "n/a", "error"}
    cell = next(r for r in rows if (r["technique"], r["arch"], r["task"], r["seed"], r["control"])
                == ("probe", "mamba", "count", "1", "False"))
    assert float(cell["score"]) == 0.5 and int(cell["n_examples"]) == N and json.loads(cell["metrics"]) == {"best_layer": 1}
    err = next(r for r in rows if r["status"] == "error")
    assert err["error"] == "RuntimeError: boom in the lens"  # the last line, not the traceback


def test_latex_is_escaped_and_balanced(written):
    doc = (written / "leaderboard.tex").read_text()
    assert doc.startswith(r"\documentclass") and doc.rstrip().endswith(r"\end{document}")
    assert r"\usepackage{booktabs" in doc and r"\input{leaderboard_table}" in doc
    tex = doc + (written / "leaderboard_table.tex").read_text()
    assert r"logit\_lens" in tex and r"\toprule" in tex
    body = "\n".join(line for line in tex.splitlines()  # file names keep their underscores
                     if "includegraphics" not in line and "leaderboard_table" not in line)
    assert not re.search(r"(?<!\\)_", body), "an unescaped underscore"
    assert not re.search(r"[✓◐✗∅ρ]", tex)  # glyphs become math symbols
    assert body.count("{") == body.count("}")
    for env in ("tabular", "longtable", "center"):
        assert tex.count(rf"\begin{{{env}}}") == tex.count(rf"\end{{{env}}}") > 0
    assert escape("a_b & 50% #1 {x} ~ ^ \\") == r"a\_b \& 50\% \#1 \{x\} \textasciitilde{} \textasciicircum{} \textbackslash{}"


def test_latex_tables_file_is_the_tables_alone(written):
    tables = (written / "leaderboard_table.tex").read_text()
    doc = (written / "leaderboard.tex").read_text()
    code = "\n".join(line for line in tables.splitlines() if not line.startswith("%"))
    for preamble in (r"\documentclass", r"\usepackage", r"\begin{document}", r"\end{document}", r"\section"):
        assert preamble not in code, preamble
    assert r"\usepackage{booktabs,longtable,array,amssymb,graphicx}" in tables.splitlines()[1]  # says what it needs
    # matrix tables are captioned, labelled floats; long lists captioned longtables
    # matrices: transfer, behaviour, controls above 0.2, similarity; lists: 5 techniques, errors, provenance
    assert code.count(r"\begin{table}") == 4 and code.count(r"\begin{longtable}") == 7
    for key in ("transfer", "behaviour", "similarity", "task-probe", "task-logit-lens", "provenance"):
        assert rf"\label{{tab:{key}}}" in code, key
    assert re.search(r"\\begin\{longtable\}\{[^\n]*\}\n\\caption\[\{probe: scores per task\}\]\{.*\}\\label\{tab:task-probe\} \\\\", code)
    assert r"\checkmark{} transfers" in code.split(r"\label{tab:transfer}")[0]  # the legend travels with the matrix
    assert r"\toprule" not in doc  # the document inputs the tables rather than repeating them


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_tables_input_into_a_paper(written, tmp_path):
    shutil.copy(written / "leaderboard_table.tex", tmp_path)
    (tmp_path / "paper.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs,longtable,array,amssymb,graphicx}\n\\begin{document}\n"
        "Table~\\ref{tab:transfer} shows the transfer matrix.\n\\input{leaderboard_table}\n\\end{document}\n")
    for _ in range(2):  # the second pass resolves \ref
        out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-3000:]
    assert "undefined references" not in out.stdout and (tmp_path / "paper.pdf").stat().st_size > 0


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles(written, tmp_path):
    shutil.copytree(written, tmp_path / "r")
    out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "leaderboard.tex"],
                         cwd=tmp_path / "r", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
    assert (tmp_path / "r" / "leaderboard.pdf").stat().st_size > 0


class _Page(html.parser.HTMLParser):
    VOID = {"meta", "img", "br", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.urls, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def test_html_is_self_contained_and_sortable(written):
    text = (written / "index.html").read_text()
    page = _Page()
    page.feed(text)
    assert page.stack == []
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls), page.urls
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert page.tags.count("img") == len(list((written / "figures").glob("*.png")))
    assert text.count('class="sortable"') == page.tags.count("table") > 5
    assert "addEventListener" in text and re.search(rf"◐ ρ=0.50<br>{CI}", text)


def _cells_of(text: str) -> list[tuple[str, str]]:
    """(class attribute, text) of every <td> of a page."""
    return [(m.group(1) or "", html.unescape(re.sub(r"<[^>]+>", " ", m.group(2))).strip())
            for m in re.finditer(r'<td(?: class="([^"]*)"[^>]*)?>(.*?)</td>', text)]


def test_html_colours_verdict_cells_with_a_legend(written):
    from archbench.report_html import STYLE, VERDICT_COLOURS, slug
    from archbench.verdict import GLYPHS

    text = (written / "index.html").read_text()
    glyph_class = {g: f"v-{slug(v)}" for v, g in GLYPHS.items()}
    coloured = [(c, t) for c, t in _cells_of(text) if c]
    assert coloured and all(c == glyph_class[t[0]] for c, t in coloured)  # the class is the glyph's verdict
    transfer = text[text.index('<section id="transfer">'):text.index('<section id="behaviour">')]
    assert {c for c, _ in _cells_of(transfer) if c} == {"v-transfers", "v-partial", "v-no-reference"}
    assert all(c for c, t in _cells_of(transfer) if t[:1] in glyph_class)  # every verdict cell is coloured
    probe = text[text.index('<section id="task-probe">'):]
    probe = probe[:probe.index("</section>")]
    assert ("v-partial", "◐ partial") in _cells_of(probe) and ("v-transfers", "✓* transfers") in _cells_of(probe)
    behaviour = text[text.index('<section id="behaviour">'):text.index('<section id="similarity">')]
    assert not any(c for c, _ in _cells_of(behaviour))  # "… 2/3 pass ✗" is a count, not a verdict
    for v, colour in VERDICT_COLOURS.items():  # six verdicts, six colours, each in the legend and the style
        assert f'<span class="v v-{slug(v)}">{GLYPHS[v]} {v}</span>' in text
        assert f".v-{slug(v)} {{ background: {colour}; }}" in STYLE
    assert len(set(VERDICT_COLOURS.values())) == len(GLYPHS) == 6


def test_figures_in_png_svg_and_pdf(written):
    for stem in ("transfer_matrix", "depth_probe", "depth_patching", "depth_cka"):
        assert (written / "figures" / f"{stem}.svg").read_text().lstrip().startswith(("<?xml", "<svg")), stem
        assert (written / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF-"), stem
    for svg in (written / "figures").glob("*.svg"):  # self-contained: every reference is internal or inline
        refs = re.findall(r'href="([^"]*)"', svg.read_text())
        assert refs and all(r.startswith(("#", "data:image/png;base64,")) for r in refs), svg.name
    assert "<image" not in (written / "figures" / "depth_probe.svg").read_text()  # lines and bands stay vectors
    tex = (written / "leaderboard.tex").read_text()
    assert r"{figures/depth_probe.pdf}" in tex and ".png}" not in tex  # the paper gets vector figures


def _depth_cells(values_by_seed, arch="transformer", control=False):
    import pandas as pd

    return pd.DataFrame([{"technique": "probe", "status": "ok", "arch": arch, "task": "modadd", "seed": seed,
                          "control": control, "details": depth_details("selectivity", values)}
                         for seed, values in enumerate(values_by_seed)])


def test_depth_bands_are_seed_level_t_intervals():
    import pandas as pd
    from scipy import stats

    from archbench.figures import depth_frame

    cells = pd.concat([_depth_cells([[0.1, 0.2], [0.1, 0.4], [0.1, 0.6]]), _depth_cells([[0.5, 0.5]], arch="kan")])
    df = depth_frame(cells, "probe").set_index(["arch", "layer"])
    half = stats.t.ppf(0.975, 2) * 0.2 / np.sqrt(3)  # values 0.2, 0.4, 0.6: sd 0.2
    row = df.loc[("transformer", 1)]
    assert row.value == pytest.approx(0.4) and row.n_seeds == 3
    assert (row.lo, row.hi) == (pytest.approx(0.4 - half), pytest.approx(0.4 + half))
    assert df.loc[("transformer", 0)].lo == pytest.approx(0.1)  # no spread, no width
    assert np.isnan(df.loc[("kan", 1)].lo)  # one seed: no band rather than a made-up one


def test_depth_figure_draws_bands_and_puts_the_reference_first():
    import pandas as pd
    from matplotlib.collections import PolyCollection

    from archbench.figures import depth_profile_figure

    cells = pd.concat([_depth_cells([[0.2, 0.5], [0.3, 0.7], [0.1, 0.6]], arch="mamba"),
                       _depth_cells([[0.1, 0.9], [0.2, 0.8], [0.3, 0.95]]),
                       _depth_cells([[0.0, 0.1], [0.1, 0.0], [0.0, 0.2]], control=True)])
    fig = depth_profile_figure(cells, "probe", "transformer")
    ax = fig.axes[0]
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 3  # trained x 2 archs + the control
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["transformer (reference)"].get_linewidth() > lines["mamba"].get_linewidth()
    assert ax.get_lines()[0].get_label() == "transformer (reference)"  # drawn first
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["transformer (reference)", "mamba"]


def test_rendering_is_deterministic_and_reads_only_the_store(written, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(written, again)
    for name in ("LEADERBOARD.md", "leaderboard.tex", "leaderboard_table.tex", "cells.csv", "index.html"):
        (again / name).unlink()
    shutil.rmtree(again / "figures")
    report.write(again)
    for name in ("LEADERBOARD.md", "leaderboard.tex", "leaderboard_table.tex", "cells.csv", "index.html",
                 "figures/depth_probe.png", "figures/depth_probe.svg", "figures/depth_probe.pdf",
                 "figures/transfer_matrix.svg", "figures/transfer_matrix.pdf"):
        assert (again / name).read_bytes() == (written / name).read_bytes(), name


def test_cli_formats_and_bad_format(tmp_path, capsys):
    results = tmp_path / "r"
    with Store(results) as store:  # a store of error and n/a rows only
        put(store, "probe", "mamba", "modadd", 0, False, status="error", error="ValueError: nope")
        put(store, "probe", "mamba", "modadd", 0, True, status="n/a", reason="no stream")
    assert main(["report", "--results", str(results), "--format", "md,csv"]) == 0
    assert (results / "LEADERBOARD.md").exists() and (results / "cells.csv").exists()
    assert not (results / "index.html").exists() and not (results / "figures").exists()
    md = (results / "LEADERBOARD.md").read_text()
    assert "ValueError: nope" in md and "– n/a" in md
    report.write(results)  # every format, figures included, from rows without a single score
    assert (results / "index.html").exists() and (results / "figures" / "transfer_matrix.png").exists()
    capsys.readouterr()
    assert main(["report", "--results", str(results), "--format", "md,pdf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("archbench: error:") and "pdf" in err and err.strip().count("\n") == 0


def test_floor_digits_never_rounds_up():
    assert floor_digits(0.8996) == "0.899" and floor_digits(0.29) == "0.290" and floor_digits(1.0) == "1.000"


def _browser():
    try:
        import playwright  # noqa: F401
    except ImportError:
        return None
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason="needs Playwright and a Chromium binary")
def test_html_in_headless_chromium(written, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "html_check.py"
    spec = importlib.util.spec_from_file_location("html_check", path)
    html_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(html_check)
    shot = tmp_path / "index.png"
    assert html_check.check(written / "index.html", shot, _browser()) == []
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_empty_store(tmp_path):
    Store(tmp_path).close()
    assert "no cells yet" in report.write(tmp_path).read_text()


def test_report_refuses_to_mix_scoring_versions(tmp_path, capsys):
    from archbench.cli import main

    fill(tmp_path)
    with Store(tmp_path) as store:
        store.db.execute("UPDATE cells SET scoring = 1 WHERE technique = 'probe'")  # an older version's cells
    assert main(["report", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scoring versions 1, 2" in err and "--scoring 2" in err
    assert main(["report", "--results", str(tmp_path), "--scoring", "2"]) == 0
    assert "| probe |" not in (tmp_path / "LEADERBOARD.md").read_text()

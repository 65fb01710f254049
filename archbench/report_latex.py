"""`leaderboard.tex`: the report's tables as a standalone LaTeX document (booktabs).

Compiles with pdflatex and packages from a basic TeX installation (booktabs, amssymb,
graphicx, longtable, geometry). Matrix-shaped tables are `tabular`s shrunk to the text width
only when wider; long lists are `longtable`s that break across pages. Every cell goes through
`escape`: LaTeX specials (the underscores of `logit_lens`!) are escaped and the verdict glyphs
and Greek letters become math-mode symbols, since pdflatex has no Unicode fonts for them.
To put one table in a paper, copy its `tabular`/`longtable` block and the preamble's packages.
"""

from __future__ import annotations

import re

from archbench import verdict
from archbench.report_tables import Table

SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}
SYMBOLS = {"✓": r"\checkmark{}", "◐": r"$\sim$", "✗": r"$\times$", "∅": r"$\emptyset$", "–": "--",
           "—": "---", "−": "$-$", "ρ": r"$\rho$", "θ": r"$\theta$", "×": r"$\times$", "·": r"$\cdot$",
           "≥": r"$\geq$", "≤": r"$\leq$", "…": r"\ldots{}", "’": "'", "“": "``", "”": "''"}
# Code points pdflatex's utf8 input encoding knows (Latin-1 and Latin Extended-A);
# anything else that is not in SYMBOLS is replaced rather than breaking the build.
SAFE_UNICODE = 0x17F


def escape(text: str) -> str:
    out = []
    for ch in str(text):
        if ch in SPECIALS:
            out.append(SPECIALS[ch])
        elif ch in SYMBOLS:
            out.append(SYMBOLS[ch])
        elif ord(ch) > SAFE_UNICODE:
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def cell(text: str) -> str:
    """An escaped cell; a cell with line breaks becomes a one-column nested tabular."""
    # "{}" keeps a line that starts with "[" from being read as the optional argument of "\\"
    lines = [("{}" if x.startswith("[") else "") + escape(x) for x in str(text).split("\n")]
    return lines[0] if len(lines) == 1 else r"\begin{tabular}[c]{@{}c@{}}" + r" \\ ".join(lines) + r"\end{tabular}"


def _tabular(t: Table) -> str:
    spec = "l" + "c" * (len(t.header) - 1)
    head = " & ".join(rf"\textbf{{{escape(h)}}}" for h in t.header) + r" \\"
    body = "\n".join(" & ".join(cell(c) for c in row) + r" \\" for row in t.rows)
    return "\n".join([
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        rf"\begin{{tabular}}{{@{{}}{spec}@{{}}}}", r"\toprule", head, r"\midrule", body, r"\bottomrule",
        r"\end{tabular}}"])


def _longtable(t: Table) -> str:
    n = len(t.header)
    spec = "l" * (n - 1) + r">{\raggedright\arraybackslash}p{0.28\linewidth}"
    head = " & ".join(rf"\textbf{{{escape(h)}}}" for h in t.header) + r" \\"
    body = "\n".join(" & ".join(cell(c) for c in row) + r" \\" for row in t.rows)
    return "\n".join([
        rf"\begin{{longtable}}{{@{{}}{spec}@{{}}}}", r"\toprule", head, r"\midrule", r"\endfirsthead",
        r"\toprule", head, r"\midrule", r"\endhead", r"\bottomrule", r"\endfoot", body, r"\end{longtable}"])


def table(t: Table) -> str:
    """One table: a section title, its note, then the table itself."""
    block = _longtable(t) if t.shape == "list" else _tabular(t)
    label = re.sub(r"[^A-Za-z0-9-]", "-", t.key)
    return "\n".join([rf"\section*{{{escape(t.title)}}}\label{{tab:{label}}}", escape(t.note), "",
                      r"\begin{center}" if t.shape != "list" else "", block,
                      r"\end{center}" if t.shape != "list" else "", ""])


def figure(path: str, caption: str) -> str:
    return "\n".join([r"\begin{center}", rf"\includegraphics[width=\linewidth,height=0.8\textheight,keepaspectratio]{{{path}}}",
                      rf"\\ \small {escape(caption)}", r"\end{center}", ""])


def render(title: str, intro: list[str], tables: list[Table],
           figures: dict[str, list[tuple[str, str]]] | None = None) -> str:
    """A complete document; `figures` maps a table key to (PNG path relative to the .tex, caption) pairs
    shown after that table."""
    figures = figures or {}
    legend = ", ".join(f"{escape(g)} {escape(k)}" for k, g in verdict.GLYPHS.items())
    parts = [r"\documentclass[10pt]{article}",
             r"\usepackage[T1]{fontenc}", r"\usepackage[utf8]{inputenc}",
             r"\usepackage[a4paper,landscape,margin=1.5cm]{geometry}",
             r"\usepackage{booktabs,longtable,array,amssymb,graphicx}",
             r"\setlength{\LTpre}{4pt}\setlength{\LTpost}{4pt}",
             r"\begin{document}", r"\footnotesize",
             rf"{{\Large\bfseries {escape(title)}}}", "",
             *[escape(p) + "\n" for p in intro], f"Verdicts: {legend}.", ""]
    for t in tables:
        parts.append(table(t))
        for path, caption in figures.get(t.key, []):
            parts.append(figure(path, caption))
    parts.append(r"\end{document}")
    return "\n".join(parts) + "\n"

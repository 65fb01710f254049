r"""The report's tables in LaTeX (booktabs): `leaderboard_table.tex` and `leaderboard.tex`.

`leaderboard_table.tex` is the tables alone, to `\input{leaderboard_table}` in a paper: no
preamble, no `\begin{document}`, one `table` float (caption and `\label{tab:<key>}`) per
matrix-shaped table and one captioned `longtable` per long list; its first lines name the
packages it needs. `leaderboard.tex` is a standalone document (title, how to read the tables,
the verdict legend) that `\input`s it and adds the figures. Both compile with pdflatex and
packages from a basic TeX installation (booktabs, amssymb, graphicx, longtable, array,
geometry). Matrix-shaped tables are shrunk to the text width only when wider. Every cell goes
through `escape`: LaTeX specials (the underscores of `logit_lens`!) are escaped and the
verdict glyphs and Greek letters become math-mode symbols, since pdflatex has no Unicode
fonts for them.
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


PACKAGES = r"\usepackage{booktabs,longtable,array,amssymb,graphicx}"
TABLES_FILE = "leaderboard_table"  # .tex, beside leaderboard.tex


def label(t: Table) -> str:
    return "tab:" + re.sub(r"[^A-Za-z0-9-]", "-", t.key)


def legend() -> str:
    return "Verdicts: " + ", ".join(f"{escape(g)} {escape(k)}" for k, g in verdict.GLYPHS.items()) + "."


def caption(t: Table) -> str:
    r"""`\caption[title]{title. note}`: the note says how to read the table, wherever it is pasted."""
    note = escape(t.note) + (" " + legend() if t.key == "transfer" else "")
    return rf"\caption[{{{escape(t.title)}}}]{{{escape(t.title)}. {note}}}\label{{{label(t)}}}"


def _tabular(t: Table) -> str:
    spec = "l" + "c" * (len(t.header) - 1)
    head = " & ".join(rf"\textbf{{{escape(h)}}}" for h in t.header) + r" \\"
    body = "\n".join(" & ".join(cell(c) for c in row) + r" \\" for row in t.rows)
    return "\n".join([
        r"\begin{table}[htbp]", r"\centering\footnotesize", caption(t),
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        rf"\begin{{tabular}}{{@{{}}{spec}@{{}}}}", r"\toprule", head, r"\midrule", body, r"\bottomrule",
        r"\end{tabular}}", r"\end{table}"])


def _longtable(t: Table) -> str:
    n = len(t.header)
    spec = "l" * (n - 1) + r">{\raggedright\arraybackslash}p{0.28\linewidth}"
    head = " & ".join(rf"\textbf{{{escape(h)}}}" for h in t.header) + r" \\"
    body = "\n".join(" & ".join(cell(c) for c in row) + r" \\" for row in t.rows)
    return "\n".join([
        r"{\footnotesize", rf"\begin{{longtable}}{{@{{}}{spec}@{{}}}}", caption(t) + r" \\",
        r"\toprule", head, r"\midrule", r"\endfirsthead",
        r"\toprule", head, r"\midrule", r"\endhead", r"\bottomrule", r"\endfoot", body, r"\end{longtable}}"])


def table(t: Table) -> str:
    """One table: a comment naming it, then its `table` float or `longtable`."""
    return "\n".join([f"% ---- {escape(t.title)} ({label(t)})", _longtable(t) if t.shape == "list" else _tabular(t), ""])


def tables_file(title: str, tables: list[Table]) -> str:
    r"""leaderboard_table.tex: the tables alone, for `\input` into any document."""
    head = [f"% {escape(title)}: the tables alone. In your document: \\input{{{TABLES_FILE}}}, with",
            f"% {PACKAGES} in the preamble.",
            "% Written by `archbench report` from the results store; a rerun overwrites it.", ""]
    return "\n".join(head + [table(t) for t in tables])


def figure(path: str, caption: str) -> str:
    return "\n".join([r"\begin{center}", rf"\includegraphics[width=\linewidth,height=0.8\textheight,keepaspectratio]{{{path}}}",
                      rf"\\ \small {escape(caption)}", r"\end{center}", ""])


def render(title: str, intro: list[str], tables: list[Table],
           figures: dict[str, list[tuple[str, str]]] | None = None) -> str:
    r"""leaderboard.tex: a complete document that `\input`s `tables_file` (written beside it);
    `figures` maps a table key to (figure path relative to the .tex, caption) pairs, shown after
    the tables in table order."""
    figures = figures or {}
    parts = [r"\documentclass[10pt]{article}",
             r"\usepackage[T1]{fontenc}", r"\usepackage[utf8]{inputenc}",
             r"\usepackage[a4paper,landscape,margin=1.5cm]{geometry}", PACKAGES,
             r"\setlength{\LTpre}{4pt}\setlength{\LTpost}{4pt}",
             r"\begin{document}", r"\footnotesize",
             rf"{{\Large\bfseries {escape(title)}}}", "",
             *[escape(p) + "\n" for p in intro], legend(), "",
             rf"\input{{{TABLES_FILE}}}", ""]
    shown = [(path, cap) for t in tables for path, cap in figures.get(t.key, [])]
    if shown:
        parts += [r"\clearpage", r"\section*{Figures}", *[figure(path, cap) for path, cap in shown]]
    parts.append(r"\end{document}")
    return "\n".join(parts) + "\n"

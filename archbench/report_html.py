"""`index.html`: the report as one self-contained static page.

No network request of any kind: styles and the table-sorting script are inline, figures are
embedded as base64 PNG `data:` URIs, and nothing links to a CDN or a font service, so the
page works offline, from a file:// URL or as an e-mail attachment. Clicking a column header
sorts its table (numerically when both cells start with a number, otherwise as text; a
second click reverses). Verdict cells (the transfer matrix, the per-task tables' verdict
column) are coloured by verdict, with a legend at the top; the glyph stays in the text, so
the colour is never the only cue. `bench/html_check.py` opens the page in headless Chromium and checks
that it makes no request and logs no error.
"""

from __future__ import annotations

import base64
import html

from archbench import verdict
from archbench.report_tables import Table

# Background of a verdict cell: green works as well as on the reference, amber works but
# weaker, red fails; the three verdicts that say nothing about transfer are pale and cool.
VERDICT_COLOURS = {"transfers": "#c7e9c0", "partial": "#fde9a9", "fails": "#f7c1bb",
                   "weak-reference": "#dcd6f0", "no-reference": "#d5e3ef", "n/a": "#e8e8e8"}
GLYPH_VERDICT = {g: v for v, g in verdict.GLYPHS.items()}


def slug(v: str) -> str:
    """A CSS class suffix for a verdict ("n/a" -> "na")."""
    return v.replace("/", "")


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 96em;
       padding: 0 1.5em; color: #1b1b1b; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-variant-numeric: tabular-nums; }
th, td { padding: .25em .6em; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid #444; cursor: pointer; user-select: none; white-space: nowrap; }
thead th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: .7em; }
thead th[aria-sort="descending"]::after { content: " \\25BC"; font-size: .7em; }
tbody tr:hover { background: #f5f8ff; }
p.note { color: #555; max-width: 80em; } img { max-width: 100%; height: auto; }
nav a { margin-right: 1em; } code { background: #f2f2f2; padding: 0 .2em; }
span.v { display: inline-block; padding: .05em .5em; margin: 0 .3em .3em 0; border-radius: .25em; }
""" + "".join(f".v-{slug(v)} {{ background: {colour}; }}\n" for v, colour in VERDICT_COLOURS.items())

# Sorts a table by the clicked column. A cell that does not start with a letter sorts by its
# first number ("0.91 [0.88, 0.94]", "✓ transfers ρ=0.95 ..."); others sort as text; numbers first.
SCRIPT = """
(function () {
  function key(cell) {
    var t = cell.textContent.trim();
    var m = /^[A-Za-z]/.test(t) ? null : t.match(/[-+]?\\d*\\.?\\d+(e[-+]?\\d+)?/i);
    return m ? parseFloat(m[0]) : t.toLowerCase();
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th").forEach(function (th, col) {
      th.addEventListener("click", function () {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        table.querySelectorAll("thead th").forEach(function (o) { o.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          var c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def verdict_of(text) -> str | None:
    """The verdict a cell shows, from its leading glyph ("◐ ρ=0.50 ...", "✓* transfers"), or None."""
    t = str(text).lstrip()
    return GLYPH_VERDICT.get(t[:1]) if t else None


def verdict_columns(t: Table) -> set[int]:
    """The columns of `t` that hold verdicts: every architecture column of the transfer matrix,
    the `verdict` column of a per-task table, none elsewhere (a "–" there is not a verdict)."""
    if t.key == "transfer":
        return set(range(1, len(t.header)))
    if t.key.startswith("task-"):
        return {i for i, h in enumerate(t.header) if h == "verdict"}
    return set()


def _td(c, coloured: bool) -> str:
    text = "<br>".join(map(_e, str(c).split("\n")))
    v = verdict_of(c) if coloured else None
    return f'<td class="v-{slug(v)}" title="{_e(v)}">{text}</td>' if v else f"<td>{text}</td>"


def legend() -> str:
    items = "".join(f'<span class="v v-{slug(v)}">{_e(g)} {_e(v)}</span>' for v, g in verdict.GLYPHS.items())
    return f'<p class="legend">Verdicts: {items}</p>'


def table(t: Table) -> str:
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in t.header)
    cols = verdict_columns(t)
    body = "\n".join("<tr>" + "".join(_td(c, j in cols) for j, c in enumerate(row)) + "</tr>" for row in t.rows)
    return (f'<section id="{_e(t.key)}"><h2>{_e(t.title)}</h2>\n<p class="note">{_e(t.note)}</p>\n'
            f'<table class="sortable"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>\n')


def figure(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"><figcaption>{_e(alt)}</figcaption></figure>\n'


def render(title: str, intro: list[str], tables: list[Table],
           figures: dict[str, list[tuple[bytes, str]]] | None = None) -> str:
    """The page; `figures` maps a table key to (PNG bytes, caption) pairs shown after that table."""
    figures = figures or {}
    nav = " ".join(f'<a href="#{_e(t.key)}">{_e(t.title)}</a>' for t in tables)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{_e(title)}</h1>", *[f"<p>{_e(p)}</p>" for p in intro],
             legend(), f"<nav>{nav}</nav>"]
    for t in tables:
        parts.append(table(t))
        parts += [figure(png, caption) for png, caption in figures.get(t.key, [])]
        parts.append("</section>")
    parts += [f"<script>{SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"

"""Open a report's index.html in headless Chromium: no console errors, no network, a screenshot.

Usage:
  python bench/html_check.py RESULTS_DIR [--screenshot PATH] [--chromium PATH]

Checks that the page (1) logs no console error and raises no page error, (2) requests
nothing but the file itself (`data:` URIs for the embedded figures are not requests),
(3) has sortable tables: clicking a header reorders the rows, and (4) shows every figure
(decoded, non-zero size). Saves a full-page screenshot (default RESULTS_DIR/index.png).

Needs Playwright (`pip install playwright`). Its own browser download needs the internet; a
system Chromium works too (`apt-get install chromium`): it is found on PATH or given with
--chromium. Exit status: 0 all checks pass, 1 a check failed, 2 no browser or no page.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path


def find_chromium(given: str | None) -> str | None:
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None  # let Playwright try its own download


def check(page_path: Path, screenshot: Path, chromium: str | None = None) -> list[str]:
    """The problems found (empty when the page passes)."""
    from playwright.sync_api import sync_playwright

    url = page_path.resolve().as_uri()
    problems, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            extra = [u for u in requests if u != url and not u.startswith("data:")]
            problems += [f"network request: {u}" for u in extra]

            broken = page.evaluate("""() => Array.from(document.images)
                .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)""")
            problems += [f"figure not shown: {alt}" for alt in broken]
            if page.evaluate("document.images.length") == 0:
                problems.append("no figures on the page")

            tables = page.locator("table.sortable")
            if tables.count() == 0:
                problems.append("no sortable table")
            else:
                problems += _check_sorting(page)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return problems


def _sort_key(text: str):
    """The page script's order: cells not starting with a letter by their first number, first; others as text."""
    t = text.strip()
    m = None if re.match(r"[A-Za-z]", t) else re.search(r"[-+]?\d*\.?\d+(e[-+]?\d+)?", t, re.I)
    return (0, float(m.group(0)), "") if m else (1, 0.0, t.lower())


def _check_sorting(page) -> list[str]:
    """Click the second column header of the longest table twice; the rows must sort both ways."""
    idx = page.evaluate("""() => { const t = Array.from(document.querySelectorAll('table.sortable'));
        let best = 0; t.forEach((x, i) => { if (x.tBodies[0].rows.length > t[best].tBodies[0].rows.length) best = i; });
        return best; }""")
    table = page.locator("table.sortable").nth(idx)
    column = lambda: table.evaluate("t => Array.from(t.tBodies[0].rows).map(r => r.cells[1].textContent)")  # noqa: E731
    header = table.locator("thead th").nth(1)
    header.click()
    up = column()
    header.click()
    down = column()
    problems = []
    if up != sorted(up, key=_sort_key):
        problems.append(f"ascending sort of column 2 gave {up[:5]}...")
    if down != list(reversed(up)):
        problems.append("a second click did not reverse the order")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="results directory holding index.html")
    ap.add_argument("--screenshot", type=Path, help="where to save the screenshot (default RESULTS/index.png)")
    ap.add_argument("--chromium", help="path to a Chromium/Chrome binary (default: found on PATH)")
    args = ap.parse_args(argv)
    page = args.results / "index.html"
    if not page.exists():
        print(f"html_check: no {page}; run `archbench report --results {args.results}` first", file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("html_check: Playwright is not installed (pip install playwright)", file=sys.stderr)
        return 2
    shot = args.screenshot or args.results / "index.png"
    try:
        problems = check(page, shot, find_chromium(args.chromium))
    except Exception as exc:  # no browser: Playwright's download missing and no system Chromium
        if "Executable doesn't exist" in str(exc) or "executable" in str(exc).lower():
            print(f"html_check: no browser to run ({str(exc).splitlines()[0]})", file=sys.stderr)
            return 2
        raise
    for line in problems:
        print(f"FAIL {line}")
    print(f"{'ok' if not problems else f'{len(problems)} problem(s)'}: {page} (screenshot: {shot})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

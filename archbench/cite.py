"""`archbench cite`: BibTeX for archbench and for every method and architecture a run used.

The references live in `archbench/references.bib`; each entry's non-standard `archbench`
field names what it belongs to (`core`, `technique:probe`, `adapter:mamba`, comma-separated),
so a new technique or architecture costs one bib entry. `entries_for(techniques, adapters)`
picks the entries (core ones always, each once, in file order) and `render` prints them
without the `archbench` field. Names with no entry are listed in a BibTeX comment, never
silently dropped. The parser reads the subset of BibTeX the file uses: `@type{key,` then
`name = {braced}`, `"quoted"` or bare values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

TAG = "archbench"  # the field that maps an entry to registry names


@dataclass(frozen=True)
class Entry:
    kind: str  # article, inproceedings, misc, ...
    key: str
    fields: tuple[tuple[str, str], ...]  # (name, raw value with its delimiters), in file order

    def field(self, name: str) -> str | None:
        raw = dict(self.fields).get(name)
        return None if raw is None else raw[1:-1] if raw[:1] in "{\"" else raw

    @property
    def tags(self) -> set[str]:
        return {t.strip() for t in (self.field(TAG) or "").split(",") if t.strip()}

    def bibtex(self) -> str:
        shown = [(n, v) for n, v in self.fields if n != TAG]
        width = max(len(n) for n, _ in shown)
        body = ",\n".join(f"  {n:<{width}} = {v}" for n, v in shown)
        return f"@{self.kind}{{{self.key},\n{body}\n}}"


def _value(text: str, i: int) -> int:
    """The index just past the field value starting at text[i] (braced, quoted or bare)."""
    if text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return j + 1
        raise ValueError(f"unbalanced braces in field value at offset {i}")
    if text[i] == '"':
        j = text.index('"', i + 1)
        return j + 1
    m = re.compile(r"[^,}\s]+").match(text, i)
    if not m:
        raise ValueError(f"empty field value at offset {i}")
    return m.end()


def parse(text: str) -> list[Entry]:
    """The entries of a BibTeX string; text outside entries (comments) is skipped."""
    entries, i = [], 0
    head = re.compile(r"@(\w+)\s*\{\s*([^,\s]+)\s*,")
    field = re.compile(r"\s*([A-Za-z][\w-]*)\s*=\s*")
    while (m := head.search(text, i)) is not None:
        i, fields = m.end(), []
        while True:
            i = len(text) - len(text[i:].lstrip())
            if text[i] == "}":
                i += 1
                break
            f = field.match(text, i)
            if not f:
                raise ValueError(f"entry {m.group(2)}: expected `name = value` at offset {i}")
            end = _value(text, f.end())
            fields.append((f.group(1).lower(), text[f.end():end]))
            i = end
            i = len(text) - len(text[i:].lstrip())
            if text[i] == ",":
                i += 1
        entries.append(Entry(m.group(1).lower(), m.group(2), tuple(fields)))
    return entries


@lru_cache(maxsize=1)
def references() -> tuple[Entry, ...]:
    """The entries of the packaged references.bib."""
    return tuple(parse(files("archbench").joinpath("references.bib").read_text(encoding="utf-8")))


def entries_for(techniques=None, adapters=None) -> tuple[list[Entry], list[str]]:
    """(entries, names without one): core entries plus those of the given names (None: all)."""
    wanted = {"core"}
    wanted |= {f"technique:{t}" for t in techniques} if techniques is not None else set()
    # a researcher's checkpoint (`hf:NAME`) is cited by its own authors, not by archbench's file
    wanted |= {f"adapter:{a}" for a in adapters if not a.startswith("hf:")} if adapters is not None else set()
    every = techniques is None and adapters is None
    picked = [e for e in references() if every or e.tags & wanted]
    covered = set().union(*(e.tags for e in references()))
    missing = sorted(w for w in wanted if w != "core" and w not in covered)
    return picked, missing


def render(techniques=None, adapters=None) -> str:
    """BibTeX text: a comment saying what it covers, the entries, then any uncovered names."""
    from archbench.version import __version__

    picked, missing = entries_for(techniques, adapters)
    scope = ("all techniques and architectures" if techniques is None and adapters is None else
             f"techniques: {', '.join(sorted(techniques or [])) or 'none'}; "
             f"architectures: {', '.join(sorted(adapters or [])) or 'none'}")
    lines = [f"% archbench {__version__}: references for archbench and {scope}"]
    lines += [f"% no reference recorded for {name} (add one to archbench/references.bib)" for name in missing]
    lines += [f"% {name} is your own checkpoint: cite the paper of the model it is, beside its family's entry"
              for name in sorted(adapters or []) if name.startswith("hf:")]
    return "\n\n".join(["\n".join(lines)] + [e.bibtex() for e in picked]) + "\n"


def used_names(results_dir) -> tuple[list[str], list[str]]:
    """(techniques, adapters) that appear in a results directory's cells (`archbench.db`, or
    the published `archbench.db.gz` read through a temporary copy, as the report reads it)."""
    from archbench.store import reading

    with reading(results_dir) as store:
        rows = store.db.execute("SELECT DISTINCT technique, arch FROM cells").fetchall()
    return sorted({t for t, _ in rows}), sorted({a for _, a in rows})

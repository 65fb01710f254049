"""`archbench cite` prints well-formed BibTeX covering archbench and every registered name."""

import re
from pathlib import Path

import yaml

from archbench import cite, registry
from archbench.cli import main
from archbench.store import RunSpec, Store
from archbench.version import __version__

ROOT = Path(__file__).resolve().parents[1]


def parse_bibtex(text: str) -> dict[str, dict[str, str]]:
    """A structural parser independent of archbench.cite: key -> {field: value}.

    Outside entries only `%` comments and blank lines may appear; every entry is
    `@type{key, name = {value} or "value" or bare, ...}` with balanced braces.
    """
    entries, i = {}, 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text[i] == "%":
            i = text.index("\n", i) + 1 if "\n" in text[i:] else len(text)
            continue
        m = re.compile(r"@([a-z]+)\{([A-Za-z0-9_:.-]+),").match(text, i)
        assert m, f"expected an entry at {text[i:i + 40]!r}"
        depth, j = 1, text.index("{", i) + 1
        while depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        body, fields = text[m.end():j - 1], {}
        for name, value in re.findall(r"\s*([a-z]+)\s*=\s*(\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}|\"[^\"]*\"|\w+),?", body):
            fields[name] = value.strip("{}\"")
        leftover = re.sub(r"\s*([a-z]+)\s*=\s*(\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}|\"[^\"]*\"|\w+),?", "", body)
        assert not leftover.strip(), f"{m.group(2)}: unparsed text {leftover.strip()[:60]!r}"
        assert m.group(2) not in entries, f"duplicate key {m.group(2)}"
        entries[m.group(2)] = {"type": m.group(1), **fields}
        i = j
    return entries


def test_cite_all_parses_and_covers_every_registered_name(capsys):
    assert main(["cite"]) == 0
    out = capsys.readouterr().out
    entries = parse_bibtex(out)
    assert "archbench" in entries and "no reference recorded" not in out
    assert "archbench =" not in out and "archbench    =" not in out  # the mapping field is stripped
    for key, e in entries.items():
        assert {"title", "author", "year"} <= set(e), key
        assert re.fullmatch(r"(19|20)\d\d", e["year"]), key
        if "eprint" in e:
            assert re.fullmatch(r"\d{4}\.\d{4,5}", e["eprint"]), key
    tags = set().union(*(e.tags for e in cite.references()))
    for kind, prefix in (("techniques", "technique"), ("adapters", "adapter")):
        for name in registry.names(kind):
            assert f"{prefix}:{name}" in tags, f"no reference for {kind[:-1]} {name}"


def test_cite_results_picks_what_was_used(tmp_path, capsys, monkeypatch):
    from archbench.techniques.probe import Probe

    monkeypatch.setattr(registry, "_extra", {k: {} for k in registry.BUILTINS})
    registry.register("techniques", "frobnicate", type("Frobnicate", (Probe,), {"name": "frobnicate"}))
    with Store(tmp_path) as store:
        for spec in (RunSpec("probe", "mamba", "modadd", 0), RunSpec("frobnicate", "mamba", "modadd", 0)):
            store.put_cell(spec, {"status": "n/a", "reason": "synthetic"})
    assert main(["cite", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    keys = set(parse_bibtex(out))
    assert {"archbench", "adebayo2018sanity", "alain2016understanding", "gu2023mamba"} <= keys
    assert not keys & {"kornblith2019similarity", "peng2023rwkv", "vaswani2017attention"}
    assert "% no reference recorded for technique:frobnicate" in out


def test_cite_results_reads_a_published_archbench_db_gz(tmp_path, capsys):
    import gzip
    import shutil

    with Store(tmp_path / "r") as store:
        store.put_cell(RunSpec("probe", "mamba", "modadd", 0), {"status": "n/a", "reason": "synthetic"})
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    published = tmp_path / "published"  # only archbench.db.gz, as the committed results/ holds
    published.mkdir()
    with open(tmp_path / "r" / "archbench.db", "rb") as src, gzip.open(published / "archbench.db.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert main(["cite", "--results", str(published)]) == 0
    keys = set(parse_bibtex(capsys.readouterr().out))
    assert {"archbench", "alain2016understanding", "gu2023mamba"} <= keys and "vaswani2017attention" not in keys
    assert sorted(p.name for p in published.iterdir()) == ["archbench.db.gz"]  # read through a copy


def test_cite_bad_results_dir_is_one_line(tmp_path, capsys):
    assert main(["cite", "--results", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_versions_agree_and_citation_cff_is_valid():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"] == "archbench"
    assert cff["version"] == __version__ and cff["license"] == "Apache-2.0"
    assert cff["authors"] == [{"name": "The archbench developers"}]
    own = next(e for e in cite.references() if e.key == "archbench")
    assert f"version {__version__}" in own.field("note")


def test_parser_reads_braces_quotes_and_bare_values():
    [e] = cite.parse('% c\n@Article{k1,\n title = {A {B} c}, year = 2020, note = "x, y",\n archbench={adapter:a, core}}')
    assert (e.kind, e.key, e.field("title"), e.field("year"), e.field("note")) == ("article", "k1", "A {B} c", "2020", "x, y")
    assert e.tags == {"adapter:a", "core"} and "archbench" not in e.bibtex()

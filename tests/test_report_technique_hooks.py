"""The report asks each technique what it contributes: its per-depth value and its own tables."""

from __future__ import annotations

import pandas as pd
import pytest

from archbench import registry
from archbench import report_tables as tables
from archbench.figures import depth_frame
from archbench.report_tables import Table
from archbench.technique import Result, Technique


class Toy(Technique):
    name = "toy_for_report"
    depth_value = "toyness"

    @classmethod
    def report_tables(cls, cells, reference):
        n = int((cells.technique == cls.name).sum())
        return [Table("toy", "Toy", ["cells"], [[str(n)]])]

    def run(self, adapter, task, seed):
        return Result.not_applicable("never run")


@pytest.fixture
def toy(monkeypatch):
    """Toy registered for one test only (other tests list every registered technique)."""
    monkeypatch.setitem(registry._extra["techniques"], Toy.name, Toy)
    return Toy


def _cells(technique, key):
    return pd.DataFrame([{"technique": technique, "status": "ok", "arch": "transformer", "task": "modadd",
                          "seed": s, "control": False, "score": 0.5, "metrics": {},
                          "details": [{"site": "s", "layer": 1, key: 0.5, "other": 0.9}]} for s in range(2)])


def test_depth_figures_read_the_key_the_technique_names(toy):
    df = depth_frame(_cells(Toy.name, "toyness"), Toy.name)
    assert list(df.key.unique()) == ["toyness"] and df.value.tolist() == [0.5]
    assert depth_frame(_cells(Toy.name, "normalised"), Toy.name) is None  # only its own key counts


def test_no_depth_figure_without_a_depth_value_or_a_registered_technique():
    assert registry.technique("sae").depth_value is None
    assert depth_frame(_cells("sae", "score"), "sae") is None
    assert depth_frame(_cells("not_installed_technique", "normalised"), "not_installed_technique") is None


def test_a_technique_contributes_its_own_tables(toy):
    out = tables.technique_tables(pd.concat([_cells(Toy.name, "toyness"), _cells("not_installed", "x")]),
                                  "transformer")
    assert [(t.key, t.rows) for t in out] == [("toy", [["2"]])]


def test_the_similarity_table_comes_from_the_cka_technique():
    from archbench.techniques.cka import CKA

    cells = pd.DataFrame([{"technique": "cka", "status": "ok", "control": False, "task": "modadd", "seed": 0,
                           "arch": a, "score": 0.5, "metrics": {"cka_biased": 0.5}} for a in ("transformer", "kan")])
    assert [t.key for t in CKA.report_tables(cells, "transformer")] == ["similarity"]
    assert [t.key for t in tables.technique_tables(cells, "transformer")] == ["similarity"]
    assert Technique.report_tables(cells, "transformer") == []

"""End to end with real organisms (slow: trains transformers; run with `pytest -m slow`)."""

import pytest

from archbench import registry, runner, verdict
from archbench.store import Store

pytestmark = pytest.mark.slow


def test_trained_transformer_beats_its_control_on_three_tasks(tmp_path):
    specs = runner.expand(["transformer"], ["probe", "patching"], registry.matrix_tasks(), range(2))
    summary = runner.run_matrix(specs, tmp_path, workers=2, progress=False)
    assert summary.error == 0, summary.errors
    with Store(tmp_path) as store:
        v = verdict.verdicts(store.cells())
    for tech in ("probe", "patching"):
        rows = v[v.technique == tech]
        assert (rows.effect_lo > 0).sum() >= 3, rows

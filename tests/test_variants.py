"""The scale and development axes: variant rows, training snapshots, the runner and the report."""

from __future__ import annotations

import pytest
import torch

from archbench import cli, registry, report, runner, snapshots, variants, zoo
from archbench.adapter import Adapter


def test_variant_names_parse_and_print_back():
    assert variants.parse("transformer@d_model=128,n_layers=4") == ("transformer", {"d_model": 128, "n_layers": 4})
    assert variants.parse("mamba@stage=0.3") == ("mamba", {"stage": 0.3})
    assert variants.name("mamba", n_layers=4, d_model=32) == "mamba@d_model=32,n_layers=4"
    assert variants.name("gru", stage=0.5) == "gru@stage=0.5"
    for bad in ("transformer@", "transformer@width=3", "transformer@n_layers=x", "transformer@stage=1.0",
                "transformer@stage=0.5,n_layers=4", "transformer@n_layers=0"):
        with pytest.raises(variants.VariantError):
            variants.parse(bad)


def test_scale_rows_are_the_family_at_another_size():
    cls = registry.adapter("transformer@d_model=32,n_layers=4")
    assert cls.family == "transformer" and cls.variant_of == "transformer"
    assert cls.default_config == {**registry.adapter("transformer").default_config,
                                  "d_model": 32, "n_layers": 4, "d_mlp": 64}  # d_mlp keeps its ratio
    assert registry.adapter("hybrid@n_layers=6").default_config["attn_layers"] == [1, 3, 5]
    assert registry.adapter("looped@n_layers=6").default_config["n_loops"] == 6
    adapter = cls.build(10, 5, seed=0)
    assert sum(1 for h in adapter.hook_points() if h.role == "stream") > \
        sum(1 for h in registry.adapter("transformer").build(10, 5, seed=0).hook_points() if h.role == "stream")


def test_rows_a_family_cannot_have_are_refused_in_one_line():
    with pytest.raises(registry.UnknownName, match="reservoir has no d_model knob"):
        registry.adapter("reservoir@d_model=32")
    with pytest.raises(registry.UnknownName, match="does not train by gradient steps"):
        registry.adapter("nvar@stage=0.5")
    with pytest.raises(registry.UnknownName, match="unknown adapter"):
        registry.adapter("transfomer@n_layers=4")


def test_task_knobs_in_a_name_make_a_task_row():
    task = registry.task("recall@n_pairs=6")
    assert task.name == "recall" and task.n_pairs == 6 and task.seq_len == 13
    with pytest.raises(registry.UnknownName, match="unexpected keyword"):
        registry.task("recall@bogus=3")


def test_snapshots_do_not_change_training(monkeypatch):
    """The keeper only copies weights: the trained model is bit for bit the one without it."""
    task = registry.task("facts")

    def train():
        adapter = registry.adapter("transformer").for_task(task, 0)
        report = adapter.fit(task, 0, steps=120, eval_every=40)
        return adapter, report

    with_snapshots, report = train()
    monkeypatch.setattr(snapshots.SnapshotKeeper, "offer", lambda self, step: None)
    without, _ = train()
    for (k, a), (_, b) in zip(with_snapshots.model.state_dict().items(), without.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert [s["stage"] for s in report.snapshots] == list(variants.STAGES)
    steps = [s["step"] for s in report.snapshots]
    assert steps == sorted(steps) and steps[0] <= 20 and steps[-1] < report.steps


def test_the_keeper_thins_to_its_capacity_and_spans_the_run():
    model = torch.nn.Linear(2, 2)
    keeper = snapshots.SnapshotKeeper(model, interval=10, capacity=8)
    for step in range(1, 1001):
        keeper.offer(step)
    assert len(keeper.kept) <= 8 and max(keeper.kept) >= 800
    chosen = keeper.at_stages(1000, (0.1, 0.5, 0.9))
    assert [abs(step - s * 1000) <= 1000 / 4 for s, step, _ in chosen] == [True] * 3


@pytest.fixture()
def development_store(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    archs = ["transformer", "transformer@stage=0.2", "transformer@stage=0.9"]
    specs = runner.expand(archs, ["logit_lens"], ["facts"], [0])
    summary = runner.run_matrix(specs, tmp_path / "r", workers=1, progress=False)
    return tmp_path / "r", summary


def test_a_development_row_is_a_snapshot_of_the_one_trained_organism(development_store, tmp_path):
    results, summary = development_store
    assert summary.error == 0 and summary.ok == 6
    assert summary.organisms_trained == 3  # the organism once, each stage cut from it
    task = registry.task("facts")
    final = zoo.cached_meta("transformer", task, 0)
    early = zoo.cached_meta("transformer@stage=0.2", task, 0)
    entry = next(s for s in final["snapshots"] if s["stage"] == 0.2)
    assert early["steps"] == entry["step"] and early["accuracy"] == entry["accuracy"]
    assert early["final_accuracy"] == final["accuracy"]
    assert zoo.gate_reason(early) is None  # gated on the final organism, not on the snapshot
    assert zoo.gate_reason({**early, "final_accuracy": 0.5}).startswith("the final organism's")
    adapter, _ = zoo.organism("transformer@stage=0.2", task, 0)
    assert abs(adapter.accuracy(task.sample(1024, 0, "test")) - entry["accuracy"]) < 1e-9


def test_the_report_keeps_axis_rows_out_of_the_main_tables(development_store):
    results, _ = development_store
    d = report.load(results)
    tabs = {t.key: t for t in report.build_tables(d)}
    assert "@" not in " ".join(tabs["transfer"].header)
    dev = tabs["development"]
    assert dev.header[3:6] == ["0.2", "0.9", "1"]
    assert [r[2] for r in dev.rows] == ["held-out accuracy", "logit_lens"]
    files = report.render_files(d, formats=("md", "png"))
    assert "figures/development_transformer.png" in files


def test_axis_rows_expand_each_family_and_name_what_they_leave_out():
    notes: list[str] = []
    rows = cli._axis_rows(["transformer", "reservoir"], "scale", notes)
    assert rows[0] == "transformer" and len(rows) == 1 + 8 + 1  # the default size is the family's own row
    assert notes == ["--axis scale leaves out reservoir (reservoir has no d_model knob to scale)"]
    rows = cli._axis_rows(["gru"], "development", [])
    assert rows == ["gru", *variants.development_rows("gru")]


def test_a_checkpoint_has_no_axis():
    assert Adapter.trains_by_steps() and not registry.adapter("reservoir").trains_by_steps()


def test_the_scale_table_flags_a_verdict_that_flips_with_size():
    import pandas as pd

    from archbench import report_axes

    rows = [{"technique": "probe", "task": task, "arch": arch, "verdict": v, "provisional": False, "effect": e,
             "rho": rho}
            for arch, task, v, e, rho in [("transformer", "facts", "transfers", 0.8, 1.0),
                                          ("transformer@d_model=32,n_layers=4", "facts", "fails", 0.01, None),
                                          ("transformer", "count", "transfers", 0.8, 1.0),  # no scale row on count
                                          ("gru", "facts", "partial", 0.3, 0.4),
                                          ("gru@d_model=128,n_layers=6", "facts", "partial", 0.4, 0.5),
                                          ("mamba@d_model=64,n_layers=6", "facts_long", "partial", 0.4, 0.5)]]
    table = report_axes.scale_table(pd.DataFrame(rows))
    assert table.header[3:-1] == ["32×4", "64×2", "128×6"]
    stable = {(r[0], r[1]): r[-1] for r in table.rows}
    assert stable == {("transformer", "facts"): "flips", ("gru", "facts"): "yes"}  # one size alone is no row
    assert report_axes.size_of("looped") == (64, 4) and report_axes.size_of("reservoir") is None
    assert set(report_axes.scale_figures(pd.DataFrame(rows))) == {"transformer", "gru"}


def test_flags_split_names_around_a_variant_s_own_commas():
    assert cli.split_names("transformer, mamba@d_model=32,n_layers=4,gru,mqar@n_pairs=8,n_keys=16") == [
        "transformer", "mamba@d_model=32,n_layers=4", "gru", "mqar@n_pairs=8,n_keys=16"]
    assert cli._names("adapters", "gru@d_model=32,n_layers=4,gru") == ["gru@d_model=32,n_layers=4", "gru"]

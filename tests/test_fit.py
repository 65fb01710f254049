"""Adapter.fit: the learning-rate schedule and why training stopped (target, plateau, step cap)."""

import json
import math

import pytest
import torch

from archbench import zoo
from archbench.adapter import Adapter
from archbench.adapters.spiking import SpikingAdapter
from archbench.tasks import Parity

torch.set_num_threads(1)

SMALL = {"n_train": 256, "batch": 16, "eval_every": 50}  # a few seconds per fit


@pytest.fixture
def task():
    return Parity(n_bits=6, k=2)  # vocab 3, seq_len 7


def _tiny(task):
    return SpikingAdapter.for_task(task, seed=0, d_model=8, n_layers=1)


def test_schedule_warms_up_then_decays_by_a_cosine_to_the_floor():
    cfg = {"warmup": 100, "steps": 2100, "min_lr_ratio": 0.1}
    f = lambda s: Adapter.lr_factor(s, cfg)  # noqa: E731
    assert f(0) == pytest.approx(0.01)  # step 0 runs at lr / warmup
    assert f(49) == pytest.approx(0.5)
    assert f(99) == pytest.approx(1.0)  # warm-up ends at the full rate
    assert f(100) == pytest.approx(1.0)  # the cosine starts at 1
    assert f(600) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(1100) == pytest.approx(0.55)  # half way: half way between 1 and the floor
    assert f(2100) == pytest.approx(0.1) and f(5000) == pytest.approx(0.1)  # the floor, and after
    decay = [f(s) for s in range(100, 2101, 50)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_fit_uses_the_schedule(task):
    report = _tiny(task).fit(task, 0, **SMALL, steps=200, warmup=20, lr=1e-2, target=1.01,
                             plateau_steps=None)
    cfg = {"warmup": 20, "steps": 200, "min_lr_ratio": Adapter.train_config["min_lr_ratio"]}
    # after optimiser step s the scheduler holds the rate of the next step, factor(s)
    assert [h["lr"] for h in report.history] == pytest.approx(
        [1e-2 * Adapter.lr_factor(h["step"], cfg) for h in report.history])
    assert report.history[-1]["lr"] == pytest.approx(1e-3)
    assert report.stopped == "step cap" and report.steps == 200


def test_plateau_stops_a_model_that_cannot_learn(task):
    # lr 0: validation accuracy never moves, so 200 steps after the first evaluation it stops
    report = _tiny(task).fit(task, 0, **SMALL, steps=2000, lr=0.0, target=1.01, plateau_steps=200)
    assert report.stopped == "plateau"
    assert report.steps == 250
    assert [h["step"] for h in report.history] == [50, 100, 150, 200, 250]
    assert len({h["val_accuracy"] for h in report.history}) == 1


def test_plateau_waits_for_a_rise_of_plateau_delta_and_two_standard_errors(task, monkeypatch):
    # a scripted validation accuracy. Near 0.5 on 512 validation examples two standard errors
    # are 0.044, so +0.03 is noise (above plateau_delta 0.02, but not counted) and +0.06 is a rise
    accs = iter([0.50, 0.53, 0.53, 0.56] + [0.56] * 20)
    adapter = _tiny(task)
    real = adapter.accuracy

    def scripted(examples):
        if len(examples) == 512:  # the validation sample
            return next(accs)
        return real(examples)

    monkeypatch.setattr(adapter, "accuracy", scripted)
    report = adapter.fit(task, 0, **SMALL, steps=2000, target=1.01, plateau_steps=150, plateau_delta=0.02)
    # best counted: 0.50 @50, 0.56 @200; 150 steps later (350) it stops
    assert report.stopped == "plateau" and report.steps == 350


def test_plateau_none_runs_to_the_step_cap(task):
    report = _tiny(task).fit(task, 0, **SMALL, steps=150, lr=0.0, target=1.01, plateau_steps=None)
    assert report.stopped == "step cap" and report.steps == 150


def test_target_stop_records_target(task):
    report = _tiny(task).fit(task, 0, **SMALL, steps=2000, target=0.0)
    assert report.stopped == "target" and report.steps == 100  # at the target at 2 evaluations in a row
    once = _tiny(task).fit(task, 0, **SMALL, steps=2000, target=0.0, target_patience=1)
    assert once.stopped == "target" and once.steps == 50


def test_a_run_that_reached_the_gate_level_does_not_stop_on_a_plateau(task):
    # lr 0: validation accuracy never moves; below plateau_below it is a plateau, above it is not
    flat = _tiny(task).fit(task, 0, **SMALL, steps=400, lr=0.0, target=1.01, plateau_steps=100)
    assert flat.stopped == "plateau"
    kept = _tiny(task).fit(task, 0, **SMALL, steps=400, lr=0.0, target=1.01, plateau_steps=100,
                           plateau_below=0.0)
    assert kept.stopped == "step cap" and kept.steps == 400


def test_zoo_metadata_records_why_training_stopped(task, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(SpikingAdapter, "default_config", {**SpikingAdapter.default_config, "d_model": 8})
    monkeypatch.setattr(SpikingAdapter, "train_config",
                        {**SpikingAdapter.train_config, **SMALL, "target": 0.0})
    _, meta = zoo.organism("spiking", task, 0)
    assert meta["stopped"] == "target" and meta["steps"] == 100
    saved = json.loads((zoo.organism_dir("spiking", task, 0) / "adapter.json").read_text())["meta"]
    assert saved["stopped"] == "target"

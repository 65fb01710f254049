"""Organism integrity and NaN rejection: a damaged organism is rebuilt or refused, never
scored; a NaN or an infinity is an error row, never a score.

Organisms here are tiny spiking networks trained for 100 steps (a second or two each) under
the test's own $ARCHBENCH_CACHE, or planted random-init models where only the runner's
bookkeeping is under test.
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from archbench import integrity, registry, runner, zoo
from archbench.adapters.spiking import SpikingAdapter
from archbench.cli import main
from archbench.store import Store
from archbench.technique import Result, Technique

TASK = "modadd"


@pytest.fixture
def tiny(monkeypatch):
    """Spiking organisms small enough to train in a second or two (stopped at step 100)."""
    monkeypatch.setattr(SpikingAdapter, "default_config", {**SpikingAdapter.default_config, "d_model": 8,
                                                           "n_layers": 1})
    monkeypatch.setattr(SpikingAdapter, "train_config", {**SpikingAdapter.train_config, "n_train": 256,
                                                         "batch": 16, "eval_every": 50, "target": 0.0})
    task = registry.task(TASK)
    _, meta = zoo.organism("spiking", task, 0)
    return task, zoo.organism_dir("spiking", task, 0), meta


def _flip_bytes(file, n=64):
    """Flip n bytes spread over the tensor data (the header stays readable)."""
    raw = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    for i in np.linspace(start, len(raw) - 1, n).astype(int):
        raw[i] ^= 0xFF
    file.write_bytes(bytes(raw))


def _load_quietly(task):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter, meta = zoo.organism("spiking", task, 0)
    lines = [str(w.message) for w in caught if issubclass(w.category, integrity.OrganismWarning)]
    return adapter, meta, lines


def _set_meta(path, **changes):
    info = json.loads((path / "adapter.json").read_text())
    for key, value in changes.items():
        if value is None:
            info["meta"].pop(key, None)
        else:
            info["meta"][key] = value
    (path / "adapter.json").write_text(json.dumps(info))


def test_a_built_organism_records_its_weights_hash_and_loads_back(tiny):
    task, path, meta = tiny
    # the development axis' training snapshots are weights too, hashed and checked alike
    assert meta[integrity.WEIGHTS_KEY] == {name: integrity.sha256(path / name)
                                           for name in ("model.safetensors", "snapshots.safetensors")}
    _, again, lines = _load_quietly(task)
    assert again == meta and lines == []


def test_flipped_bytes_are_caught_and_the_organism_rebuilt(tiny):
    task, path, meta = tiny
    _flip_bytes(path / "model.safetensors")
    assert zoo.cached_meta("spiking", task, 0) is None  # the runner schedules a rebuild
    adapter, rebuilt, lines = _load_quietly(task)
    assert len(lines) == 1 and "model.safetensors does not match its recorded sha256" in lines[0]
    assert "rebuilding" in lines[0] and "\n" not in lines[0]
    # training is deterministic in the seed: the rebuilt organism is the original one
    assert rebuilt[integrity.WEIGHTS_KEY] == meta[integrity.WEIGHTS_KEY]
    assert integrity.weights_digest(path) == meta[integrity.WEIGHTS_KEY]
    quarantined = list((zoo.cache_root() / "quarantine").iterdir())
    assert len(quarantined) == 1 and (quarantined[0] / "model.safetensors").exists()


def test_flipped_bytes_are_refused_with_no_retrain(tiny, tmp_path, capsys):
    task, path, _ = tiny
    _flip_bytes(path / "model.safetensors")
    damaged = (path / "model.safetensors").read_bytes()
    with pytest.raises(zoo.CorruptOrganism, match="model.safetensors does not match"):
        zoo.organism("spiking", task, 0, no_retrain=True)
    capsys.readouterr()
    assert main(["zoo", "build", "--arch", "spiking", "--task", TASK, "--no-retrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("archbench: error:") and "\n" not in err
    assert str(path / "model.safetensors") in err and "--no-retrain" in err
    assert main(["run", "--matrix", "--arch", "spiking", "--technique", "cka", "--task", TASK, "--seeds", "1",
                 "--workers", "1", "--no-progress", "--no-retrain", "--results", str(tmp_path / "r")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # a note that the reference was added, then the error
    errors = [line for line in lines if line.startswith("archbench: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and str(path / "model.safetensors") in errors[0]
    assert (path / "model.safetensors").read_bytes() == damaged  # left as it was


@pytest.mark.parametrize("damage", ["truncate", "rename", "delete"])
def test_a_truncated_renamed_or_missing_weight_file_is_rebuilt(tiny, damage):
    task, path, meta = tiny
    file = path / "model.safetensors"
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "rename":
        file.rename(path / "model.old.safetensors")
    else:
        file.unlink()
    _, rebuilt, lines = _load_quietly(task)
    assert len(lines) == 1 and str(file) in lines[0]
    assert ("truncated" if damage == "truncate" else "missing") in lines[0]
    assert integrity.weights_digest(path) == meta[integrity.WEIGHTS_KEY]


@pytest.mark.parametrize("text", ["{not json", "[]", '{"family": "spiking"}'])
def test_invalid_metadata_is_rebuilt_and_listed_not_a_traceback(tiny, text, capsys):
    task, path, meta = tiny
    (path / "adapter.json").write_text(text)
    assert zoo.cached_meta("spiking", task, 0) is None
    [row] = zoo.list_organisms()
    assert "adapter.json" in row["check"]
    assert main(["zoo", "ls"]) == 0
    assert "adapter.json" in capsys.readouterr().out
    _, rebuilt, lines = _load_quietly(task)
    assert len(lines) == 1 and str(path / "adapter.json") in lines[0]
    assert rebuilt[integrity.WEIGHTS_KEY] == meta[integrity.WEIGHTS_KEY]


def test_an_organism_without_a_hash_is_regated_and_gets_it_recorded(tiny):
    task, path, meta = tiny
    _set_meta(path, **{integrity.WEIGHTS_KEY: None})  # as an earlier archbench wrote it
    before = (path / "model.safetensors").read_bytes()
    assert zoo.cached_meta("spiking", task, 0)["accuracy"] == meta["accuracy"]  # still usable
    assert zoo.list_organisms()[0]["check"] == "unverified"
    _, loaded, lines = _load_quietly(task)
    assert len(lines) == 1 and "recorded the sha256 of model.safetensors" in lines[0]
    assert "re-gate accuracy" in lines[0]
    saved = json.loads((path / "adapter.json").read_text())["meta"]
    assert saved[integrity.WEIGHTS_KEY] == loaded[integrity.WEIGHTS_KEY] == meta[integrity.WEIGHTS_KEY]
    assert (path / "model.safetensors").read_bytes() == before  # verified, not retrained
    assert not (zoo.cache_root() / "quarantine").exists()
    assert _load_quietly(task)[2] == [] and zoo.list_organisms()[0]["check"] == "ok"


def test_an_organism_whose_model_disagrees_with_its_recorded_accuracy_is_rebuilt(tiny):
    task, path, meta = tiny
    assert meta["accuracy"] < 0.5  # 100 steps: far from the recorded 1.0 below
    _set_meta(path, **{integrity.WEIGHTS_KEY: None, "accuracy": 1.0})
    _, rebuilt, lines = _load_quietly(task)
    assert len(lines) == 1 and f"on {integrity.REGATE_EXAMPLES} held-out examples" in lines[0]
    assert "1.000 is recorded" in lines[0]
    assert rebuilt["accuracy"] == meta["accuracy"]
    with pytest.raises(zoo.CorruptOrganism, match="held-out examples"):  # refused, with no_retrain
        _set_meta(path, accuracy=1.0)
        zoo.organism("spiking", task, 0, no_retrain=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None, "0.95"])
def test_a_non_finite_accuracy_fails_the_gate(value):
    reason = zoo.gate_reason({"accuracy": value}, 0.9)
    assert reason and "not a finite number" in reason
    assert zoo.gate_reason({"accuracy": 0.95}, 0.9) is None


def test_a_nan_accuracy_in_metadata_makes_the_organism_rebuilt(tiny):
    task, path, meta = tiny
    _set_meta(path, accuracy=math.nan)  # json writes NaN, and reads it back as a float
    assert "NaN" in (path / "adapter.json").read_text()
    assert zoo.cached_meta("spiking", task, 0) is None
    with pytest.raises(zoo.CorruptOrganism, match="accuracy nan"):
        zoo.cached_meta("spiking", task, 0, no_retrain=True)
    _, rebuilt, lines = _load_quietly(task)
    assert len(lines) == 1 and "records accuracy nan" in lines[0]
    assert rebuilt["accuracy"] == meta["accuracy"]


def test_the_runner_rebuilds_a_damaged_organism_and_scores_the_rebuilt_one(tiny, tmp_path, capsys):
    task, path, meta = tiny
    _flip_bytes(path / "model.safetensors")
    specs = runner.expand(["spiking"], ["cka"], [TASK], [0])
    summary = runner.run_matrix(specs, tmp_path, workers=1, gate=0.0, progress=False)  # 100 steps: no gate
    assert (summary.ok, summary.error, summary.organisms_trained) == (2, 0, 1)
    assert capsys.readouterr().err.count("does not match its recorded sha256") == 1
    assert integrity.weights_digest(path) == meta[integrity.WEIGHTS_KEY]


# --- NaN and infinities at the cell boundary -------------------------------------------

class NonFinite(Technique):
    """Scores NaN (or a per-example infinity) until `fixed` is set."""

    name = "nonfinite"
    roles = frozenset({"stream"})
    fixed = False

    def run(self, adapter, task, seed):
        if NonFinite.fixed:
            return Result.from_per_example([0.5, 0.5])
        if seed == 0:
            return Result(score=math.nan, per_example=[math.nan, 0.5])
        return Result(score=0.5, per_example=[0.5, math.inf])


def test_a_nan_score_is_an_error_row_and_is_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_extra", {k: {} for k in registry.BUILTINS})
    registry.register("techniques", "nonfinite", NonFinite)
    monkeypatch.setattr(NonFinite, "fixed", False)
    for seed in (0, 1):
        zoo.plant("transformer", TASK, seed)
    specs = runner.expand(["transformer"], ["nonfinite"], [TASK], [0, 1])
    summary = runner.run_matrix(specs, tmp_path, workers=1, progress=False)
    assert (summary.ok, summary.error) == (0, 4)
    with Store(tmp_path) as store:
        cells = store.cells()
    assert (cells.status == "error").all() and cells.score.isna().all()
    assert cells[cells.seed == 0].error.str.contains("non-finite score").all()
    assert cells[cells.seed == 1].error.str.contains("1 of 2 per-example values are not finite").all()
    NonFinite.fixed = True
    again = runner.run_matrix(specs, tmp_path, workers=1, progress=False)
    assert (again.skipped, again.ok) == (0, 4)  # error rows are not done: all four were rerun
    with Store(tmp_path) as store:
        assert (store.cells().score == 0.5).all()


def test_nan_activations_are_an_error_row_not_a_score(tmp_path):
    zoo.plant("transformer", TASK, 0)
    path = zoo.organism_dir("transformer", registry.task(TASK), 0)
    state = load_file(str(path / "model.safetensors"))
    name = next(k for k in state if "mlp" in k and k.endswith("weight"))
    state[name] = torch.full_like(state[name], math.nan)  # a diverged organism, its files intact
    save_file(state, str(path / "model.safetensors"))
    integrity.record_digest(path, integrity.weights_digest(path))
    summary = runner.run_matrix(runner.expand(["transformer"], ["probe"], [TASK], [0]), tmp_path,
                                workers=1, progress=False)
    assert (summary.ok, summary.error) == (1, 1)  # the control is a fresh random init
    with Store(tmp_path) as store:
        cells = store.cells()
    trained = cells[~cells.control].iloc[0]
    assert trained.status == "error" and "non-finite activations" in trained.error


def test_nonfinite_result_names_what_is_wrong():
    assert integrity.nonfinite_result(Result.from_per_example([0.2, 0.4])) is None
    assert "non-finite score" in integrity.nonfinite_result(Result(score=None))
    with pytest.warns(RuntimeWarning):  # numpy: the mean of no values is NaN
        empty = Result.from_per_example([])
    assert "non-finite score" in integrity.nonfinite_result(empty)
    assert "2 of 3" in integrity.nonfinite_result(Result(score=0.1, per_example=[0.1, math.nan, -math.inf]))


# --- zoo command-line errors -------------------------------------------------------------

@pytest.mark.parametrize("args", [["zoo", "build", "--arch", "rwkv_pth"], ["zoo", "build", "--arch", "transfomer"],
                                  ["zoo", "build", "--task", "modad"], ["zoo", "build", "--seeds", "0"],
                                  ["zoo", "build", "--gate", "1.5"], ["zoo", "ls", "--seeds", "2"],
                                  ["zoo", "ls", "--no-retrain"], ["zoo", "ls", "--arch", "mamab"], ["zoo"],
                                  ["zoo", "rm"]])
def test_zoo_argument_errors_are_one_line_exit_2(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("archbench: error:") and err.strip().count("\n") == 0


def test_zoo_ls_filters_by_arch_and_task(tiny, capsys):
    zoo.plant("transformer", "count", 0)
    assert main(["zoo", "ls", "--arch", "spiking"]) == 0
    out = capsys.readouterr().out
    last = out.rstrip().splitlines()[-1].split()
    assert "spiking" in out and "transformer" not in out and last[-2] == "ok"  # the check column, then the path
    assert main(["zoo", "ls", "--task", "count"]) == 0
    assert "transformer" in capsys.readouterr().out

"""Reservoir adapter: the lifted torch ESN against reservoirpy, per-step state edits, ridge fit, I/O."""

import numpy as np
import pytest
import torch

from archbench.adapters.reservoir import ReservoirAdapter
from archbench.hooks import Add, Patch, Zero
from archbench.tasks import Count, Facts, Parity
from archbench.techniques.patching import Patching
from archbench.techniques.probe import Probe


@pytest.fixture
def task():
    return Parity(n_bits=6, k=2)  # vocab 3, seq_len 7


@pytest.fixture
def esn(task):
    return ReservoirAdapter.for_task(task, seed=0, units=50)


@pytest.fixture
def tokens(task):
    return task.sample(16, 0).tokens  # (16, 7)


def test_torch_module_reproduces_reservoirpy(esn, tokens):
    out = esn.run(tokens, cache="all")
    assert out.logits.dtype == torch.float64 and out.logits.shape == (16, 7, 3)
    assert np.abs(out.logits.numpy() - esn.reservoirpy_logits(tokens)).max() <= 1e-9
    assert np.abs(out.cache["reservoir.state"].numpy() - esn.reservoirpy_states(tokens)).max() <= 1e-9


def test_fit_is_reservoirpys_ridge_and_parity_still_holds(task, tokens):
    esn = ReservoirAdapter.for_task(task, seed=0, units=50)
    reservoir_before = esn.model.W.detach().clone()
    report = esn.fit(task, 0, n_train=512)
    assert 0.0 <= report.accuracy <= 1.0 and report.train_accuracy > 0.5
    assert torch.equal(esn.model.W, reservoir_before)  # only the readout is trained
    assert np.abs(esn.forward(tokens).detach().numpy() - esn.reservoirpy_logits(tokens)).max() <= 1e-9


def test_build_is_deterministic_in_seed(task, tokens):
    a, b = ReservoirAdapter.for_task(task, 0, units=50), ReservoirAdapter.for_task(task, 0, units=50)
    c = ReservoirAdapter.for_task(task, 1, units=50)
    assert torch.equal(a.forward(tokens), b.forward(tokens))
    assert not torch.equal(a.forward(tokens), c.forward(tokens))


def test_every_hook_point_fires_with_its_axes(esn, tokens):
    out = esn.run(tokens, cache="all")
    assert set(out.cache) == set(esn.specs)
    for name, spec in esn.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (16, 7), name
    assert out.cache["reservoir.state"].shape == (16, 7, 50)
    assert torch.equal(out.cache["logits"], out.logits)
    assert esn.names(["stream", "state"]) == ["reservoir.state"]


@pytest.mark.parametrize("t", [0, 3, 6])
def test_state_edit_at_step_t_changes_only_steps_from_t(esn, tokens, t):
    base = esn.run(tokens).logits
    out = esn.run(tokens, cache=["reservoir.state"],
                  interventions={"reservoir.state": Zero(positions=[t])})
    assert torch.equal(out.logits[:, :t], base[:, :t])
    assert (out.logits[:, t:] - base[:, t:]).abs().amax(-1).min() > 0  # every later step moves
    assert out.cache["reservoir.state"][:, t].abs().max() == 0


def test_patching_the_state_at_t_carries_the_source_history(esn, tokens):
    t = 3
    source = tokens.clone()
    source[:, : t + 1] = (tokens[:, : t + 1] + 1) % 2
    src = esn.run(source, cache=["reservoir.state"]).cache["reservoir.state"]
    out = esn.run(tokens, interventions={"reservoir.state": Patch(src, positions=[t])}).logits
    ref = esn.run(source).logits
    assert torch.allclose(out[:, t:], ref[:, t:], atol=1e-12)
    assert not torch.allclose(out[:, :t], ref[:, :t])


def test_steering_and_gradients_on_the_state(esn, tokens):
    v = torch.ones(50, dtype=torch.float64)
    out = esn.run(tokens, cache=["reservoir.state"], grad=True,
                  interventions={"reservoir.state": Add(v, positions=[2], scale=0.1)})
    clean = esn.run(tokens, cache=["reservoir.state"]).cache["reservoir.state"]
    assert torch.allclose(out.cache["reservoir.state"][:, 2], clean[:, 2] + 0.1)
    (g,) = torch.autograd.grad(out.logits[:, -1].sum(), out.cache["reservoir.state"])
    assert g.shape == (16, 7, 50) and g[:, 0].abs().sum() > 0  # step 0 reaches the last step


def test_save_load_roundtrip(task, tokens, tmp_path):
    esn = ReservoirAdapter.for_task(task, seed=0, units=50)
    esn.fit(task, 0, n_train=256)
    esn.save(tmp_path / "org")
    back = ReservoirAdapter.load(tmp_path / "org")
    assert back.model.W.dtype == torch.float64
    assert torch.equal(back.forward(tokens), esn.forward(tokens))


def test_learns_facts():
    task = Facts()
    esn = ReservoirAdapter.for_task(task, seed=0, units=200)
    assert esn.fit(task, 0, n_train=2048).accuracy > 0.9


@pytest.mark.parametrize("task_", [Parity(n_bits=6, k=2), Count(length=5, m=2)], ids=["parity", "count"])
def test_probe_is_na_and_patching_runs_end_to_end(task_):
    esn = ReservoirAdapter.for_task(task_, seed=0, units=50)
    esn.fit(task_, 0, n_train=256)
    probe = Probe(n_train=128, n_test=64, steps=10)(esn, task_, 0)
    # only the readout is trained: the control shares the representation, so probing is n/a
    assert not probe.applicable and "same representation" in probe.reason
    patch = Patching(n_pairs=32)(esn, task_, 0)
    assert patch.applicable and 0.0 <= patch.score <= 1.0

"""NVAR adapter: the lifted torch NVAR against reservoirpy, the delay line, per-step edits, I/O."""

import numpy as np
import pytest
import torch

from archbench.adapters.nvar import NVARAdapter
from archbench.hooks import Patch, Zero
from archbench.tasks import ModAdd, Parity
from archbench.techniques.patching import Patching
from archbench.techniques.probe import Probe


@pytest.fixture
def task():
    return Parity(n_bits=4, k=2)  # vocab 3, seq_len 5


@pytest.fixture
def nvar(task):
    return NVARAdapter.for_task(task, seed=0, order=2)


@pytest.fixture
def tokens(task):
    return task.sample(16, 0).tokens  # (16, 5)


def test_torch_module_reproduces_reservoirpy(nvar, tokens):
    out = nvar.run(tokens, cache="all")
    n_features = 15 + 15 * 16 // 2  # 5 delays x 3 symbols, plus their quadratic monomials
    assert out.cache["nvar.features"].shape == (16, 5, n_features)
    assert np.abs(out.cache["nvar.features"].numpy() - nvar.reservoirpy_states(tokens)).max() <= 1e-9
    assert np.abs(out.logits.numpy() - nvar.reservoirpy_logits(tokens)).max() <= 1e-9


def test_reservoirpy_delay_line_leaks_between_series_unless_cleared(nvar, tokens):
    """NVAR.store is not node state: reset() keeps it and a multi-series run carries it over."""
    node, _ = nvar.to_reservoirpy()
    onehot = torch.nn.functional.one_hot(tokens, 3).double().numpy()  # (16, 5, 3)
    node.run(onehot[0])
    node.reset()
    leaked = node.run(onehot[1])
    assert np.abs(leaked - nvar.reservoirpy_states(tokens[1:2])[0]).max() > 0.5
    assert np.abs(nvar.forward(tokens[1:2]).detach().numpy()
                  - nvar.reservoirpy_logits(tokens[1:2])).max() <= 1e-9


def test_every_hook_point_fires_with_its_axes(nvar, tokens):
    out = nvar.run(tokens, cache="all")
    assert set(out.cache) == set(nvar.specs)
    for name, spec in nvar.specs.items():
        assert out.cache[name].dim() == len(spec.axes) and out.cache[name].shape[:2] == (16, 5), name
    assert out.cache["nvar.delay"].shape == (16, 5, 5, 3)
    # the delay line at step t holds tokens t, t-1, ... newest first
    line = out.cache["nvar.delay"][:, 4].argmax(-1)  # (16, 5)
    assert torch.equal(line, tokens.flip(1))
    assert nvar.names(["stream", "state"]) == ["nvar.delay", "nvar.features"]


@pytest.mark.parametrize("t", [0, 2, 4])
def test_delay_line_edit_at_step_t_changes_only_steps_from_t(nvar, tokens, t):
    base = nvar.run(tokens).logits
    out = nvar.run(tokens, interventions={"nvar.delay": Zero(positions=[t])}).logits
    assert torch.equal(out[:, :t], base[:, :t])
    assert (out[:, t:] - base[:, t:]).abs().amax(-1).min() > 0  # the line carries the edit onward


def test_patching_the_delay_line_hands_over_the_source_history(nvar, tokens):
    source = (tokens.clone() + 1) % 2
    source[:, -1] = tokens[:, -1]
    src = nvar.run(source, cache=["nvar.delay"]).cache["nvar.delay"]
    out = nvar.run(tokens, interventions={"nvar.delay": Patch(src, positions=[3])}).logits
    ref = nvar.run(source).logits
    assert torch.allclose(out[:, 3:], ref[:, 3:], atol=1e-12)  # step 4 adds the same last token


def test_fit_memorises_modular_addition_without_generalising():
    """Quadratic monomials of one-hot (a, b) are one feature per pair: a lookup table."""
    task = ModAdd(p=11)
    nvar = NVARAdapter.for_task(task, seed=0)
    report = nvar.fit(task, 0, n_train=1024)
    assert report.train_accuracy == 1.0 and report.accuracy < 0.3
    tokens = task.sample(8, 0, "test").tokens
    assert np.abs(nvar.forward(tokens).detach().numpy() - nvar.reservoirpy_logits(tokens)).max() <= 1e-9


def test_save_load_roundtrip(task, tokens, tmp_path):
    nvar = NVARAdapter.for_task(task, seed=0, order=2)
    nvar.fit(task, 0, n_train=256)
    nvar.save(tmp_path / "org")
    back = NVARAdapter.load(tmp_path / "org")
    assert torch.equal(back.forward(tokens), nvar.forward(tokens))


def test_per_task_order_is_part_of_the_build():
    from archbench.tasks import Recall

    assert NVARAdapter.for_task(Recall(), 0).model.order == 1
    assert NVARAdapter.for_task(Parity(), 0).model.order == 2
    assert NVARAdapter.for_task(Parity(), 0, order=3).model.order == 3


def test_probe_is_na_and_patching_runs_end_to_end():
    task = Parity(n_bits=8, k=2)
    nvar = NVARAdapter.for_task(task, seed=0)
    nvar.fit(task, 0, n_train=256)
    probe = Probe(n_train=128, n_test=64, steps=10)(nvar, task, 0)
    # only the readout is trained: the control shares the representation, so probing is n/a
    assert not probe.applicable and "same representation" in probe.reason
    patch = Patching(n_pairs=32)(nvar, task, 0)
    assert patch.applicable and 0.0 <= patch.score <= 1.0

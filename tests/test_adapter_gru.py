"""GRU adapter: parity with torch's own nn.GRU, per-step hidden-state edits, patching, I/O."""

import pytest
import torch

from archbench.adapters.gru import GRUAdapter
from archbench.hooks import Patch, Zero
from archbench.tasks import Count, Parity
from archbench.techniques.patching import Patching
from archbench.techniques.probe import Probe

torch.set_num_threads(1)


@pytest.fixture
def task():
    return Parity(n_bits=6, k=2)  # vocab 3, seq_len 7


@pytest.fixture
def gru(task):
    return GRUAdapter.for_task(task, seed=0, d_model=16)


@pytest.fixture
def tokens(task):
    return task.sample(16, 0).tokens  # (16, 7)


def torch_stack(model, tokens):
    """The network as plain torch code: each layer's nn.GRU over the whole sequence."""
    h = model.embed(tokens)  # (B, T, d)
    finals = []
    for block in model.blocks:
        h, h_n = block.gru(h)  # (B, T, d), (1, B, d)
        finals.append(h_n[0])
    return model.readout(h), finals


def test_forward_is_torch_nn_gru_stepped_or_fused(gru, tokens):
    with torch.no_grad():
        own, finals = torch_stack(gru.model, tokens)
    assert torch.equal(gru.run(tokens).logits, own)  # unhooked: torch's fused loop
    out = gru.run(tokens, cache="all")  # hooked: one nn.GRU call per step
    assert out.logits.shape == (16, 7, 3)
    assert torch.allclose(out.logits, own, atol=1e-6)
    for i, final in enumerate(finals):
        assert torch.allclose(out.cache[f"blocks.{i}.hidden"][:, -1], final, atol=1e-6)


def test_every_hook_point_fires_per_step_with_its_axes(gru, tokens):
    out = gru.run(tokens, cache="all")
    assert set(out.cache) == set(gru.specs)
    for name, spec in gru.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (16, 7), name
    assert torch.equal(out.cache["blocks.0.hidden"], out.cache["blocks.0.out"])  # clean: the same values
    assert torch.allclose(gru.decode(out.cache["blocks.1.out"]), out.logits)
    assert gru.names("state") == ["blocks.0.hidden", "blocks.1.hidden"]


@pytest.mark.parametrize("t", [0, 3, 6])
def test_hidden_edit_at_step_t_acts_from_t_on(gru, tokens, t):
    base = gru.run(tokens).logits
    out = gru.run(tokens, cache=["blocks.0.hidden"], interventions={"blocks.0.hidden": Zero(positions=[t])})
    assert torch.allclose(out.logits[:, :t], base[:, :t], atol=1e-6)  # before t: untouched
    assert not torch.allclose(out.logits[:, t], base[:, t])  # at t: the layer above sees it
    assert out.cache["blocks.0.hidden"][:, t].abs().max() == 0  # the cache holds the edit
    if t + 1 < tokens.shape[1]:  # after t: the edited state fed the recurrence
        assert not torch.allclose(out.logits[:, t + 1:], base[:, t + 1:])


def test_hidden_edit_is_the_recurrence_continued_from_it(gru, tokens):
    """Zeroing layer 0's hidden state at t equals running its nn.GRU on tokens t+1.. from h = 0."""
    t = 3
    out = gru.run(tokens, cache=["blocks.0.out"], interventions={"blocks.0.hidden": Zero(positions=[t])})
    block = gru.model.blocks[0]
    with torch.no_grad():
        x = gru.model.embed(tokens)  # (B, T, d)
        rest, _ = block.gru(x[:, t + 1:], torch.zeros(1, 16, 16))  # (B, T - t - 1, d)
    assert torch.allclose(out.cache["blocks.0.out"][:, t + 1:], rest, atol=1e-6)


def test_output_edit_does_not_enter_the_recurrence(gru, tokens):
    """`out` is what the layer above reads: editing it at t changes layer 1 from t on, but
    layer 0's own hidden states after t are unchanged."""
    clean = gru.run(tokens, cache=["blocks.0.hidden"])
    out = gru.run(tokens, cache=["blocks.0.hidden"], interventions={"blocks.0.out": Zero(positions=[2])})
    assert torch.allclose(out.cache["blocks.0.hidden"], clean.cache["blocks.0.hidden"], atol=1e-6)
    assert not torch.allclose(out.logits[:, 2:], clean.logits[:, 2:])


def test_patching_every_state_at_t_carries_the_source_history(gru, tokens):
    t = 3
    source = tokens.clone()
    source[:, : t + 1] = (tokens[:, : t + 1] + 1) % 2  # differ only up to t
    names = gru.names("state")
    src = gru.run(source, cache=names).cache
    out = gru.run(tokens, interventions={n: Patch(src[n], positions=[t]) for n in names}).logits
    ref = gru.run(source).logits
    assert torch.allclose(out[:, t + 1:], ref[:, t + 1:], atol=1e-5)
    assert not torch.allclose(out[:, :t], ref[:, :t])


def test_gradients_through_the_cached_state_are_those_of_the_recurrence(gru, tokens):
    model = gru.model
    x = model.embed(tokens)
    state = torch.zeros(16, 16)  # (B, d)
    states = []
    for t in range(tokens.shape[1]):
        _, h = model.blocks[0].gru(x[:, t:t + 1], state[None])  # h: (1, B, d)
        state = h[0] + 0.0  # the carried state, a node of its own
        states.append(state)
    top, _ = model.blocks[1].gru(torch.stack(states, 1))
    w = torch.randn(16, 7, 3, generator=torch.Generator().manual_seed(3))
    ref = torch.autograd.grad((model.readout(top) * w).sum(), states)
    out = gru.run(tokens, cache=["blocks.0.hidden"], grad=True)
    (g,) = torch.autograd.grad((out.logits * w).sum(), out.cache["blocks.0.hidden"])
    assert torch.allclose(g, torch.stack(ref, 1), atol=1e-6)


def test_fit_trains_and_save_load_roundtrip(task, tokens, tmp_path):
    adapter = GRUAdapter.for_task(task, seed=0, d_model=16)
    report = adapter.fit(task, 0, steps=20, eval_every=10, n_train=256, batch=32)
    assert 0.0 <= report.accuracy <= 1.0 and report.steps == 20
    adapter.save(tmp_path / "org")
    back = GRUAdapter.load(tmp_path / "org")
    assert torch.equal(back.forward(tokens), adapter.forward(tokens))


@pytest.mark.parametrize("task_", [Parity(n_bits=6, k=2), Count(length=5, m=2)], ids=["parity", "count"])
def test_probe_and_patching_run_end_to_end(task_):
    adapter = GRUAdapter.for_task(task_, seed=0, d_model=16)
    probe = Probe(n_train=128, n_test=64, steps=10)(adapter, task_, 0)
    assert probe.applicable and 0.0 <= probe.score <= 1.0
    patch = Patching(n_pairs=32)(adapter, task_, 0)
    assert patch.applicable and 0.0 <= patch.score <= 1.0

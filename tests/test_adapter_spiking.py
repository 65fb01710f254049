"""Spiking adapter: parity with a plain snntorch loop, per-step hooks, membrane edits, I/O."""

import pytest
import torch

from archbench.adapters.spiking import SpikingAdapter
from archbench.hooks import Patch, Zero
from archbench.tasks import Count, Parity
from archbench.techniques.patching import Patching
from archbench.techniques.probe import Probe


@pytest.fixture
def task():
    return Parity(n_bits=6, k=2)  # vocab 3, seq_len 7


@pytest.fixture
def snn_(task):
    # a large input gain so that the random-init network actually spikes
    adapter = SpikingAdapter.for_task(task, seed=0, d_model=32)
    with torch.no_grad():
        adapter.model.embed.weight.mul_(8)
        for block in adapter.model.blocks:
            block.fc.weight.mul_(4)
    return adapter


@pytest.fixture
def tokens(task):
    return task.sample(16, 0).tokens  # (16, 7)


def snntorch_loop(model, tokens):
    """The network run as plain snntorch code: modules called directly, no hook points."""
    x = model.embed(tokens)  # (B, T, d)
    B, T, d = x.shape
    spk = [torch.zeros(B, d) for _ in model.blocks]
    mem = [torch.zeros(B, d) for _ in model.blocks]
    logits = []
    for t in range(T):
        h = x[:, t]
        for i, block in enumerate(model.blocks):
            spk[i], mem[i] = block.lif(block.fc(h), spk[i], mem[i])
            h = spk[i]
        logits.append(model.readout(mem[-1]))
    return torch.stack(logits, 1), spk, mem


def test_forward_is_the_snntorch_loop(snn_, tokens):
    with torch.no_grad():
        own, _, _ = snntorch_loop(snn_.model, tokens)
    out = snn_.run(tokens, cache="all")
    assert out.logits.shape == (16, 7, 3)
    assert torch.equal(out.logits, own)
    assert torch.equal(snn_.run(tokens).logits, own)


def test_every_hook_point_fires_per_step_with_its_axes(snn_, tokens):
    out = snn_.run(tokens, cache="all")
    assert set(out.cache) == set(snn_.specs)
    for name, spec in snn_.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (16, 7), name
    spk = out.cache["blocks.1.spk"]
    assert set(spk.unique().tolist()) <= {0.0, 1.0} and spk.sum() > 0  # binary spikes, some fire
    with torch.no_grad():
        _, spk_last, mem_last = snntorch_loop(snn_.model, tokens)
    assert torch.equal(out.cache["blocks.1.mem"][:, -1], mem_last[1])
    assert torch.equal(out.cache["blocks.0.spk"][:, -1], spk_last[0])
    assert torch.equal(snn_.model.readout(out.cache["blocks.1.mem"]), out.logits)
    assert snn_.names("state") == ["blocks.0.mem", "blocks.1.mem"]


@pytest.mark.parametrize("t", [0, 3, 6])
def test_membrane_edit_at_step_t_acts_from_t_on(snn_, tokens, t):
    base = snn_.run(tokens).logits
    out = snn_.run(tokens, cache=["blocks.1.mem"],
                   interventions={"blocks.1.mem": Zero(positions=[t])})
    assert torch.equal(out.logits[:, :t], base[:, :t])  # before t: untouched
    assert not torch.allclose(out.logits[:, t], base[:, t])  # at t: the readout sees it
    assert out.cache["blocks.1.mem"][:, t].abs().max() == 0  # the cache holds the edit
    if t + 1 < tokens.shape[1]:  # after t: the edited membrane fed the recurrence
        assert not torch.allclose(out.logits[:, t + 1:], base[:, t + 1:])


def test_first_layer_membrane_edit_propagates_to_later_steps(snn_, tokens):
    base = snn_.run(tokens).logits
    out = snn_.run(tokens, interventions={"blocks.0.mem": Zero(positions=[2])}).logits
    assert torch.equal(out[:, :2], base[:, :2])
    assert not torch.allclose(out[:, 3:], base[:, 3:])


def test_patching_the_state_at_step_t_carries_the_source_history(snn_, tokens):
    """Base and source differ only up to step t; patching every layer's state at t makes
    every later step identical to the source run: the patched values feed the recurrence."""
    t = 3
    source = tokens.clone()
    source[:, : t + 1] = (tokens[:, : t + 1] + 1) % 2  # flip the bits up to t
    names = [n for n in snn_.specs if n.startswith("blocks.")]
    src = snn_.run(source, cache=names).cache
    out = snn_.run(tokens, interventions={n: Patch(src[n], positions=[t]) for n in names}).logits
    ref = snn_.run(source).logits
    assert torch.allclose(out[:, t:], ref[:, t:], atol=1e-6)
    assert not torch.allclose(out[:, :t], ref[:, :t])


def test_gradients_flow_through_the_membrane(snn_, tokens):
    out = snn_.run(tokens, cache=["blocks.0.mem"], grad=True)
    (g,) = torch.autograd.grad(out.logits[:, -1].sum(), out.cache["blocks.0.mem"])
    assert g.shape == (16, 7, 32) and g.abs().sum() > 0


def test_gradients_equal_the_snntorch_loop(snn_, tokens):
    """Parameter gradients and gradients with respect to the cached per-step membranes equal
    those of the plain loop, which keeps every step's carried membrane as a graph node (after
    the step's spikes were fired from it, as at the hook point)."""
    model = snn_.model
    x = model.embed(tokens)
    B, T, d = x.shape
    spk = [torch.zeros(B, d) for _ in model.blocks]
    mem = [torch.zeros(B, d) for _ in model.blocks]
    mems, logits = [], []
    for t in range(T):
        h = x[:, t]
        for i, block in enumerate(model.blocks):
            spk[i], mem[i] = block.lif(block.fc(h), spk[i], mem[i])
            mem[i] = mem[i] + 0.0  # the carried membrane: a node of its own
            h = spk[i]
        mems.append(mem[0])
        logits.append(model.readout(mem[-1]))
    params = list(model.parameters())
    w = torch.randn(B, T, 3, generator=torch.Generator().manual_seed(3))
    ref = torch.autograd.grad((torch.stack(logits, 1) * w).sum(), params + mems, allow_unused=True)
    ref = [torch.zeros(B, d) if g is None else g for g in ref]  # the last carried membrane: unused
    for cache in (None, ["blocks.0.mem"]):
        out = snn_.run(tokens, cache=cache, grad=True)
        inputs = params + ([out.cache["blocks.0.mem"]] if cache else [])
        got = torch.autograd.grad((out.logits * w).sum(), inputs)
        for a, b in zip(got[:len(params)], ref[:len(params)]):
            assert torch.allclose(a, b, atol=1e-6)
        if cache:
            assert torch.allclose(got[-1], torch.stack(ref[len(params):], 1), atol=1e-6)


def test_fit_trains_and_save_load_roundtrip(task, tokens, tmp_path):
    adapter = SpikingAdapter.for_task(task, seed=0, d_model=16)
    report = adapter.fit(task, 0, steps=20, eval_every=10, n_train=256, batch=32)
    assert 0.0 <= report.accuracy <= 1.0 and report.steps == 20
    adapter.save(tmp_path / "org")
    back = SpikingAdapter.load(tmp_path / "org")
    assert torch.equal(back.forward(tokens), adapter.forward(tokens))


@pytest.mark.parametrize("task_", [Parity(n_bits=6, k=2), Count(length=5, m=2)], ids=["parity", "count"])
def test_probe_and_patching_run_end_to_end(task_):
    adapter = SpikingAdapter.for_task(task_, seed=0, d_model=16)
    probe = Probe(n_train=128, n_test=64, steps=10)(adapter, task_, 0)
    assert probe.applicable and 0.0 <= probe.score <= 1.0
    assert {d["site"] for d in probe.details} == {"input", "blocks.0.mem", "blocks.0.spk",
                                                  "blocks.1.mem", "blocks.1.spk"}
    patch = Patching(n_pairs=32)(adapter, task_, 0)
    assert patch.applicable and 0.0 <= patch.score <= 1.0

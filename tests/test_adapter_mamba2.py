"""The Mamba-2 adapter: parity with Hugging Face, the per-step SSM state is readable and patchable."""

import pytest
import torch
from transformers import Mamba2ForCausalLM

from archbench.adapters.mamba2 import Mamba2Adapter
from archbench.hooks import Patch, Zero
from archbench.tasks.modadd import ModAdd
from mamba2_reference import reference_states, rerun_from  # tests/mamba2_reference.py

torch.set_num_threads(1)
T = 10  # longer than the default chunk_size (8): transformers' scan crosses a chunk boundary


@pytest.fixture
def mamba2():
    return Mamba2Adapter.build(vocab_size=10, seq_len=T, seed=0)


@pytest.fixture
def tokens():
    return torch.randint(0, 10, (4, T), generator=torch.Generator().manual_seed(0))  # (B, T)


def test_no_hook_run_is_exactly_the_wrapped_model(mamba2, tokens):
    with torch.no_grad():
        own = mamba2.model(input_ids=tokens, use_cache=False).logits
    assert torch.equal(mamba2.run(tokens).logits, own)
    # the hooked sequential scan equals transformers' chunked scan up to float rounding
    assert torch.allclose(mamba2.run(tokens, cache="all").logits, own, atol=1e-5)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_sequential_scan_equals_transformers_mixer(n_groups):
    adapter = Mamba2Adapter.build(vocab_size=10, seq_len=T, seed=1, n_groups=n_groups, chunk_size=4)
    mixer = adapter.model.backbone.layers[0].mixer
    hidden = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(mixer.scan_forward(hidden), mixer(hidden), atol=1e-5)


@pytest.mark.parametrize("length", [T, 17])
def test_hooked_scan_logits_and_gradients_equal_transformers(mamba2, length):
    """The hooked O(T) sequential scan against transformers' chunked scan: values and gradients."""
    tokens = torch.randint(0, 10, (4, length), generator=torch.Generator().manual_seed(0))
    ref = Mamba2ForCausalLM(mamba2.model.config)
    ref.load_state_dict(mamba2.model.state_dict())
    ref.eval()
    w = torch.randn(4, length, 10, generator=torch.Generator().manual_seed(3))
    ours = mamba2.run(tokens, cache="state", grad=True).logits
    theirs = ref(input_ids=tokens, use_cache=False).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    g_ours = torch.autograd.grad((ours * w).sum(), list(mamba2.model.parameters()))
    g_theirs = torch.autograd.grad((theirs * w).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(mamba2.model.named_parameters(), g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_state_equals_an_independent_recomputation(mamba2, tokens):
    c = mamba2.run(tokens, cache="all").cache
    block = mamba2.model.backbone.layers[1]
    with torch.no_grad():
        ref = reference_states(block.mixer, block.norm(c["blocks.0.resid_post"]))
    assert torch.allclose(c["blocks.1.ssm.state"], ref, atol=1e-6)


def test_every_hook_point_fires_with_its_axes(mamba2, tokens):
    out = mamba2.run(tokens, cache="all")
    assert set(out.cache) == set(mamba2.specs)
    for name, spec in mamba2.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, T), name
    assert mamba2.specs["blocks.0.ssm.state"].axes == ("batch", "pos", "heads", "head_dim", "d_state")
    assert out.cache["blocks.0.ssm.state"].shape == (4, T, 8, 16, 16)
    c = out.cache
    assert torch.allclose(c["blocks.1.resid_post"], c["blocks.0.resid_post"] + c["blocks.1.ssm.out"], atol=1e-6)
    assert torch.allclose(mamba2.decode(c["blocks.1.resid_post"]), out.logits, atol=1e-5)
    assert mamba2.names("state") == ["blocks.0.ssm.state", "blocks.1.ssm.state"]


def test_zero_mixer_changes_logits_only_downstream(mamba2, tokens):
    base = mamba2.run(tokens).logits
    out = mamba2.run(tokens, interventions={"blocks.0.ssm.out": Zero(positions=[3])}).logits
    assert torch.allclose(out[:, :3], base[:, :3], atol=1e-6)  # chunked scan: rounding only
    assert not torch.allclose(out[:, 3:], base[:, 3:])


@pytest.mark.parametrize("t", [0, 4, T - 1])
def test_patching_state_at_t_is_rerunning_the_scan_from_it(mamba2, tokens, t):
    source = tokens.flip(0)
    name = "blocks.0.ssm.state"
    src = mamba2.run(source, cache=[name]).cache[name]
    clean = mamba2.run(tokens, cache=[name, "blocks.0.ssm.out"])
    out = mamba2.run(tokens, cache=[name, "blocks.0.ssm.out"], interventions={name: Patch(src, positions=[t])})
    assert torch.equal(out.logits[:, :t], clean.logits[:, :t])  # steps before t unchanged
    assert not torch.allclose(out.logits[:, t:], clean.logits[:, t:])  # t and later change
    states = out.cache[name]
    assert torch.equal(states[:, :t], clean.cache[name][:, :t])
    assert torch.equal(states[:, t], src[:, t])
    # expected: the scan rerun by hand from the patched state at t, and the mixer output from it
    block = mamba2.model.backbone.layers[0]
    mixer = block.mixer
    with torch.no_grad():
        hidden = block.norm(mamba2.run(tokens, cache="embed").cache["embed"])
        rerun, expected = rerun_from(mixer, hidden, src[:, t], t)
    assert torch.allclose(states[:, t:], rerun, atol=1e-6)
    assert torch.allclose(out.cache["blocks.0.ssm.out"][:, t:], expected, atol=1e-5)


def test_zero_state_at_t_forgets_the_past(mamba2, tokens):
    name = "blocks.0.ssm.state"
    other = tokens.clone()
    other[:, :3] = (other[:, :3] + 1) % 10  # a different prefix (positions 0-2), same suffix
    a = mamba2.run(tokens, cache=[name], interventions={name: Zero(positions=[2])}).cache[name]
    b = mamba2.run(other, cache=[name], interventions={name: Zero(positions=[2])}).cache[name]
    assert torch.equal(a[:, 2], torch.zeros_like(a[:, 2]))
    # after a zeroed state, the conv window (4) still sees the prefix until it has passed
    assert not torch.allclose(a[:, 3], b[:, 3])
    # zeroed once the window has passed the prefix, the state no longer depends on it
    a = mamba2.run(tokens, cache=[name], interventions={name: Zero(positions=[5])}).cache[name]
    b = mamba2.run(other, cache=[name], interventions={name: Zero(positions=[5])}).cache[name]
    assert torch.equal(a[:, 6:], b[:, 6:])


def test_hooks_removed_and_default_path_restored(mamba2, tokens):
    mamba2.run(tokens, cache="state", interventions={"blocks.1.ssm.state": Zero()})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in mamba2.model.modules())
    assert all(b.mixer.hook_state.used is None for b in mamba2.model.backbone.layers)


def test_loads_local_huggingface_checkpoint(mamba2, tokens, tmp_path):
    mamba2.model.save_pretrained(tmp_path / "hf")
    wrapped = Mamba2Adapter.from_pretrained(tmp_path / "hf")
    reference = Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        own = reference(input_ids=tokens, use_cache=False).logits
    assert torch.equal(wrapped.run(tokens).logits, own)
    assert torch.allclose(wrapped.run(tokens, cache="state").logits, own, atol=1e-5)
    assert wrapped.config["head_dim"] == 16 and wrapped.config["chunk_size"] == 8

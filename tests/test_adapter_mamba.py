"""The Mamba adapter: parity with Hugging Face, the per-step SSM state is readable and patchable."""

import pytest
import torch
from transformers import MambaForCausalLM
from transformers.models.mamba import modeling_mamba as hf_mamba

from archbench.adapters.mamba import MambaAdapter
from archbench.hooks import Patch, Zero
from archbench.tasks.modadd import ModAdd

torch.set_num_threads(1)


@pytest.fixture
def mamba():
    return MambaAdapter.build(vocab_size=10, seq_len=6, seed=0)


@pytest.fixture
def tokens():
    return torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))  # (B, T)


def _reference_states(mixer, hidden):
    """The states recomputed independently from x_proj, dt_proj and A_log (Gu & Dao 2023, eq. 2)."""
    xz = mixer.in_proj(hidden).transpose(1, 2)
    x, _ = xz.chunk(2, dim=1)
    T = x.shape[-1]
    x = torch.nn.functional.silu(mixer.conv1d(x)[..., :T]).transpose(1, 2)  # (B, T, d_inner)
    dt, B, _ = torch.split(mixer.x_proj(x), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], -1)
    dt = torch.nn.functional.softplus(mixer.dt_proj(dt))  # (B, T, d_inner)
    A = -torch.exp(mixer.A_log)
    h, out = torch.zeros(x.shape[0], x.shape[2], A.shape[1]), []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        out.append(h)
    return torch.stack(out, 1)  # (B, T, d_inner, d_state)


def test_no_hook_run_is_exactly_the_wrapped_model(mamba, tokens):
    with torch.no_grad():
        own = mamba.model(input_ids=tokens, use_cache=False).logits
    assert torch.equal(mamba.run(tokens).logits, own)
    assert torch.equal(mamba.run(tokens, cache="all").logits, own)  # the hooked scan is bit-equal


def _transformers_copy(adapter):
    """The same weights in transformers' own, unmodified MambaForCausalLM."""
    ref = MambaForCausalLM(adapter.model.config)
    ref.load_state_dict(adapter.model.state_dict())
    return ref.eval()


def _logits_and_grads(model_or_run, tokens):
    """Logits and every parameter's gradient of a fixed random readout of them."""
    logits, params = model_or_run(tokens)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((logits * w).sum(), params)
    return logits.detach(), grads


@pytest.mark.parametrize("cache", [None, "state"])  # archbench's O(T) loop, unhooked and hooked
@pytest.mark.parametrize("T", [6, 17])
def test_logits_and_gradients_equal_transformers(mamba, cache, T):
    tokens = torch.randint(0, 10, (4, T), generator=torch.Generator().manual_seed(0))
    ref = _transformers_copy(mamba)
    ours, ours_grads = _logits_and_grads(
        lambda x: (mamba.run(x, cache=cache, grad=True).logits, list(mamba.model.parameters())), tokens)
    theirs, their_grads = _logits_and_grads(
        lambda x: (ref(input_ids=x, use_cache=False).logits, list(ref.parameters())), tokens)
    assert torch.equal(ours, theirs)  # the forward is the same operations
    for (name, _), a, b in zip(mamba.model.named_parameters(), ours_grads, their_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("hooked", [False, True])
def test_scan_equals_transformers_mixer_with_input_gradients(mamba, hooked):
    mixer = mamba.model.backbone.layers[0].mixer
    hidden = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(2))
    handle = mixer.hook_state.register_forward_hook(lambda m, i, o: None) if hooked else None
    try:
        ours = mixer(hidden)
    finally:
        if handle is not None:
            handle.remove()
    theirs = hf_mamba.MambaMixer.forward(mixer, hidden)  # transformers' own torch scan
    assert torch.equal(ours, theirs)
    g_ours, = torch.autograd.grad((ours * w).sum(), hidden)
    g_theirs, = torch.autograd.grad((theirs * w).sum(), hidden)
    assert torch.allclose(g_ours, g_theirs, atol=1e-5)


def test_state_equals_an_independent_recomputation(mamba, tokens):
    c = mamba.run(tokens, cache="all").cache
    block = mamba.model.backbone.layers[1]
    with torch.no_grad():
        ref = _reference_states(block.mixer, block.norm(c["blocks.0.resid_post"]))
    assert torch.allclose(c["blocks.1.ssm.state"], ref, atol=1e-5)


def test_every_hook_point_fires_with_its_axes(mamba, tokens):
    out = mamba.run(tokens, cache="all")
    assert set(out.cache) == set(mamba.specs)
    for name, spec in mamba.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, 6), name
    assert out.cache["blocks.0.ssm.state"].shape == (4, 6, 128, 16)
    c = out.cache
    assert torch.allclose(c["blocks.1.resid_post"], c["blocks.0.resid_post"] + c["blocks.1.ssm.out"], atol=1e-6)
    assert torch.allclose(mamba.decode(c["blocks.1.resid_post"]), out.logits, atol=1e-5)
    assert mamba.names("state") == ["blocks.0.ssm.state", "blocks.1.ssm.state"]


def test_zero_mixer_changes_logits_only_downstream(mamba, tokens):
    base = mamba.run(tokens).logits
    out = mamba.run(tokens, interventions={"blocks.0.ssm.out": Zero(positions=[3])}).logits
    assert torch.equal(out[:, :3], base[:, :3])
    assert not torch.allclose(out[:, 3:], base[:, 3:])


@pytest.mark.parametrize("t", [0, 2, 5])
def test_patching_state_at_t_is_rerunning_the_scan_from_it(mamba, tokens, t):
    source = tokens.flip(0)
    name = "blocks.0.ssm.state"
    src = mamba.run(source, cache=[name]).cache[name]
    clean = mamba.run(tokens, cache=[name, "blocks.0.ssm.out"])
    out = mamba.run(tokens, cache=[name, "blocks.0.ssm.out"], interventions={name: Patch(src, positions=[t])})
    assert torch.equal(out.logits[:, :t], clean.logits[:, :t])  # steps before t unchanged
    assert not torch.allclose(out.logits[:, t:], clean.logits[:, t:])  # t and later change
    # expected: the scan rerun by hand from the patched state at t
    mixer = mamba.model.backbone.layers[0].mixer
    hidden = mamba.model.backbone.layers[0].norm(mamba.run(tokens, cache="embed").cache["embed"])
    states = out.cache[name]
    assert torch.equal(states[:, :t], clean.cache[name][:, :t])
    assert torch.equal(states[:, t], src[:, t])
    with torch.no_grad():
        ref = _reference_states(mixer, hidden)  # clean recomputation; now rerun it from the patch
        xz = mixer.in_proj(hidden).transpose(1, 2)
        x = torch.nn.functional.silu(mixer.conv1d(xz.chunk(2, 1)[0])[..., :6]).transpose(1, 2)
        dt, B, _ = torch.split(mixer.x_proj(x), [mixer.time_step_rank, 16, 16], -1)
        dt = torch.nn.functional.softplus(mixer.dt_proj(dt))
        h = src[:, t]
        for s in range(t + 1, 6):
            h = torch.exp(dt[:, s, :, None] * -torch.exp(mixer.A_log)) * h + dt[:, s, :, None] * B[:, s, None, :] * x[:, s, :, None]
            assert torch.allclose(states[:, s], h, atol=1e-5)
    assert torch.allclose(ref, clean.cache[name], atol=1e-5)


def test_patching_every_state_reproduces_the_source_mixer(mamba, tokens):
    source = tokens.flip(0)
    name = "blocks.0.ssm.state"
    src = mamba.run(source, cache=[name]).cache[name]
    out = mamba.run(tokens, cache=["blocks.0.ssm.out"], interventions={name: Patch(src)})
    assert not torch.allclose(out.cache["blocks.0.ssm.out"], mamba.run(tokens, cache=["blocks.0.ssm.out"]).cache["blocks.0.ssm.out"])


def test_zero_state_at_t_forgets_the_past(mamba, tokens):
    name = "blocks.0.ssm.state"
    a = mamba.run(tokens, cache=[name], interventions={name: Zero(positions=[2])}).cache[name]
    other = tokens.clone()
    other[:, :3] = (other[:, :3] + 1) % 10  # a different prefix, same suffix
    b = mamba.run(other, cache=[name], interventions={name: Zero(positions=[2])}).cache[name]
    # after a zeroed state, the conv window (4) still sees the prefix until it has passed
    assert torch.equal(a[:, 2], torch.zeros_like(a[:, 2]))
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_hooks_removed_and_default_path_restored(mamba, tokens):
    mamba.run(tokens, cache="state", interventions={"blocks.1.ssm.state": Zero()})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in mamba.model.modules())
    assert all(b.mixer.hook_state.used is None for b in mamba.model.backbone.layers)


def test_loads_local_huggingface_checkpoint(mamba, tokens, tmp_path):
    mamba.model.save_pretrained(tmp_path / "hf")
    wrapped = MambaAdapter.from_pretrained(tmp_path / "hf")
    reference = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        own = reference(input_ids=tokens, use_cache=False).logits
    assert torch.equal(wrapped.run(tokens).logits, own)
    assert torch.equal(wrapped.run(tokens, cache="state").logits, own)

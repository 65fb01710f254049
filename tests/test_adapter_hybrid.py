"""The hybrid (Bamba) adapter: parity with Hugging Face, attention and SSM paths as separate hook
points, the Mamba-2 per-step state readable and patchable."""

import pytest
import torch
from transformers import BambaConfig, BambaForCausalLM

from archbench.adapters.hybrid import HybridAdapter
from archbench.hooks import Patch, Zero
from mamba2_reference import rerun_from  # tests/mamba2_reference.py

torch.set_num_threads(1)
T = 10  # longer than the default chunk_size (8): transformers' scan crosses a chunk boundary
V = 10


def _spread(adapter):
    """transformers' init makes the SSM term tiny (in_proj std 0.02: the state moves logits by
    ~1e-6) and fast-decaying (A = -1..-H with dt ~ softplus(1)): widen in_proj and slow the decay."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in adapter.model.model.layers:
            if block.block_type == "linear_attention":
                block.mamba.in_proj.weight.normal_(0, 0.3, generator=gen)
                block.mamba.A_log.uniform_(-3, -1, generator=gen)
    return adapter


@pytest.fixture
def hybrid():
    return _spread(HybridAdapter.build(vocab_size=V, seq_len=T, seed=0))  # layer 0 Mamba-2, layer 1 attention


@pytest.fixture
def tokens():
    return torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(0))  # (B, T)


def _reference(adapter, attn_implementation=None):
    """transformers' own BambaForCausalLM with the adapter's weights (sdpa attention unless told)."""
    config = BambaConfig.from_dict(adapter.model.config.to_dict())
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    ref = BambaForCausalLM(config)
    ref.load_state_dict(adapter.model.state_dict())
    return ref.eval()


def test_no_hook_run_is_exactly_the_wrapped_model(hybrid, tokens):
    with torch.no_grad():
        own = hybrid.model(input_ids=tokens, use_cache=False).logits
        sdpa = _reference(hybrid)(input_ids=tokens, use_cache=False).logits
        eager = _reference(hybrid, "eager")(input_ids=tokens, use_cache=False).logits
    assert torch.equal(hybrid.run(tokens).logits, own)
    assert torch.equal(own, eager)  # archbench's editable eager attention is transformers' eager, bit for bit
    assert torch.allclose(own, sdpa, atol=1e-5)
    # the hooked sequential scan equals transformers' chunked scan up to float rounding
    assert torch.allclose(hybrid.run(tokens, cache="all").logits, sdpa, atol=1e-5)
    assert torch.allclose(hybrid.run(tokens, cache="all").logits, eager, atol=1e-5)


def test_sequential_scan_equals_transformers_mixer():
    adapter = HybridAdapter.build(vocab_size=V, seq_len=T, seed=1, n_groups=2, chunk_size=4)
    mixer = adapter.model.model.layers[0].mamba
    hidden = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(mixer.scan_forward(hidden), mixer(hidden), atol=1e-5)


@pytest.mark.parametrize("length", [T, 17])
def test_hooked_scan_logits_and_gradients_equal_transformers(hybrid, length):
    tokens = torch.randint(0, V, (4, length), generator=torch.Generator().manual_seed(0))
    ref = _reference(hybrid)
    w = torch.randn(4, length, V, generator=torch.Generator().manual_seed(3))
    ours = hybrid.run(tokens, cache="state", grad=True).logits
    theirs = ref(input_ids=tokens, use_cache=False).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    g_ours = torch.autograd.grad((ours * w).sum(), list(hybrid.model.parameters()))
    g_theirs = torch.autograd.grad((theirs * w).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(hybrid.model.named_parameters(), g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_attention_pattern_is_transformers_own(hybrid, tokens):
    out = hybrid.run(tokens, cache="attn_pattern")
    with torch.no_grad():
        theirs = _reference(hybrid, "eager")(input_ids=tokens, use_cache=False, output_attentions=True).attentions
    assert len(theirs) == 1  # one attention layer
    pattern = out.cache["blocks.1.attn.pattern"]  # (B, q, head, k)
    assert torch.equal(pattern, theirs[0].permute(0, 2, 1, 3))
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-6)
    assert torch.equal(pattern.permute(0, 2, 1, 3).triu(1), torch.zeros_like(theirs[0]))  # causal


def test_every_hook_point_fires_with_its_axes_and_roles(hybrid, tokens):
    out = hybrid.run(tokens, cache="all")
    assert set(out.cache) == set(hybrid.specs)
    for name, spec in hybrid.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, T), name
    mixer = hybrid.model.model.layers[0].mamba
    assert hybrid.specs["blocks.0.ssm.state"].axes == ("batch", "pos", "heads", "head_dim", "d_state")
    assert out.cache["blocks.0.ssm.state"].shape == (4, T, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size)
    assert out.cache["blocks.1.attn.pattern"].shape == (4, T, 4, T)
    # the path is in the name: one mixer per layer, SSM in layer 0, attention in layer 1
    assert hybrid.names("mixer") == ["blocks.0.ssm.out", "blocks.1.attn.out"]
    assert hybrid.names("state") == ["blocks.0.ssm.state"]
    assert hybrid.names("attn_pattern") == ["blocks.1.attn.pattern"]
    assert hybrid.names("mlp") == ["blocks.0.mlp.out", "blocks.1.mlp.out"]
    c = out.cache
    assert torch.allclose(c["blocks.0.resid_mid"], c["embed"] + c["blocks.0.ssm.out"], atol=1e-6)
    assert torch.allclose(c["blocks.1.resid_post"], c["blocks.0.resid_post"] + c["blocks.1.attn.out"]
                          + c["blocks.1.mlp.out"], atol=1e-5)
    assert torch.allclose(c["blocks.1.attn.head_out"].sum(2), c["blocks.1.attn.out"], atol=1e-5)
    assert torch.allclose(hybrid.decode(c["blocks.1.resid_post"]), out.logits, atol=1e-5)


@pytest.mark.parametrize("attn_layers", [[1], [0]])
def test_which_path_zeroing_a_mixer_changes_only_the_right_positions(attn_layers, tokens):
    """Zeroing layer 0's mixer at t changes the logits from t on (layer 1 carries it forward);
    zeroing the last layer's mixer at t changes position t only; neither touches steps before t."""
    adapter = _spread(HybridAdapter.build(vocab_size=V, seq_len=T, seed=0, attn_layers=attn_layers))
    first, last = ("ssm", "attn") if attn_layers == [1] else ("attn", "ssm")
    t = 3
    base = adapter.run(tokens).logits
    out = adapter.run(tokens, interventions={f"blocks.0.{first}.out": Zero(positions=[t])}).logits
    assert torch.equal(out[:, :t], base[:, :t])
    assert ((out - base).abs().amax(-1)[:, t:] > 1e-4).all()  # t and every later position change
    out = adapter.run(tokens, interventions={f"blocks.1.{last}.out": Zero(positions=[t])}).logits
    changed = (out - base).abs().amax(-1) > 1e-6  # (B, T)
    assert changed[:, t].all() and not changed[:, :t].any() and not changed[:, t + 1:].any()


def test_editing_the_pattern_takes_effect_at_its_query_position(hybrid, tokens):
    name = "blocks.1.attn.pattern"
    base = hybrid.run(tokens).logits
    uniform = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]  # (q, k): causal mean
    t = 6
    out = hybrid.run(tokens, interventions={name: Patch(uniform[None, :, None, :].expand(4, T, 4, T),
                                                        positions=[t])})
    changed = (out.logits - base).abs().amax(-1) > 1e-6  # (B, T): attention is the last mixer
    assert changed[:, t].all() and not changed[:, :t].any() and not changed[:, t + 1:].any()


@pytest.mark.parametrize("t", [0, 4, T - 1])
def test_patching_state_at_t_is_rerunning_the_scan_from_it(hybrid, tokens, t):
    source = tokens.flip(0)
    name = "blocks.0.ssm.state"
    src = hybrid.run(source, cache=[name]).cache[name]
    clean = hybrid.run(tokens, cache=[name, "blocks.0.ssm.out"])
    out = hybrid.run(tokens, cache=[name, "blocks.0.ssm.out"], interventions={name: Patch(src, positions=[t])})
    assert torch.equal(out.logits[:, :t], clean.logits[:, :t])  # steps before t unchanged
    assert ((out.logits - clean.logits).abs().amax(-1)[:, t:] > 1e-5).all()  # t and every later step change
    states = out.cache[name]
    assert torch.equal(states[:, :t], clean.cache[name][:, :t])
    assert torch.equal(states[:, t], src[:, t])
    # expected: the scan rerun by hand from the patched state at t, and the mixer output from it
    block = hybrid.model.model.layers[0]
    mixer = block.mamba
    with torch.no_grad():
        hidden = block.input_layernorm(hybrid.run(tokens, cache="embed").cache["embed"])
        rerun, expected = rerun_from(mixer, hidden, src[:, t], t)
    assert torch.allclose(states[:, t:], rerun, atol=1e-6)
    assert torch.allclose(out.cache["blocks.0.ssm.out"][:, t:], expected, atol=1e-5)


def test_zero_state_forgets_the_prefix_once_the_conv_window_has_passed(hybrid, tokens):
    name = "blocks.0.ssm.state"
    other = tokens.clone()
    other[:, :3] = (other[:, :3] + 1) % V  # a different prefix (positions 0-2), same suffix
    a = hybrid.run(tokens, cache=[name], interventions={name: Zero(positions=[5])}).cache[name]
    b = hybrid.run(other, cache=[name], interventions={name: Zero(positions=[5])}).cache[name]
    assert torch.equal(a[:, 5], torch.zeros_like(a[:, 5]))
    assert torch.equal(a[:, 6:], b[:, 6:])  # conv window 4: from 6 on the state no longer sees positions 0-2
    assert not torch.allclose(a[:, :5], b[:, :5])


def test_hooks_removed_and_default_path_restored(hybrid, tokens):
    hybrid.run(tokens, cache="all", interventions={"blocks.0.ssm.state": Zero(), "blocks.1.attn.pattern": Zero()})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in hybrid.model.modules())
    assert hybrid.model.model.layers[0].mamba.hook_state.used is None
    with torch.no_grad():
        assert torch.equal(hybrid.run(tokens).logits, hybrid.model(input_ids=tokens, use_cache=False).logits)


def test_loads_local_huggingface_checkpoint_and_rebuilds_it_from_hf_config(hybrid, tokens, tmp_path):
    hybrid.model.save_pretrained(tmp_path / "hf")
    wrapped = HybridAdapter.from_pretrained(tmp_path / "hf")
    reference = BambaForCausalLM.from_pretrained(tmp_path / "hf").eval()  # transformers' default attention
    eager = BambaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        own, own_eager = (m(input_ids=tokens, use_cache=False).logits for m in (reference, eager))
    assert torch.equal(wrapped.run(tokens).logits, own_eager)
    assert torch.allclose(wrapped.run(tokens).logits, own, atol=1e-5)
    assert torch.allclose(wrapped.run(tokens, cache="all").logits, own, atol=1e-5)
    assert wrapped.config["attn_layers"] == [1] and wrapped.config["ssm_head_dim"] == hybrid.config["ssm_head_dim"]
    # build_model from the checkpoint's config: the same architecture (the random-init control)
    rebuilt = HybridAdapter.build_model({"hf_config": wrapped.config["hf_config"]})
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in wrapped.model.state_dict().items()}
    assert [b.block_type for b in rebuilt.model.layers] == ["linear_attention", "full_attention"]


@pytest.mark.parametrize("attn_layers", [[], [0, 1]])
def test_a_stack_without_both_kinds_of_layer_is_refused(attn_layers):
    with pytest.raises(ValueError, match="attn_layers"):
        HybridAdapter.build(vocab_size=V, seq_len=T, seed=0, attn_layers=attn_layers)

"""The Gated DeltaNet (Qwen3-Next) adapter: parity with transformers, the per-step delta-rule
memory is readable and patchable, checkpoints load."""

import pytest
import torch
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                torch_recurrent_gated_delta_rule)

from archbench.adapters.deltanet import DeltaNetAdapter, delta_rule_scan
from archbench.hooks import Add, Patch, Zero

torch.set_num_threads(1)

STATE0 = "blocks.0.deltanet.state"


def spread_decays(adapter):
    """transformers draws A in (0.01, 16): heads with A ~ 16 forget within a step. Slower decays
    make every head carry its memory forward, so state edits visibly travel."""
    with torch.no_grad():
        for layer in adapter.model.model.layers:
            if layer.block_type == "linear_attention":
                layer.linear_attn.A_log.uniform_(-3, 0, generator=torch.Generator().manual_seed(2))
    return adapter


@pytest.fixture(params=["linear", "mixed"])
def deltanet(request):
    """all-Gated-DeltaNet; and mixed: block 1 full attention, 2 key heads for 4 value heads."""
    extra = {} if request.param == "linear" else {"attention_layers": [1], "n_key_heads": 2}
    return spread_decays(DeltaNetAdapter.build(vocab_size=10, seq_len=10, seed=0, d_model=32, **extra))


@pytest.fixture
def plain():
    return spread_decays(DeltaNetAdapter.build(vocab_size=10, seq_len=10, seed=0, d_model=32))


def toks(T, seed=0, B=4):
    return torch.randint(0, 10, (B, T), generator=torch.Generator().manual_seed(seed))  # (B, T)


def reference(adapter):
    """transformers' own class with the adapter's weights (no archbench module in it)."""
    ref = Qwen3NextForCausalLM(adapter.model.config)
    ref.load_state_dict(adapter.model.state_dict())
    return ref.eval()


def test_no_hook_run_is_exactly_the_wrapped_model(deltanet):
    tokens = toks(10)
    with torch.no_grad():
        own = reference(deltanet)(input_ids=tokens, use_cache=False).logits
    assert torch.equal(deltanet.run(tokens).logits, own)
    # hooked, the delta rule runs step by step: transformers' chunked form up to float order
    assert torch.allclose(deltanet.run(tokens, cache="all").logits, own, atol=1e-5)


def test_scan_is_transformers_recurrent_rule_with_the_state_read_at_each_step():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 7, 2, 8, generator=gen)  # (B, T, H_k, d_k): 2 key heads
    v = torch.randn(3, 7, 4, 6, generator=gen)  # (B, T, H, d_v): 4 value heads
    g = -torch.rand(3, 7, 4, generator=gen)  # (B, T, H) log decay
    beta = torch.rand(3, 7, 4, generator=gen)
    out, states = delta_rule_scan(q, k, v, g, beta)
    ref, final = torch_recurrent_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                                  use_qk_l2norm_in_kernel=True)
    assert torch.equal(out, ref)
    chunk, _ = torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4, use_qk_l2norm_in_kernel=True)
    assert torch.allclose(out, chunk, atol=1e-5)
    assert states.shape == (3, 7, 4, 8, 6) and torch.equal(states[:, 0], torch.zeros(3, 4, 8, 6))
    # the state read at step t is transformers' final state after tokens 0..t-1
    for t in range(1, 7):
        _, st = torch_recurrent_gated_delta_rule(q[:, :t], k[:, :t], v[:, :t], g[:, :t], beta[:, :t],
                                                 output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert torch.allclose(states[:, t], st, atol=1e-6)
    # continuing transformers' recurrence from it gives the same outputs
    rest, _ = torch_recurrent_gated_delta_rule(q[:, 3:], k[:, 3:], v[:, 3:], g[:, 3:], beta[:, 3:],
                                               initial_state=states[:, 3], use_qk_l2norm_in_kernel=True)
    assert torch.allclose(rest, out[:, 3:], atol=1e-6)


@pytest.mark.parametrize("cache", [None, "state"])  # transformers' chunked forward, and the hooked scan
@pytest.mark.parametrize("T", [6, 70])  # 70: more than one of transformers' 64-step chunks
def test_logits_and_gradients_equal_transformers(plain, cache, T):
    tokens = toks(T, B=2)
    ref = reference(plain)
    w = torch.randn(2, T, 10, generator=torch.Generator().manual_seed(3))
    ours = plain.run(tokens, cache=cache, grad=True).logits
    theirs = ref(input_ids=tokens, use_cache=False).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and (cache is not None or torch.equal(ours, theirs))
    g_ours = torch.autograd.grad((ours * w).sum(), list(plain.model.parameters()))
    g_theirs = torch.autograd.grad((theirs * w).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(plain.model.named_parameters(), g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_every_hook_point_fires_with_its_axes(deltanet):
    tokens = toks(10)
    out = deltanet.run(tokens, cache="all")
    assert set(out.cache) == set(deltanet.specs)
    for name, spec in deltanet.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, 10), name
    assert out.cache[STATE0].shape == (4, 10, 4, 8, 8)  # (batch, pos, heads, d_k, d_v)
    c = out.cache
    mixer1 = "blocks.1.deltanet.out" if "blocks.1.deltanet.out" in c else "blocks.1.attn.out"
    assert torch.allclose(c["blocks.1.resid_post"], c["blocks.0.resid_post"] + c[mixer1]
                          + c["blocks.1.mlp.out"], atol=1e-5)
    assert torch.allclose(c["blocks.0.resid_post"], c["embed"] + c["blocks.0.deltanet.out"]
                          + c["blocks.0.mlp.out"], atol=1e-5)
    assert torch.allclose(deltanet.decode(c["blocks.1.resid_post"]), out.logits, atol=1e-5)


def test_zero_mixer_changes_logits_only_downstream(deltanet):
    tokens = toks(10)
    base = deltanet.run(tokens).logits
    out = deltanet.run(tokens, interventions={"blocks.0.deltanet.out": Zero(positions=[3])}).logits
    assert torch.equal(out[:, :3], base[:, :3])
    assert not torch.allclose(out[:, 3:], base[:, 3:])


def layer0_inputs(adapter, tokens):
    """Block 0's delta-rule inputs (q, k, v, z, log decay, beta) as transformers computes them."""
    layer = adapter.model.model.layers[0]
    with torch.no_grad():
        hidden = layer.input_layernorm(adapter.model.model.embed_tokens(tokens))  # (B, T, d)
        return layer.linear_attn, layer.linear_attn.delta_inputs(hidden)


@pytest.mark.parametrize("t", [1, 4, 9])
def test_editing_the_state_at_t_is_running_on_from_it(deltanet, t):
    tokens, source = toks(10), toks(10, seed=5)
    src = deltanet.run(source, cache=[STATE0]).cache[STATE0]
    clean = deltanet.run(tokens, cache=[STATE0, "blocks.0.deltanet.out"])
    out = deltanet.run(tokens, cache=[STATE0, "blocks.0.deltanet.out"],
                       interventions={STATE0: Patch(src, positions=[t])})
    assert torch.equal(out.logits[:, :t], clean.logits[:, :t])  # steps before t untouched
    assert not torch.allclose(out.logits[:, t], clean.logits[:, t])  # t changes
    states = out.cache[STATE0]  # the states the recurrence used
    assert torch.equal(states[:, :t], clean.cache[STATE0][:, :t]) and torch.equal(states[:, t], src[:, t])
    if t + 1 < 10:
        assert not torch.allclose(states[:, t + 1], clean.cache[STATE0][:, t + 1])
    # expected: transformers' own recurrence continued from the source state
    att, (q, k, v, z, g, beta) = layer0_inputs(deltanet, tokens)
    with torch.no_grad():
        rest, _ = torch_recurrent_gated_delta_rule(q[:, t:], k[:, t:], v[:, t:], g[:, t:], beta[:, t:],
                                                   initial_state=src[:, t], use_qk_l2norm_in_kernel=True)
        expected = att.readout(rest, z[:, t:])  # (B, T - t, d)
    assert torch.allclose(out.cache["blocks.0.deltanet.out"][:, t:], expected, atol=1e-5)


def test_zeroing_the_state_at_t_forgets_the_prefix(plain):
    tokens = toks(10)
    other = tokens.clone()
    other[:, :5] = (tokens[:, :5] + 1) % 10  # another prefix, same last 5 tokens
    name = "blocks.0.deltanet.out"
    runs = [plain.run(x, cache=[name], interventions={STATE0: Zero(positions=[8])}) for x in (tokens, other)]
    # memory wiped at 8, whose conv window (d_conv = 4 positions, 5..8) no longer sees the prefix
    assert torch.allclose(runs[0].cache[name][:, 8:], runs[1].cache[name][:, 8:], atol=1e-6)
    assert not torch.allclose(runs[0].cache[name][:, 7], runs[1].cache[name][:, 7])


def test_patching_the_state_from_a_source_differing_before_t_gives_the_sources_outputs(plain):
    t, name = 6, "blocks.0.deltanet.out"
    tokens = toks(10)
    source = tokens.clone()
    source[:, :3] = (tokens[:, :3] + 3) % 10  # differs only before t - (d_conv - 1)
    src = plain.run(source, cache=[STATE0, name])
    clean = plain.run(tokens, cache=[STATE0, name]).cache[name]  # hooked: the same scan
    out = plain.run(tokens, cache=[name], interventions={STATE0: Patch(src.cache[STATE0], positions=[t])})
    assert not torch.allclose(clean[:, t:], src.cache[name][:, t:], atol=1e-4)
    assert torch.allclose(out.cache[name][:, t:], src.cache[name][:, t:], atol=1e-6)
    assert torch.equal(out.cache[name][:, :t], clean[:, :t])
    # the conv state is not part of the hook: a source differing at t - 1 still differs after
    near = tokens.clone()
    near[:, t - 1] = (tokens[:, t - 1] + 3) % 10
    near_run = plain.run(near, cache=[STATE0, name])
    out = plain.run(tokens, cache=[name], interventions={STATE0: Patch(near_run.cache[STATE0], positions=[t])})
    assert not torch.allclose(out.cache[name][:, t], near_run.cache[name][:, t], atol=1e-4)


@pytest.mark.parametrize("t", [2, 7])
def test_state_gradients_run_through_later_steps(plain, t):
    tokens = toks(8)
    target = lambda logits: logits[:, -1, 0].sum()  # noqa: E731  one answer logit, last position
    out = plain.run(tokens, cache=[STATE0], grad=True)
    (grad,) = torch.autograd.grad(target(out.logits), out.cache[STATE0])  # (B, T, H, d_k, d_v)
    # the directional derivative along an edit of the state read at t, by central differences
    scale = out.cache[STATE0].detach().std()  # the memories are small: perturb on their scale
    direction = torch.randn(4, 1, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * scale
    eps = 0.1

    def shifted(scale):
        return target(plain.run(tokens, interventions={STATE0: Add(direction, positions=[t], scale=scale)}).logits)

    finite = (shifted(eps) - shifted(-eps)) / (2 * eps)
    analytic = (grad[:, t] * direction[:, 0]).sum()
    assert analytic.abs() > 1e-4 and torch.allclose(finite, analytic, rtol=2e-3)
    # an intervention's output is wired the same way (attribution patching's leaf)
    leaf = {}

    def take(act, spec):
        leaf["act"] = act.detach().requires_grad_(True)
        return leaf["act"]

    logits = plain.run(tokens, interventions={STATE0: take}, grad=True).logits
    (through_take,) = torch.autograd.grad(target(logits), leaf["act"])
    assert torch.allclose(through_take, grad, atol=1e-7)
    assert torch.equal(grad[:, t + 1:].abs().sum() > 0, torch.tensor(t + 1 < 8))  # later steps too


def test_hooks_removed_and_default_path_restored(deltanet):
    tokens = toks(6)
    base = deltanet.run(tokens).logits
    deltanet.run(tokens, cache="state", interventions={STATE0: Zero()})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in deltanet.model.modules())
    layers = deltanet.model.model.layers
    assert all(l.linear_attn.hook_state.used is None for l in layers if l.block_type == "linear_attention")
    assert torch.equal(deltanet.run(tokens).logits, base)


def test_configs_it_cannot_build_raise():
    with pytest.raises(ValueError, match="attention_layers"):
        DeltaNetAdapter.build(vocab_size=10, seq_len=6, seed=0, attention_layers=[2])
    with pytest.raises(ValueError, match="multiple of n_key_heads"):
        DeltaNetAdapter.build(vocab_size=10, seq_len=6, seed=0, n_heads=3, n_key_heads=2)


def tiny_moe_checkpoint():
    """A tiny random Qwen3-Next as a checkpoint would have it: one Gated DeltaNet and one
    full-attention block, grouped value heads, sparse MoE MLPs with a shared expert."""
    torch.manual_seed(0)
    config = Qwen3NextConfig(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             layer_types=["linear_attention", "full_attention"], num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, linear_num_key_heads=1,
                             linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=16, max_position_embeddings=64)
    return Qwen3NextForCausalLM(config).eval()


def test_loads_local_huggingface_checkpoint(tmp_path):
    tokens = toks(8) % 12
    tiny_moe_checkpoint().save_pretrained(tmp_path / "hf")
    wrapped = DeltaNetAdapter.from_pretrained(tmp_path / "hf")
    direct = Qwen3NextForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        own = direct(input_ids=tokens, use_cache=False).logits
    assert torch.equal(wrapped.run(tokens).logits, own)
    out = wrapped.run(tokens, cache="all")
    assert torch.allclose(out.logits, own, atol=1e-5)
    assert out.cache[STATE0].shape == (4, 8, 2, 8, 8) and "blocks.1.attn.out" in out.cache
    assert wrapped.config["attention_layers"] == [1]
    # build_model rebuilds the same architecture from the checkpoint's config
    rebuilt = DeltaNetAdapter.build_model(wrapped.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in wrapped.model.state_dict().items()}
    rebuilt.load_state_dict(wrapped.model.state_dict())
    assert torch.equal(DeltaNetAdapter(rebuilt, wrapped.config).run(tokens).logits, own)


def test_training_mode_scan_equals_transformers(plain):
    """In training mode on CPU the unhooked layer runs archbench's scan (faster than transformers'
    64-step chunks at task lengths): the same function and gradients up to float rounding."""
    tokens = toks(9)
    ref = reference(plain).train()
    plain.model.train()
    try:
        ours = plain.forward(tokens)
        theirs = ref(input_ids=tokens, use_cache=False).logits
        assert torch.allclose(ours, theirs, atol=1e-5)
        g_ours = torch.autograd.grad(ours[:, -1].logsumexp(-1).sum(), list(plain.model.parameters()))
        g_theirs = torch.autograd.grad(theirs[:, -1].logsumexp(-1).sum(), list(ref.parameters()))
        for (name, _), a, b in zip(plain.model.named_parameters(), g_ours, g_theirs):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    finally:
        plain.model.eval()

"""The Griffin (RecurrentGemma) adapter: parity with transformers, the RG-LRU state is readable and
patchable per step, the local-attention pattern is editable, checkpoints load."""

import pytest
import torch
from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM
from transformers.models.recurrent_gemma import modeling_recurrent_gemma as hf_rg

from archbench.adapters.griffin import GriffinAdapter
from archbench.hooks import Patch, Zero

torch.set_num_threads(1)

V = 10
SMALL = {"d_model": 32, "n_heads": 2, "d_mlp": 64, "lru_width": 32, "window": 4}


@pytest.fixture
def griffin():
    # three layers: recurrent, attention, recurrent (block_types repeats over the layers)
    adapter = GriffinAdapter.build(vocab_size=V, seq_len=9, seed=0, n_layers=3,
                                   block_types=["recurrent", "attention"], **SMALL)
    with torch.no_grad():  # spread the gates out so that the recurrence and the gates matter
        gen = torch.Generator().manual_seed(2)
        for layer in adapter.model.model.layers:
            lru = getattr(layer.temporal_block, "rg_lru", None)
            if lru is not None:
                lru.input_gate_bias.normal_(0, 1, generator=gen)
                lru.recurrent_gate_bias.normal_(0, 1, generator=gen)
    return adapter


@pytest.fixture
def tokens():
    return torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(0))  # (B, T)


def reference(adapter, attn="eager"):
    """transformers' own class with the adapter's weights (no archbench module or hook)."""
    ref = RecurrentGemmaForCausalLM(RecurrentGemmaConfig.from_dict(adapter.model.config.to_dict()))
    ref.config._attn_implementation = attn
    ref.load_state_dict(adapter.model.state_dict())
    return ref.eval()


def test_no_hook_run_is_exactly_the_wrapped_model(griffin, tokens):
    with torch.no_grad():
        own = griffin.model(input_ids=tokens, use_cache=False).logits
        eager = reference(griffin)(input_ids=tokens, use_cache=False).logits
        sdpa = reference(griffin, "sdpa")(input_ids=tokens, use_cache=False).logits
    assert torch.equal(griffin.run(tokens).logits, own)  # the written-out head is the model's
    assert torch.equal(griffin.run(tokens, cache="all").logits, own)  # reading changes nothing
    assert torch.equal(own, eager)  # the O(T) RG-LRU and archbench's eager attention are transformers'
    assert torch.allclose(own, sdpa, atol=1e-5)


@pytest.mark.parametrize("cache", [None, "state", "all"])
@pytest.mark.parametrize("T", [9, 17])
def test_logits_and_gradients_equal_transformers(griffin, cache, T):
    tokens = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(0))
    ref = reference(griffin)
    w = torch.randn(4, T, V, generator=torch.Generator().manual_seed(3))
    ours = griffin.run(tokens, cache=cache, grad=True).logits
    theirs = ref(input_ids=tokens, use_cache=False).logits  # transformers' own per-step scan
    assert torch.equal(ours, theirs)
    g_ours = torch.autograd.grad((ours * w).sum(), list(griffin.model.parameters()))
    g_theirs = torch.autograd.grad((theirs * w).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(griffin.model.named_parameters(), g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_hooked_rglru_equals_transformers_and_its_state_is_its_output(griffin):
    lru = griffin.model.model.layers[0].temporal_block.rg_lru
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))  # (B, T, lru_width)
    pos = torch.arange(7)[None]
    with torch.no_grad():
        lru.recurrent_states = None
        theirs = hf_rg.RecurrentGemmaRglru.forward(lru, x, pos)
        lru.recurrent_states = None
        ours = lru(x, pos)
        assert torch.equal(ours, theirs)
        # the state at t is transformers' recurrence after steps 0..t, and continuing it from
        # there with transformers' own scan gives the later outputs
        normalized, decay = lru.gated_inputs(x, pos)
        no_reset = torch.zeros(1, 7, 1, dtype=torch.bool)
        rest, _ = lru._rnn_scan(normalized[:, 3:], decay[:, 3:], no_reset[:, 3:], ours[:, 2])
        assert torch.allclose(rest, ours[:, 3:], atol=1e-6)


def test_every_hook_point_fires_with_its_axes(griffin, tokens):
    out = griffin.run(tokens, cache="all")
    assert set(out.cache) == set(griffin.specs)
    for name, spec in griffin.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, 9), name
    c = out.cache
    assert c["blocks.0.rglru.state"].shape == (4, 9, 32) and c["blocks.0.rglru.state"].dtype == torch.float32
    assert c["blocks.1.attn.pattern"].shape == (4, 9, 2, 9)
    assert {s.role for s in griffin.hook_points()} >= {"embed", "state", "attn_pattern", "mixer", "mlp", "stream"}
    assert "blocks.1.rglru.state" not in c and "blocks.2.rglru.state" in c  # block 1 is local attention
    body = griffin.model.model
    assert torch.equal(c["embed"], body.embed_tokens(tokens) * body.normalizer.float())  # scaled by sqrt(d), bf16
    previous = c["embed"]
    for i, mixer in enumerate(["recurrent", "attn", "recurrent"]):
        assert torch.allclose(c[f"blocks.{i}.resid_post"],
                              previous + c[f"blocks.{i}.{mixer}.out"] + c[f"blocks.{i}.mlp.out"], atol=1e-5)
        previous = c[f"blocks.{i}.resid_post"]
    assert torch.equal(griffin.decode(previous), out.logits)  # final norm, head and soft-cap
    assert torch.equal(c["logits"], out.logits) and out.logits.abs().max() < griffin.model.config.logits_soft_cap


def test_local_attention_pattern_respects_the_window_and_is_editable(griffin, tokens):
    name = "blocks.1.attn.pattern"
    base = griffin.run(tokens, cache=[name])
    pattern = base.cache[name]  # (B, q, head, k)
    window = griffin.model.config.attention_window_size
    q, k = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    outside = (k > q) | (k <= q - window)  # (q, k)
    assert torch.all(pattern[:, outside.nonzero(as_tuple=True)[0], :, outside.nonzero(as_tuple=True)[1]] == 0)
    assert torch.allclose(pattern.sum(-1), torch.ones(4, 9, 2))
    out = griffin.run(tokens, interventions={name: Zero(positions=[5])}).logits
    assert torch.equal(out[:, :5], base.logits[:, :5]) and not torch.allclose(out[:, 5], base.logits[:, 5])


def test_zero_mixer_changes_logits_only_downstream(griffin, tokens):
    base = griffin.run(tokens).logits
    out = griffin.run(tokens, interventions={"blocks.0.recurrent.out": Zero(positions=[3])}).logits
    assert torch.equal(out[:, :3], base[:, :3])
    assert not torch.allclose(out[:, 3:], base[:, 3:])


@pytest.mark.parametrize("t", [0, 3, 8])
def test_patching_state_at_t_is_running_on_from_it(griffin, tokens, t):
    source = tokens.flip(0)
    name, mixer = "blocks.0.rglru.state", "blocks.0.recurrent.out"
    src = griffin.run(source, cache=[name]).cache[name]
    clean = griffin.run(tokens, cache=[name, mixer])
    out = griffin.run(tokens, cache=[name, mixer], interventions={name: Patch(src, positions=[t])})
    assert torch.equal(out.logits[:, :t], clean.logits[:, :t])  # steps before t unchanged
    assert not torch.allclose(out.logits[:, t], clean.logits[:, t])  # t changes (the output is h_t)
    states = out.cache[name]
    assert torch.equal(states[:, :t], clean.cache[name][:, :t]) and torch.equal(states[:, t], src[:, t])
    if t + 1 < 9:
        assert not torch.allclose(states[:, t + 1:], clean.cache[name][:, t + 1:])  # the edit carried on
    # expected: transformers' own recurrence continued from the source state, through the block
    layer = griffin.model.model.layers[0]
    block, lru = layer.temporal_block, layer.temporal_block.rg_lru
    with torch.no_grad():
        normed = layer.temporal_pre_norm(griffin.run(tokens, cache="embed").cache["embed"])  # (B, T, d)
        y_branch = block.act_fn(block.linear_y(normed))
        x_branch = block.conv_1d(block.linear_x(normed).transpose(1, 2))[..., :9].transpose(1, 2)
        normalized, decay = lru.gated_inputs(x_branch, torch.arange(9)[None])
        rest, _ = lru._rnn_scan(normalized[:, t + 1:], decay[:, t + 1:],
                                torch.zeros(1, 9 - t - 1, 1, dtype=torch.bool), src[:, t])
        h = torch.cat([src[:, t:t + 1], rest], 1)  # (B, T - t, W)
        expected = block.linear_out(h * y_branch[:, t:])
    assert torch.allclose(out.cache[mixer][:, t:], expected, atol=1e-5)


def test_editing_the_conv_input_moves_the_state_from_that_step(griffin, tokens):
    name = "blocks.0.rglru.state"
    clean = griffin.run(tokens, cache=[name]).cache[name]
    edited = griffin.run(tokens, cache=[name],
                         interventions={"blocks.0.recurrent.conv_in": Zero(positions=[4])}).cache[name]
    assert torch.equal(edited[:, :4], clean[:, :4]) and not torch.allclose(edited[:, 4], clean[:, 4])


def test_hooks_removed_and_default_path_restored(griffin, tokens):
    griffin.run(tokens, cache="all", interventions={"blocks.2.rglru.state": Zero(positions=[2])})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in griffin.model.modules())
    assert all(layer.temporal_block.rg_lru.hook_state.used is None for layer in griffin.model.model.layers
               if hasattr(layer.temporal_block, "rg_lru"))
    assert torch.equal(griffin.run(tokens).logits, reference(griffin)(input_ids=tokens, use_cache=False).logits)


def test_inference_cache_runs_transformers_own_path(griffin, tokens):
    with torch.no_grad():
        full = griffin.model(input_ids=tokens, use_cache=False).logits
        prefill = griffin.model(input_ids=tokens, use_cache=True).logits  # transformers' cached scan
    assert torch.allclose(prefill, full, atol=1e-5)
    assert torch.equal(griffin.run(tokens).logits, full)  # and the organism path resets that cache


def test_loads_local_huggingface_checkpoint(griffin, tokens, tmp_path):
    griffin.model.save_pretrained(tmp_path / "hf")
    wrapped = GriffinAdapter.from_pretrained(tmp_path / "hf")
    direct = RecurrentGemmaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        own = direct(input_ids=tokens, use_cache=False).logits
    assert torch.equal(wrapped.run(tokens).logits, own)
    assert torch.equal(wrapped.run(tokens, cache="all").logits, own)
    # hf_config rebuilds the same architecture (the checkpoint's random-init control)
    rebuilt = GriffinAdapter(GriffinAdapter.build_model(wrapped.config), wrapped.config)
    rebuilt.model.load_state_dict(wrapped.model.state_dict())
    assert torch.equal(rebuilt.run(tokens).logits, own)
    assert [s.name for s in rebuilt.hook_points()] == [s.name for s in griffin.hook_points()]


def test_loads_a_tied_checkpoint(tokens, tmp_path):
    # RecurrentGemma's own checkpoints tie the head to the embedding (the default) and use
    # multi-query attention (one key/value head)
    config = RecurrentGemmaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                  num_attention_heads=2, num_key_value_heads=1, lru_width=32,
                                  attention_window_size=4,
                                  block_types=["recurrent", "attention"])
    torch.manual_seed(0)
    RecurrentGemmaForCausalLM(config).save_pretrained(tmp_path / "tied")
    wrapped = GriffinAdapter.from_pretrained(tmp_path / "tied")
    direct = RecurrentGemmaForCausalLM.from_pretrained(tmp_path / "tied", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(wrapped.run(tokens, cache="state").logits, direct(input_ids=tokens, use_cache=False).logits)


def test_configs_it_cannot_hook_raise_one_line():
    with pytest.raises(ValueError, match="at least one 'recurrent' and one 'attention'"):
        GriffinAdapter.build(vocab_size=V, seq_len=9, seed=0, block_types=["recurrent"], **SMALL)
    with pytest.raises(ValueError, match="multiples of n_heads"):
        GriffinAdapter.build(vocab_size=V, seq_len=9, seed=0, d_model=30, n_heads=4, lru_width=32)

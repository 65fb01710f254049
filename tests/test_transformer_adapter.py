"""The reference adapter: parity with Hugging Face, every hook fires, interventions act, I/O."""

import pytest
import torch
from transformers import LlamaForCausalLM

from archbench.adapters.transformer import TransformerAdapter
from archbench.hooks import Add, Patch, Zero


def test_no_hook_run_is_exactly_the_wrapped_model(gpt, tokens):
    with torch.no_grad():
        own = gpt.model(input_ids=tokens, use_cache=False).logits  # (B, T, V)
    assert torch.equal(gpt.run(tokens).logits, own)
    assert torch.equal(gpt.run(tokens, cache="all").logits, own)  # caching is read-only


def test_editable_attention_equals_transformers_eager(gpt, tokens):
    with torch.no_grad():
        ours = gpt.run(tokens).logits
        gpt.model.config._attn_implementation = "eager"
        eager = gpt.model(input_ids=tokens, use_cache=False).logits
        gpt.model.config._attn_implementation = "archbench_eager"
    assert torch.allclose(ours, eager, atol=1e-6)


def test_every_hook_point_fires_with_its_axes(gpt, tokens):
    out = gpt.run(tokens, cache="all")
    assert set(out.cache) == set(gpt.specs)
    for name, spec in gpt.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, 6), name
    pattern = out.cache["blocks.0.attn.pattern"]  # (B, q, heads, k): causal, rows sum to 1
    assert torch.allclose(pattern.sum(-1), torch.ones_like(pattern.sum(-1)), atol=1e-5)
    assert pattern[:, 0, :, 1:].abs().max() == 0
    # residual bookkeeping: resid_post = resid_mid + mlp.out = resid_pre + attn.out + mlp.out
    c = out.cache
    assert torch.allclose(c["blocks.0.resid_post"], c["blocks.0.resid_mid"] + c["blocks.0.mlp.out"], atol=1e-5)
    assert torch.allclose(c["blocks.0.resid_mid"], c["blocks.0.resid_pre"] + c["blocks.0.attn.out"], atol=1e-5)
    assert torch.equal(c["blocks.1.resid_pre"], c["blocks.0.resid_post"])
    assert torch.allclose(gpt.decode(c["blocks.1.resid_post"]), out.logits, atol=1e-5)


def test_roles_resolve_to_names(gpt):
    assert gpt.names("stream") == ["blocks.0.resid_post", "blocks.1.resid_post"]
    with pytest.raises(KeyError):
        gpt.names("nonsense")


def test_zero_mixer_changes_logits_only_downstream_positions(gpt, tokens):
    base = gpt.run(tokens).logits
    out = gpt.run(tokens, interventions={"blocks.1.attn.out": Zero(positions=[4])}).logits
    assert torch.equal(out[:, :4], base[:, :4])  # causal: earlier positions untouched
    assert not torch.allclose(out[:, 4], base[:, 4])


def test_pattern_intervention_takes_effect(gpt, tokens):
    base = gpt.run(tokens).logits
    uniform = lambda a, spec: torch.tril(torch.ones_like(a[0, :, 0])).div(
        torch.arange(1, a.shape[1] + 1)[:, None]).unsqueeze(0).unsqueeze(2).expand_as(a)
    out = gpt.run(tokens, interventions={"blocks.0.attn.pattern": uniform}, cache=["blocks.0.attn.pattern"])
    assert not torch.allclose(out.logits, base)
    assert torch.allclose(out.cache["blocks.0.attn.pattern"][0, 2, 0], torch.tensor([1 / 3] * 3 + [0] * 3))


def test_patch_whole_stream_reproduces_source_run(gpt, tokens):
    source = tokens.flip(0)
    src = gpt.run(source, cache=["blocks.0.resid_post"]).cache["blocks.0.resid_post"]
    out = gpt.run(tokens, interventions={"blocks.0.resid_post": Patch(src)}).logits
    assert torch.allclose(out, gpt.run(source).logits, atol=1e-5)


def test_cache_holds_the_intervened_value(gpt, tokens):
    v = torch.ones(64)
    out = gpt.run(tokens, cache=["blocks.0.mlp.out"], interventions={"blocks.0.mlp.out": Add(v, scale=2.0)})
    clean = gpt.run(tokens, cache=["blocks.0.mlp.out"]).cache["blocks.0.mlp.out"]
    assert torch.allclose(out.cache["blocks.0.mlp.out"], clean + 2.0)


def test_hooks_removed_even_when_forward_raises(gpt, tokens):
    def boom(a, spec):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gpt.run(tokens, interventions={"blocks.0.mlp.out": boom})
    modules = list(gpt.model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    assert torch.equal(gpt.run(tokens).logits, gpt.model(input_ids=tokens, use_cache=False).logits.detach())


def test_grad_flows_only_when_asked(gpt, tokens):
    out = gpt.run(tokens, cache=["embed"], grad=True)
    out.logits[:, -1, 0].sum().backward()
    assert gpt.model.model.embed_tokens.weight.grad is not None
    assert not gpt.run(tokens).logits.requires_grad


def test_unknown_hook_name_is_an_error(gpt, tokens):
    with pytest.raises(KeyError, match="no hook point"):
        gpt.run(tokens, interventions={"blocks.9.mlp.out": Zero()})


def test_save_load_roundtrip_through_safetensors(gpt, tokens, tmp_path):
    gpt.save(tmp_path / "org", meta={"accuracy": 0.5})
    assert (tmp_path / "org" / "model.safetensors").exists()
    again = TransformerAdapter.load(tmp_path / "org")
    assert torch.equal(again.run(tokens).logits, gpt.run(tokens).logits)


def test_loads_local_huggingface_checkpoint(gpt, tokens, tmp_path):
    gpt.model.save_pretrained(tmp_path / "hf")
    wrapped = TransformerAdapter.from_pretrained(tmp_path / "hf")
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        own = reference(input_ids=tokens, use_cache=False).logits
    assert torch.allclose(wrapped.run(tokens).logits, own, atol=1e-6)
    assert "blocks.1.attn.pattern" in wrapped.run(tokens, cache="attn_pattern").cache


def test_same_seed_same_init():
    a = TransformerAdapter.build(10, 6, seed=3)
    b = TransformerAdapter.build(10, 6, seed=3)
    c = TransformerAdapter.build(10, 6, seed=4)
    wa, wb, wc = (x.model.model.embed_tokens.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)

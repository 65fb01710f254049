"""The Qwen2 checkpoint adapter against transformers' own `Qwen2ForCausalLM`.

A tiny random checkpoint (weights, norms and the q/k/v biases perturbed away from their
init) saved with `save_pretrained`, found by its `config.model_type` and run through the
reference adapter's hook points.
"""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from archbench import hf_checkpoint, registry
from archbench.adapters.qwen2 import Qwen2Adapter
from archbench.hooks import Zero


def _save(path, **extra):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=11, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, **extra)
    model = Qwen2ForCausalLM(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def qwen(checkpoint):
    return Qwen2Adapter.from_pretrained(checkpoint)


@pytest.fixture
def toks():
    return torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))  # (B, T)


def test_model_type_qwen2_picks_this_adapter(checkpoint):
    assert hf_checkpoint.family_for(checkpoint) == "qwen2"
    assert registry.adapter("qwen2") is Qwen2Adapter and not Qwen2Adapter.organisms


def test_run_is_transformers_own_forward_bit_for_bit_with_every_hook_cached(qwen, checkpoint, toks):
    plain = Qwen2ForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        own = plain(input_ids=toks).logits  # (B, T, V)
    assert torch.equal(qwen.run(toks).logits, own)
    out = qwen.run(toks, cache="all")
    assert torch.equal(out.logits, qwen.run(toks).logits) and set(out.cache) == set(qwen.specs)
    assert torch.allclose(qwen.decode(out.cache["blocks.1.resid_post"]), own, atol=1e-5)


def test_q_carries_its_bias_and_heads_sum_to_the_attention_output(qwen, toks):
    c = qwen.run(toks, cache=["blocks.0.attn_norm.normalized", "blocks.0.attn.q", "blocks.1.attn.head_out",
                              "blocks.1.attn.out"]).cache
    attn = qwen.model.model.layers[0].self_attn
    normed = c["blocks.0.attn_norm.normalized"] * qwen.model.model.layers[0].input_layernorm.weight  # (B, T, d)
    q = attn.q_proj(normed).view(*normed.shape[:2], -1, attn.head_dim)  # (B, T, head, d_head)
    assert float(attn.q_proj.bias.detach().abs().sum()) > 0 and torch.allclose(c["blocks.0.attn.q"], q, atol=1e-5)
    assert torch.allclose(c["blocks.1.attn.head_out"].sum(2), c["blocks.1.attn.out"], atol=1e-5)
    zeroed = qwen.run(toks, interventions={"blocks.1.attn.out": Zero()}).logits
    assert not torch.equal(zeroed, qwen.run(toks).logits)


def test_a_sliding_window_checkpoint_is_refused(tmp_path):
    path = _save(tmp_path / "windowed", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert json.loads((path / "config.json").read_text())["use_sliding_window"]
    with pytest.raises(ValueError, match="sliding"):
        Qwen2Adapter.from_pretrained(path)


def test_its_control_is_the_checkpoint_s_config_at_random_init(qwen):
    control = Qwen2Adapter(Qwen2Adapter.build_model(qwen.config), qwen.config)
    assert type(control.model) is Qwen2ForCausalLM
    assert control.model.config.num_key_value_heads == 2 and set(control.specs) == set(qwen.specs)

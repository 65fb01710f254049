"""The GPT-NeoX / Pythia checkpoint adapter against transformers' own `GPTNeoXForCausalLM`.

Tiny random checkpoints (weights, norms and biases perturbed away from their init), with
Pythia's parallel residual and with a sequential block, saved with `save_pretrained`;
expected values follow from the computation.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from archbench.adapters.gpt_neox import GPTNeoXAdapter
from archbench.hooks import Zero
from archbench.tasks.modadd import ModAdd
from archbench.techniques.patching import Patching
from archbench.techniques.probe import Probe


def _save(path, parallel: bool):
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=11, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, rotary_pct=0.5,
                        use_parallel_residual=parallel, bos_token_id=None, eos_token_id=None)
    model = GPTNeoXForCausalLM(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def checkpoint(request, tmp_path_factory):
    return _save(tmp_path_factory.mktemp("neox"), request.param)


@pytest.fixture(scope="module")
def neox(checkpoint):
    return GPTNeoXAdapter.from_pretrained(checkpoint)


@pytest.fixture
def toks():
    return torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))  # (B, T)


def test_run_is_transformers_own_forward_bit_for_bit_with_every_hook_cached(neox, checkpoint, toks):
    plain = GPTNeoXForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        own = plain(input_ids=toks).logits  # (B, T, V)
    assert torch.equal(neox.run(toks).logits, own)
    out = neox.run(toks, cache="all")
    assert torch.equal(out.logits, own) and set(out.cache) == set(neox.specs)
    assert torch.equal(neox.run(toks, cache=list(neox.aliases())).logits, own)
    assert torch.allclose(neox.decode(out.cache["blocks.1.resid_post"]), own, atol=1e-5)


def test_residual_layout(neox, toks):
    c = neox.run(toks, cache="all").cache
    pre, attn, mlp = c["blocks.0.resid_pre"], c["blocks.0.attn.out"], c["blocks.0.mlp.out"]
    if neox.model.config.use_parallel_residual:  # both branches read resid_pre: no resid_mid
        assert "blocks.0.resid_mid" not in neox.specs and "blocks.0.hook_resid_mid" not in neox.aliases()
        assert torch.allclose(c["blocks.0.resid_post"], pre + attn + mlp, atol=1e-6)
        normalized = torch.nn.functional.layer_norm(pre, (32,))
    else:
        assert torch.equal(c["blocks.0.resid_mid"], attn + pre)
        assert neox.aliases()["blocks.0.hook_resid_mid"].target == "blocks.0.resid_mid"
        normalized = torch.nn.functional.layer_norm(c["blocks.0.resid_mid"], (32,))
    assert torch.allclose(c["blocks.0.mlp_norm.normalized"], normalized, atol=1e-6)


def test_per_head_qkv_and_partial_rotary(neox, toks):
    c = neox.run(toks, cache="all").cache
    assert c["blocks.0.attn.q"].shape == (3, 7, 4, 8) and c["blocks.0.attn.rot_k"].shape == (3, 7, 4, 8)
    rotary = neox.model.gpt_neox.layers[0].attention.rotary_ndims
    assert rotary == 4
    for q in ("q", "k"):  # the dimensions past the rotary part are unchanged, the rotary part is not
        assert torch.equal(c[f"blocks.0.attn.rot_{q}"][..., rotary:], c[f"blocks.0.attn.{q}"][..., rotary:])
        assert torch.equal(c[f"blocks.0.attn.rot_{q}"][:, 0], c[f"blocks.0.attn.{q}"][:, 0])  # position 0: angle 0
        assert not torch.allclose(c[f"blocks.0.attn.rot_{q}"][:, 1:, :, :rotary], c[f"blocks.0.attn.{q}"][:, 1:, :, :rotary])
    # q, k, v are the per-head interleaved thirds of the fused projection
    block = neox.model.gpt_neox.layers[0]
    qkv = block.attention.query_key_value(block.input_layernorm(c["blocks.0.resid_pre"]))  # (B, T, 3 * nh * hs)
    q, k, v = qkv.view(3, 7, 4, 24).chunk(3, dim=-1)
    assert torch.allclose(c["blocks.0.attn.q"], q, atol=1e-6) and torch.allclose(c["blocks.0.attn.v"], v, atol=1e-6)
    assert {"blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_q", "blocks.0.ln1.hook_normalized"} <= set(neox.aliases())


def test_head_outputs_sum_to_the_attention_output(neox, toks):
    c = neox.run(toks, cache=["blocks.1.attn.head_out", "blocks.1.attn.out"]).cache
    bias = neox.model.gpt_neox.layers[1].attention.dense.bias
    assert torch.allclose(c["blocks.1.attn.head_out"].sum(2) + bias, c["blocks.1.attn.out"], atol=1e-5)


def test_zeroed_values_leave_only_the_output_bias(neox, toks):
    out = neox.run(toks, interventions={"blocks.0.attn.v": Zero()}, cache=["blocks.0.attn.z", "blocks.0.attn.out"])
    assert out.cache["blocks.0.attn.z"].abs().max() == 0
    bias = neox.model.gpt_neox.layers[0].attention.dense.bias
    assert torch.equal(out.cache["blocks.0.attn.out"], bias.expand_as(out.cache["blocks.0.attn.out"]))


def test_a_pattern_edit_takes_effect(neox, toks):
    causal = torch.tril(torch.ones(7, 7))
    uniform = causal / causal.sum(-1, keepdim=True)  # (q, k)
    out = neox.run(toks, interventions={"blocks.0.attn.pattern": lambda p, s: uniform[None, :, None].expand_as(p)},
                   cache=["blocks.0.attn.v", "blocks.0.attn.z"])
    mean_v = out.cache["blocks.0.attn.v"].cumsum(1) / torch.arange(1, 8)[None, :, None, None]  # (B, T, nh, hs)
    assert torch.allclose(out.cache["blocks.0.attn.z"], mean_v, atol=1e-5)
    assert not torch.allclose(out.logits, neox.run(toks).logits)
    both = neox.run(toks, cache=["blocks.0.hook_resid_post", "blocks.0.resid_post"]).cache
    assert torch.equal(both["blocks.0.hook_resid_post"], both["blocks.0.resid_post"])


def test_build_model_rebuilds_the_checkpoint_architecture(neox):
    control = GPTNeoXAdapter.build(seed=0, **neox.config)
    ours, theirs = control.model.state_dict(), neox.model.state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    assert control.model.config.use_parallel_residual == neox.model.config.use_parallel_residual
    assert control.model.gpt_neox.layers[0].attention.rotary_ndims == 4


def test_a_checkpoint_with_a_deleted_tensor_is_refused(tmp_path):
    path = _save(tmp_path / "neox", True)
    weights = load_file(path / "model.safetensors")
    del weights["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^checkpoint .*: 1 weight missing \(gpt_neox.layers.1.mlp.dense_4h_to_h.bias\)$"):
        GPTNeoXAdapter.from_pretrained(path)


def test_probe_and_patching_run_end_to_end_on_a_random_init_model():
    task = ModAdd(p=5)
    adapter = GPTNeoXAdapter.for_task(task, 0)
    assert set(adapter.run(task.sample(8, 0).tokens, cache="all").cache) == set(adapter.specs)
    probe = Probe(n_train=128, n_test=64, steps=10)(adapter, task, 0)
    patch = Patching(n_pairs=16)(adapter, task, 0)
    assert probe.applicable and 0.0 <= probe.score <= 1.0
    assert patch.applicable and 0.0 <= patch.score <= 1.0

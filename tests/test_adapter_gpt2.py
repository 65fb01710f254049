"""The GPT-2 checkpoint adapter against transformers' own `GPT2LMHeadModel`.

A tiny random checkpoint (weights, norms and biases perturbed away from their init so every
term matters) is saved with `save_pretrained` and wrapped; every expected value follows from
the computation (zeroed values leave only the output bias, a uniform pattern averages v).
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from archbench.adapters.gpt2 import GPT2Adapter
from archbench.hooks import Zero
from archbench.tasks.modadd import ModAdd
from archbench.techniques.patching import Patching
from archbench.techniques.probe import Probe


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=11, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    path = tmp_path_factory.mktemp("gpt2")
    _perturbed(GPT2LMHeadModel(cfg)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2(checkpoint):
    return GPT2Adapter.from_pretrained(checkpoint)


@pytest.fixture
def toks():
    return torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))  # (B, T)


def test_run_is_transformers_own_forward_bit_for_bit_with_every_hook_cached(gpt2, checkpoint, toks):
    plain = GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        own = plain(input_ids=toks).logits  # (B, T, V)
    assert torch.equal(gpt2.run(toks).logits, own)
    out = gpt2.run(toks, cache="all")
    assert torch.equal(out.logits, own) and set(out.cache) == set(gpt2.specs)
    assert torch.equal(gpt2.run(toks, cache=list(gpt2.aliases())).logits, own)
    assert torch.equal(out.cache["logits"], own)
    assert torch.allclose(gpt2.decode(out.cache["blocks.1.resid_post"]), own, atol=1e-5)


def test_hook_points_and_tl_names(gpt2, toks):
    c = gpt2.run(toks, cache="all").cache
    assert c["blocks.0.attn.q"].shape == (3, 7, 4, 8) and c["blocks.0.attn.pattern"].shape == (3, 7, 4, 7)
    assert c["blocks.1.mlp.hidden"].shape == (3, 7, 128) and "blocks.0.attn.rot_q" not in c  # no rotary
    assert torch.equal(c["blocks.0.resid_pre"], c["embed"] + c["pos_embed"])
    assert torch.equal(c["blocks.0.resid_mid"], c["blocks.0.resid_pre"] + c["blocks.0.attn.out"])
    x = c["blocks.0.resid_pre"]
    assert torch.allclose(c["blocks.0.attn_norm.normalized"], torch.nn.functional.layer_norm(x, (32,)), atol=1e-6)
    aliases = gpt2.aliases()
    assert {"hook_embed", "hook_pos_embed", "blocks.1.attn.hook_pattern", "blocks.0.mlp.hook_post",
            "blocks.0.hook_mlp_out", "ln_final.hook_normalized", "blocks.0.hook_resid_mid"} <= set(aliases)
    assert set(gpt2.specs) - {a.target for a in aliases.values()} == {"logits"}
    both = gpt2.run(toks, cache=["blocks.0.hook_resid_post", "blocks.0.resid_post", "blocks.0.attn.hook_pattern"]).cache
    assert torch.equal(both["blocks.0.hook_resid_post"], both["blocks.0.resid_post"])
    assert torch.equal(both["blocks.0.attn.hook_pattern"], c["blocks.0.attn.pattern"].permute(0, 2, 1, 3))


def test_head_outputs_sum_to_the_attention_output(gpt2, toks):
    c = gpt2.run(toks, cache=["blocks.1.attn.head_out", "blocks.1.attn.out"]).cache
    bias = gpt2.model.transformer.h[1].attn.c_proj.bias
    assert torch.allclose(c["blocks.1.attn.head_out"].sum(2) + bias, c["blocks.1.attn.out"], atol=1e-5)


def test_zeroed_values_leave_only_the_output_bias(gpt2, toks):
    out = gpt2.run(toks, interventions={"blocks.0.attn.v": Zero()}, cache=["blocks.0.attn.z", "blocks.0.attn.out"])
    assert out.cache["blocks.0.attn.z"].abs().max() == 0
    bias = gpt2.model.transformer.h[0].attn.c_proj.bias
    assert torch.equal(out.cache["blocks.0.attn.out"], bias.expand_as(out.cache["blocks.0.attn.out"]))
    assert not torch.allclose(out.logits, gpt2.run(toks).logits)


def test_a_pattern_edit_takes_effect(gpt2, toks):
    causal = torch.tril(torch.ones(7, 7))
    uniform = causal / causal.sum(-1, keepdim=True)  # (q, k)
    out = gpt2.run(toks, interventions={"blocks.0.attn.hook_pattern": lambda p, s: uniform.expand_as(p)},
                   cache=["blocks.0.attn.pattern", "blocks.0.attn.v", "blocks.0.attn.z"])
    c = out.cache
    assert torch.equal(c["blocks.0.attn.pattern"], uniform[None, :, None].expand_as(c["blocks.0.attn.pattern"]))
    mean_v = c["blocks.0.attn.v"].cumsum(1) / torch.arange(1, 8)[None, :, None, None]  # (B, T, nh, hs)
    assert torch.allclose(c["blocks.0.attn.z"], mean_v, atol=1e-5)
    assert not torch.allclose(out.logits, gpt2.run(toks).logits)
    zero_q = gpt2.run(toks, interventions={"blocks.0.attn.q": Zero()}, cache=["blocks.0.attn.pattern"]).cache
    assert torch.allclose(zero_q["blocks.0.attn.pattern"], c["blocks.0.attn.pattern"], atol=1e-6)  # uniform


def test_normalized_edit_enters_through_weight_and_bias(gpt2, toks):
    ln = gpt2.model.transformer.ln_f
    out = gpt2.run(toks, interventions={"final_norm.normalized": Zero()})
    assert torch.allclose(out.logits, gpt2.model.lm_head(ln.bias).expand_as(out.logits), atol=1e-5)


def test_build_model_rebuilds_the_checkpoint_architecture(gpt2):
    control = GPT2Adapter.build(seed=0, **gpt2.config)
    ours, theirs = control.model.state_dict(), gpt2.model.state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.weight"], theirs["transformer.h.0.attn.c_attn.weight"])
    again = GPT2Adapter.build(seed=0, **gpt2.config).model.state_dict()
    assert all(torch.equal(again[k], ours[k]) for k in ours)  # seeded


def test_a_checkpoint_with_a_deleted_tensor_is_refused(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["transformer.h.0.attn.c_attn.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        GPT2Adapter.from_pretrained(broken)
    assert str(err.value) == f"checkpoint {broken}: 1 weight missing (transformer.h.0.attn.c_attn.weight)"


def test_probe_and_patching_run_end_to_end_on_a_random_init_model():
    task = ModAdd(p=5)
    adapter = GPT2Adapter.for_task(task, 0)
    out = adapter.run(task.sample(8, 0).tokens, cache="all")
    assert set(out.cache) == set(adapter.specs)
    for name, spec in adapter.specs.items():
        assert out.cache[name].dim() == len(spec.axes), name
    probe = Probe(n_train=128, n_test=64, steps=10)(adapter, task, 0)
    patch = Patching(n_pairs=16)(adapter, task, 0)
    assert probe.applicable and 0.0 <= probe.score <= 1.0
    assert patch.applicable and 0.0 <= patch.score <= 1.0

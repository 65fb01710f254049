"""The looped adapter: per-iteration hook points, K settable at inference, parity with GPT-2."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from archbench.adapters.looped import LoopedAdapter
from archbench.hooks import Patch, Zero
from archbench.tasks.modadd import ModAdd

torch.set_num_threads(1)


@pytest.fixture
def looped():
    return LoopedAdapter.build(vocab_size=10, seq_len=6, seed=0)


@pytest.fixture
def tokens():
    return torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))  # (B, T)


def _gpt2_with_tied_copies(looped, n_layers):
    """A GPT2LMHeadModel whose n layers are all copies of the looped block."""
    c = looped.config
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=c["vocab_size"], n_positions=c["seq_len"], n_embd=c["d_model"],
                                     n_layer=n_layers, n_head=c["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, tie_word_embeddings=False)).eval()
    gpt.config._attn_implementation = "eager"
    m, t = looped.model, gpt.transformer
    t.wte.load_state_dict(m.wte.state_dict())
    t.wpe.load_state_dict(m.wpe.state_dict())
    for block in t.h:
        block.load_state_dict(m.block.state_dict())
    t.ln_f.load_state_dict(m.ln_f.state_dict())
    gpt.lm_head.weight.data.copy_(m.lm_head.weight)
    return gpt


def test_no_hook_run_is_exactly_the_wrapped_model(looped, tokens):
    with torch.no_grad():
        own = looped.model(tokens)
    assert torch.equal(looped.run(tokens).logits, own)
    assert torch.equal(looped.run(tokens, cache="all").logits, own)


def test_k_loops_equal_a_gpt2_with_k_tied_layers(looped, tokens):
    for k in (1, 4, 6):
        with torch.no_grad():
            ref = _gpt2_with_tied_copies(looped, k)(input_ids=tokens, use_cache=False).logits
        assert torch.allclose(looped.run(tokens, loops=k).logits, ref, atol=1e-5), k
    assert looped.loops == 4  # run(loops=) is per call


def test_every_hook_point_fires_with_its_axes(looped, tokens):
    out = looped.run(tokens, cache="all")
    assert set(out.cache) == set(looped.specs)
    assert looped.names("stream") == [f"loops.{k}.resid_post" for k in range(4)]
    for name, spec in looped.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, 6), name
    c = out.cache
    assert torch.allclose(c["loops.1.resid_post"], c["loops.0.resid_post"] + c["loops.1.attn.out"]
                          + c["loops.1.mlp.out"], atol=1e-5)
    assert torch.allclose(looped.decode(c["loops.3.resid_post"]), out.logits, atol=1e-5)
    assert not torch.allclose(c["loops.0.attn.out"], c["loops.1.attn.out"])  # one site per iteration


def test_hook_points_follow_the_loop_count(looped, tokens):
    out = looped.run(tokens, cache="stream", loops=7)
    assert list(out.cache) == [f"loops.{k}.resid_post" for k in range(7)]
    assert len(looped.names("stream")) == 4
    looped.set_loops(2)
    assert looped.names("mixer") == ["loops.0.attn.out", "loops.1.attn.out"]
    with pytest.raises(ValueError):
        looped.set_loops(17)


def test_zero_mixer_changes_logits_only_downstream(looped, tokens):
    base = looped.run(tokens).logits
    out = looped.run(tokens, interventions={"loops.2.attn.out": Zero(positions=[4])}).logits
    assert torch.equal(out[:, :4], base[:, :4])
    assert not torch.allclose(out[:, 4], base[:, 4])
    # intervening on one iteration leaves the other iterations' inputs alone
    c = looped.run(tokens, cache="all", interventions={"loops.2.attn.out": Zero()}).cache
    clean = looped.run(tokens, cache="all").cache
    assert torch.equal(c["loops.1.resid_post"], clean["loops.1.resid_post"])
    assert not torch.allclose(c["loops.2.resid_post"], clean["loops.2.resid_post"])


def test_patch_stream_reproduces_source_run(looped, tokens):
    source = tokens.flip(0)
    src = looped.run(source, cache=["loops.1.resid_post"]).cache["loops.1.resid_post"]
    out = looped.run(tokens, interventions={"loops.1.resid_post": Patch(src)}).logits
    assert torch.allclose(out, looped.run(source).logits, atol=1e-5)


def test_loads_local_huggingface_checkpoint(looped, tokens, tmp_path):
    gpt = _gpt2_with_tied_copies(looped, 1)
    gpt.save_pretrained(tmp_path / "hf")
    wrapped = LoopedAdapter.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        own = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()(
            input_ids=tokens, use_cache=False).logits
    assert wrapped.loops == 1
    assert torch.allclose(wrapped.run(tokens).logits, own, atol=1e-5)
    assert torch.allclose(wrapped.run(tokens, loops=3).logits, looped.run(tokens, loops=3).logits, atol=1e-5)

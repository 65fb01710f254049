"""The RWKV adapter: parity with Hugging Face, the per-step WKV state is readable and patchable."""

import pytest
import torch
from transformers import RwkvForCausalLM
from transformers.models.rwkv.modeling_rwkv import RwkvSelfAttention, rwkv_linear_attention_cpu

from archbench.adapters.rwkv import RWKVAdapter
from archbench.hooks import Patch, Zero
from archbench.tasks.modadd import ModAdd

torch.set_num_threads(1)


@pytest.fixture
def rwkv():
    adapter = RWKVAdapter.build(vocab_size=10, seq_len=6, seed=0)
    with torch.no_grad():  # HF's init leaves time_first/decay nearly uniform: spread them out
        for block in adapter.model.rwkv.blocks:
            block.attention.time_first.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    return adapter


@pytest.fixture
def tokens():
    return torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))  # (B, T)


def test_no_hook_run_is_exactly_the_wrapped_model(rwkv, tokens):
    with torch.no_grad():
        own = rwkv.model(input_ids=tokens, use_cache=False).logits
    assert torch.equal(rwkv.run(tokens).logits, own)
    assert torch.equal(rwkv.run(tokens, cache="all").logits, own)  # the hooked recurrence is bit-equal


def test_hooked_wkv_equals_transformers_and_its_own_state(rwkv, tokens):
    att = rwkv.model.rwkv.blocks[0].attention
    k, v = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, states = att.wkv(k, v)
        ref, _ = rwkv_linear_attention_cpu(att.time_decay, att.time_first, k, v)
        assert torch.equal(out, ref)
        # the state read at step t is transformers' state after steps 0..t-1
        for t in range(1, 5):
            _, st = rwkv_linear_attention_cpu(att.time_decay, att.time_first, k[:, :t], v[:, :t], return_state=True)
            assert torch.equal(states[:, t], torch.stack(st, 1))
        # and continuing transformers' recurrence from it gives the same outputs
        _, st = rwkv_linear_attention_cpu(att.time_decay, att.time_first, k[:, :2], v[:, :2], return_state=True)
        rest, _ = rwkv_linear_attention_cpu(att.time_decay, att.time_first, k[:, 2:], v[:, 2:], state=st)
        assert torch.allclose(rest, out[:, 2:], atol=1e-6)


@pytest.mark.parametrize("cache", [None, "state"])  # archbench's O(T) loop, unhooked and hooked
@pytest.mark.parametrize("T", [6, 17])
def test_logits_and_gradients_equal_transformers(rwkv, cache, T):
    tokens = torch.randint(0, 10, (4, T), generator=torch.Generator().manual_seed(0))
    ref = RwkvForCausalLM(rwkv.model.config)
    ref.load_state_dict(rwkv.model.state_dict())
    ref.eval()
    w = torch.randn(4, T, 10, generator=torch.Generator().manual_seed(3))
    ours = rwkv.run(tokens, cache=cache, grad=True).logits
    theirs = ref(input_ids=tokens, use_cache=False).logits  # transformers' own CPU WKV loop
    assert torch.equal(ours, theirs)
    g_ours = torch.autograd.grad((ours * w).sum(), list(rwkv.model.parameters()))
    g_theirs = torch.autograd.grad((theirs * w).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(rwkv.model.named_parameters(), g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_every_hook_point_fires_with_its_axes(rwkv, tokens):
    out = rwkv.run(tokens, cache="all")
    assert set(out.cache) == set(rwkv.specs)
    for name, spec in rwkv.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, 6), name
    assert out.cache["blocks.0.wkv.state"].shape == (4, 6, 3, 64)
    c = out.cache
    assert torch.allclose(c["blocks.1.resid_post"], c["blocks.0.resid_post"] + c["blocks.1.wkv.out"]
                          + c["blocks.1.ffn.out"], atol=1e-5)
    assert torch.allclose(rwkv.decode(c["blocks.1.resid_post"]), out.logits, atol=1e-5)


def test_zero_mixer_changes_logits_only_downstream(rwkv, tokens):
    base = rwkv.run(tokens).logits
    out = rwkv.run(tokens, interventions={"blocks.0.wkv.out": Zero(positions=[3])}).logits
    assert torch.equal(out[:, :3], base[:, :3])
    assert not torch.allclose(out[:, 3:], base[:, 3:])


@pytest.mark.parametrize("t", [1, 3, 5])
def test_patching_state_at_t_is_running_on_from_it(rwkv, tokens, t):
    source = tokens.flip(0)
    name = "blocks.0.wkv.state"
    src = rwkv.run(source, cache=[name]).cache[name]
    clean = rwkv.run(tokens, cache=[name, "blocks.0.wkv.out"])
    out = rwkv.run(tokens, cache=[name, "blocks.0.wkv.out"], interventions={name: Patch(src, positions=[t])})
    assert torch.equal(out.logits[:, :t], clean.logits[:, :t])  # steps before t unchanged
    assert not torch.allclose(out.logits[:, t], clean.logits[:, t])  # t changes
    states = out.cache[name]
    assert torch.equal(states[:, :t], clean.cache[name][:, :t]) and torch.equal(states[:, t], src[:, t])
    # expected: transformers' own recurrence continued from the source state
    att = rwkv.model.rwkv.blocks[0].attention
    block = rwkv.model.rwkv.blocks[0]
    with torch.no_grad():
        hidden = block.ln1(block.pre_ln(rwkv.run(tokens, cache="embed").cache["embed"]))
        r, k, v, _ = RwkvSelfAttention.extract_key_value(att, hidden)
        rest, _ = rwkv_linear_attention_cpu(att.time_decay, att.time_first, k[:, t:], v[:, t:],
                                            state=list(src[:, t].unbind(1)))
        expected = att.output(r[:, t:] * rest)
    assert torch.allclose(out.cache["blocks.0.wkv.out"][:, t:], expected, atol=1e-5)


def test_hooks_removed_and_default_path_restored(rwkv, tokens):
    rwkv.run(tokens, cache="state", interventions={"blocks.1.wkv.state": Zero()})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in rwkv.model.modules())
    assert all(b.attention.hook_state.used is None for b in rwkv.model.rwkv.blocks)


def test_loads_local_huggingface_checkpoint(rwkv, tokens, tmp_path):
    rwkv.model.save_pretrained(tmp_path / "hf")
    wrapped = RWKVAdapter.from_pretrained(tmp_path / "hf")
    reference = RwkvForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        own = reference(input_ids=tokens, use_cache=False).logits
    assert torch.equal(wrapped.run(tokens).logits, own)
    assert torch.equal(wrapped.run(tokens, cache="state").logits, own)

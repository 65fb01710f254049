"""The xLSTM adapter: parity with Hugging Face, the per-step mLSTM state (C, n, m) is readable
and patchable, local checkpoints load."""

import pytest
import torch
from transformers import xLSTMForCausalLM
from transformers.models.xlstm import modeling_xlstm as hf_xlstm

from archbench.adapters.xlstm import XLSTMAdapter
from archbench.hooks import Add, Patch, Zero

torch.set_num_threads(1)

STATE_PARTS = ("C", "n", "m")


def spread(model):
    """HF's init zeroes every gate weight (the FFN's too) and sets the input gate bias to -10,
    so a random model's memory and FFN are nearly silent: give them random values."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or not p.abs().sum():
                p.normal_(0, 0.5, generator=gen)


@pytest.fixture
def xlstm():
    adapter = XLSTMAdapter.build(vocab_size=10, seq_len=6, seed=0, d_model=32)  # d_qk 4, d_v 8 per head
    spread(adapter.model)
    return adapter


@pytest.fixture
def tokens():
    return torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))  # (B, T)


def reference(adapter):
    """transformers' own model (no archbench class or hook point) with the adapter's weights."""
    ref = xLSTMForCausalLM(adapter.model.config)
    ref.load_state_dict(adapter.model.state_dict())
    return ref.eval()


def backend_io(adapter, tokens, layer=0, **run):
    """The gate/query/key/value inputs and the h output of one layer's mLSTM backend in a run."""
    seen = {}
    backend = adapter.model.backbone.blocks[layer].mlstm_layer.mlstm_backend
    handles = [backend.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True),
               backend.register_forward_hook(lambda m, a, kw, out: seen.update(h=out[0]), with_kwargs=True)]
    try:
        out = adapter.run(tokens, **run)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def qkvif(seen):
    return seen["query"], seen["key"], seen["value"], seen["igate"], seen["fgate"]


def test_no_hook_run_is_exactly_the_wrapped_model(xlstm, tokens):
    with torch.no_grad():
        own = reference(xlstm)(input_ids=tokens, use_cache=False).logits
    assert torch.equal(xlstm.run(tokens).logits, own)
    assert torch.equal(xlstm.run(tokens, cache="all").logits, own)  # the hooked recurrence is bit-equal


def test_recurrence_equals_transformers_step_kernel_and_its_states(xlstm, tokens):
    seen, _ = backend_io(xlstm, tokens)
    q, k, v, i, f = qkvif(seen)
    backend = xlstm.model.backbone.blocks[0].mlstm_layer.mlstm_backend
    with torch.no_grad():
        h, last, (C, n, m) = backend.recurrence(q, k, v, i, f)
        ref, ref_last = hf_xlstm.mlstm_recurrent_sequence_native(q, k, v, i, f, return_last_states=True)
        assert torch.equal(h, ref) and all(torch.equal(a, b) for a, b in zip(last, ref_last))
        assert C.shape == (4, 6, 4, 4, 8) and n.shape == (4, 6, 4, 4) and m.shape == (4, 6, 4)
        for t in range(6):  # the state at t is transformers' state after steps 0..t
            _, st = hf_xlstm.mlstm_recurrent_sequence_native(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                                                             i[:, :, :t + 1], f[:, :, :t + 1], return_last_states=True)
            assert torch.equal(C[:, t], st[0]) and torch.equal(n[:, t], st[1]) and torch.equal(m[:, t], st[2][..., 0])


@pytest.mark.parametrize("cache", [None, "state"])  # archbench's O(T) loop, unhooked and hooked
@pytest.mark.parametrize("T", [1, 6, 17])
def test_logits_and_gradients_equal_transformers(xlstm, cache, T):
    tokens = torch.randint(0, 10, (4, T), generator=torch.Generator().manual_seed(0))
    ref = reference(xlstm)
    w = torch.randn(4, T, 10, generator=torch.Generator().manual_seed(3))
    ours = xlstm.run(tokens, cache=cache, grad=True).logits
    theirs = ref(input_ids=tokens, use_cache=False).logits  # transformers' own step recurrence
    assert torch.equal(ours, theirs)
    g_ours = torch.autograd.grad((ours * w).sum(), list(xlstm.model.parameters()))
    g_theirs = torch.autograd.grad((theirs * w).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(xlstm.model.named_parameters(), g_ours, g_theirs):
        # the spread gates make gradients of order 1e3: tolerance relative to each one's scale
        assert torch.allclose(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4), name


def test_where_transformers_runs_its_chunkwise_kernel_the_hooked_loop_is_close():
    adapter = XLSTMAdapter.build(vocab_size=10, seq_len=8, seed=0, d_model=32, chunk_size=4)
    spread(adapter.model)
    tokens = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = reference(adapter)(input_ids=tokens, use_cache=False).logits  # chunkwise kernel (8 = 2 chunks)
    assert torch.equal(adapter.run(tokens).logits, own)  # unhooked: transformers' kernel itself
    hooked = adapter.run(tokens, cache="state").logits  # the recurrent form of the same function
    # measured: up to 2e-5 with the spread gates (1e-6 at HF's init); logits are of order 1
    assert torch.allclose(hooked, own, atol=1e-4)


def test_every_hook_point_fires_with_its_axes(xlstm, tokens):
    out = xlstm.run(tokens, cache="all")
    assert set(out.cache) == set(xlstm.specs)
    for name, spec in xlstm.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, 6), name
    c = out.cache
    assert c["blocks.0.mlstm.C"].shape == (4, 6, 4, 4, 8) and c["blocks.0.mlstm.m"].shape == (4, 6, 4)
    assert torch.equal(c["logits"], out.logits)
    assert torch.allclose(c["blocks.1.resid_post"], c["blocks.0.resid_post"] + c["blocks.1.mlstm.out"]
                          + c["blocks.1.ffn.out"], atol=1e-5)
    assert torch.allclose(xlstm.decode(c["blocks.1.resid_post"]), out.logits, atol=1e-5)
    assert {s.role for s in xlstm.specs.values()} >= {"embed", "state", "mixer", "mlp", "stream", "logits"}


def test_zero_mixer_changes_logits_only_downstream(xlstm, tokens):
    base = xlstm.run(tokens).logits
    out = xlstm.run(tokens, interventions={"blocks.0.mlstm.out": Zero(positions=[3])}).logits
    assert torch.equal(out[:, :3], base[:, :3])
    assert not torch.allclose(out[:, 3:], base[:, 3:])


@pytest.mark.parametrize("part", STATE_PARTS)
@pytest.mark.parametrize("t", [0, 2, 5])
def test_patching_state_at_t_is_running_on_from_it(xlstm, tokens, part, t):
    names = [f"blocks.0.mlstm.{p}" for p in STATE_PARTS]
    name = f"blocks.0.mlstm.{part}"
    source = tokens.flip(0)
    src = xlstm.run(source, cache=names).cache
    # m is a stabiliser: patch it with a shift large enough to change the readout
    edit = Add(torch.full((4,), 2.0), positions=[t]) if part == "m" else Patch(src[name], positions=[t])
    clean_io, clean = backend_io(xlstm, tokens, cache=names)
    base = xlstm.run(tokens).logits  # the unhooked run: the hooked path equals it before t
    io, out = backend_io(xlstm, tokens, cache=names, interventions={name: edit})
    assert torch.equal(out.logits[:, :t], base[:, :t])  # steps before t unchanged
    assert not torch.allclose(io["h"][:, :, t:], clean_io["h"][:, :, t:])  # the cell's output from t on changes
    # the per-head norm after the cell removes a positive per-head scale of h: n (and m, at its
    # own step) only set the divisor, so the logits follow C at t, and m from t + 1 (through
    # the gates' stabilisation), while an edit of n reaches them only through the norm's eps
    if part == "C" or (part == "m" and t + 1 < tokens.shape[1]):
        first = t if part == "C" else t + 1
        assert not torch.allclose(out.logits[:, first:], base[:, first:], atol=1e-4)
    used = out.cache
    for p in names:
        assert torch.equal(used[p][:, :t], clean.cache[p][:, :t])
    edited = edit(clean.cache[name], xlstm.specs[name])
    assert torch.equal(used[name][:, t], edited[:, t])
    other = [p for p in names if p != name]
    assert all(torch.equal(used[p][:, t], clean.cache[p][:, t]) for p in other)
    # expected: the readout of the edited state at t, then transformers' own recurrence
    # continued from it
    q, k, v, i, f = qkvif(clean_io)
    C_t, n_t, m_t = (used[p][:, t] for p in names)  # (B, nh, d_qk, d_v), (B, nh, d_qk), (B, nh)
    q_t = q[:, :, t] * q.shape[-1] ** -0.5  # (B, nh, d_qk)
    num = (q_t[:, :, None, :] @ C_t)[:, :, 0]  # (B, nh, d_v)
    den = torch.maximum((q_t * n_t).sum(-1, keepdim=True).abs(), torch.exp(-m_t)[..., None]) + 1e-6
    assert torch.allclose(io["h"][:, :, t], num / den, atol=1e-5)
    if t + 1 < tokens.shape[1]:
        rest = hf_xlstm.mlstm_recurrent_sequence_native(
            q[:, :, t + 1:], k[:, :, t + 1:], v[:, :, t + 1:], i[:, :, t + 1:], f[:, :, t + 1:],
            c_initial=C_t, n_initial=n_t, m_initial=m_t[..., None])
        assert torch.allclose(io["h"][:, :, t + 1:], rest, atol=1e-5)


def test_edits_of_several_state_parts_combine(xlstm, tokens):
    names = [f"blocks.1.mlstm.{p}" for p in STATE_PARTS]
    shift = Add(torch.full((4,), 2.0), positions=[1])
    out = xlstm.run(tokens, cache=names, interventions={names[0]: Zero(positions=[4]), names[2]: shift})
    clean = xlstm.run(tokens, cache=names)
    assert torch.equal(out.logits[:, :1], clean.logits[:, :1])
    assert not torch.allclose(out.logits[:, 2], clean.logits[:, 2], atol=1e-4)  # runs on from the edited m
    assert not out.cache[names[0]][:, 4].any()
    assert torch.equal(out.cache[names[2]][:, 1], clean.cache[names[2]][:, 1] + 2)
    assert not torch.equal(out.cache[names[0]][:, 3], clean.cache[names[0]][:, 3])  # C after the m edit
    assert not torch.equal(out.cache[names[1]][:, 5], clean.cache[names[1]][:, 5])


def test_hooks_removed_and_default_path_restored(xlstm, tokens):
    xlstm.run(tokens, cache="state", interventions={"blocks.1.mlstm.C": Zero()})
    xlstm.run(tokens, interventions={"blocks.0.mlstm.C": Zero(positions=[2])})  # n, m unhooked
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in xlstm.model.modules())
    assert all(p.used is None for b in xlstm.model.backbone.blocks
               for p in b.mlstm_layer.mlstm_backend.state_hooks)


def test_loads_local_huggingface_checkpoint(xlstm, tokens, tmp_path):
    reference(xlstm).save_pretrained(tmp_path / "hf")
    wrapped = XLSTMAdapter.from_pretrained(tmp_path / "hf")
    ref = xLSTMForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        own = ref(input_ids=tokens, use_cache=False).logits
    assert torch.equal(wrapped.run(tokens).logits, own)
    assert torch.equal(wrapped.run(tokens, cache="state").logits, own)
    # the checkpoint's config rebuilds the same architecture (its random-init control)
    control = XLSTMAdapter.build_model(wrapped.config)
    assert {k: v.shape for k, v in control.state_dict().items()} == \
        {k: v.shape for k, v in wrapped.model.state_dict().items()}
    assert control.config.to_dict() == wrapped.model.config.to_dict()


def test_configs_it_cannot_hook_raise(monkeypatch):
    with pytest.raises(ValueError, match="divisible by n_heads"):
        XLSTMAdapter.build(vocab_size=10, seq_len=6, seed=0, d_model=32, n_heads=3)
    monkeypatch.setattr(hf_xlstm, "external_xlstm", True)
    with pytest.raises(ValueError, match="uninstall"):
        XLSTMAdapter.build(vocab_size=10, seq_len=6, seed=0, d_model=32)

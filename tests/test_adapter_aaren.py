"""The Aaren adapter: the scan is causal softmax attention with a learned query and equals the
RNN recurrence; the per-step state is readable, patchable (running on from the edit) and
differentiable; organisms train."""

import math

import pytest
import torch
from torch.nn import functional as F

from archbench.adapters.aaren import AarenAdapter, combine, pack, prefix_scan, read_out, unpack
from archbench.hooks import Add, Patch, Zero

torch.set_num_threads(1)

V, T = 10, 7


@pytest.fixture
def aaren():
    adapter = AarenAdapter.build(vocab_size=V, seq_len=T, seed=0, d_model=32, n_heads=4, d_mlp=64)
    with torch.no_grad():  # spread the learned queries so that attention is far from uniform
        for block in adapter.model.blocks:
            block.aaren.query.mul_(4)
    return adapter


@pytest.fixture
def tokens():
    return torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(0))  # (B, T)


def sequential(scores, values):
    """The RNN written out: state_t = state_{t-1} (+) (s_t, 1, v_t), from the empty state."""
    m = torch.full_like(scores[:, 0], -math.inf)  # (B, H): the empty state (-inf, 0, 0)
    u, w = torch.zeros_like(scores[:, 0]), torch.zeros_like(values[:, 0])
    out = []
    for t in range(scores.shape[1]):
        m, u, w = combine((m, u, w), (scores[:, t], torch.ones_like(scores[:, t]), values[:, t]))
        out.append(pack(m, u, w))
    return torch.stack(out, 1)  # (B, T, H, dh + 2)


def learned_query_attention(mixer, x):
    """Causal softmax attention of the mixer's learned query over its keys and values."""
    B, T_, d = x.shape
    H, dh = mixer.n_heads, mixer.d_head
    k = mixer.k_proj(x).view(B, T_, H, dh).transpose(1, 2)  # (B, H, T, dh)
    v = mixer.v_proj(x).view(B, T_, H, dh).transpose(1, 2)
    q = mixer.query[None, :, None, :].expand(B, H, T_, dh)  # the same query at every step
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # (B, T, H, dh)


@pytest.mark.parametrize("T_", [1, 5, 8, 13])
def test_scan_equals_causal_softmax_attention_with_the_learned_query(aaren, T_):
    mixer = aaren.model.blocks[0].aaren
    x = torch.randn(3, T_, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores, values = mixer.scores_values(x)
        m, u, w = prefix_scan(scores, values)
        ref = learned_query_attention(mixer, x)
        assert torch.allclose(w / u[..., None], ref, atol=1e-6)
        # the states are what they say: m the running max, u the max-subtracted denominator
        assert torch.equal(m, scores.cummax(1).values)
        expected_u = torch.stack([(scores[:, :t + 1] - m[:, t:t + 1]).exp().sum(1) for t in range(T_)], 1)
        assert torch.allclose(u, expected_u, atol=1e-6)


def test_scan_equals_the_sequential_recurrence_and_is_stable():
    gen = torch.Generator().manual_seed(2)
    for scale in (1.0, 1e3):  # 1e3: plain exp(s) overflows, the max-subtracted scan does not
        scores = scale * torch.randn(2, 11, 3, generator=gen)  # (B, T, H)
        values = torch.randn(2, 11, 3, 5, generator=gen)  # (B, T, H, dh)
        scanned = pack(*prefix_scan(scores, values))
        assert torch.isfinite(scanned).all()
        assert torch.allclose(scanned, sequential(scores, values), atol=1e-6, rtol=1e-6)
        weights = torch.softmax(scores.transpose(1, 2)[:, :, None, :].expand(-1, -1, 11, -1)
                                .masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), -math.inf), -1)
        ref = (weights @ values.transpose(1, 2)).transpose(1, 2)  # (B, T, H, dh)
        assert torch.allclose(read_out(scanned), ref, atol=1e-5)


def test_the_mixers_own_recurrence_equals_the_scan_in_values_and_gradients(aaren):
    """`AarenMixer.recurrence` (the RNN step the state edits run on with) against the scan: its
    first step "edited" to the leaf (s_0, 1, v_0), every later step is the recurrence's own."""
    mixer = aaren.model.blocks[0].aaren
    x = torch.randn(3, T, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w = torch.randn(3, T, 4, 10, generator=torch.Generator().manual_seed(4))
    scores, values = mixer.scores_values(x)
    scanned = pack(*prefix_scan(scores, values))
    first = torch.zeros(3, T, dtype=torch.bool)
    first[:, 0] = True
    stepped = mixer.recurrence(scores, values, scanned.detach(), pack(scores, torch.ones_like(scores), values), first)
    assert torch.equal(stepped, sequential(scores, values))  # the same operations in the same order
    assert torch.allclose(stepped, scanned, atol=1e-6)
    g_scan = torch.autograd.grad((scanned * w).sum(), x, retain_graph=True)[0]
    g_step = torch.autograd.grad((stepped * w).sum(), x)[0]
    assert torch.allclose(g_step, g_scan, atol=1e-5)


@pytest.mark.parametrize("cache", [None, "all", "state"])
def test_hooked_runs_equal_the_plain_forward_in_logits_and_gradients(aaren, tokens, cache):
    w = torch.randn(4, T, V, generator=torch.Generator().manual_seed(5))
    own = aaren.model(tokens)
    g_own = torch.autograd.grad((own * w).sum(), list(aaren.model.parameters()))
    assert torch.equal(aaren.run(tokens, cache=cache).logits, own.detach())
    out = aaren.run(tokens, cache=cache, grad=True)  # with the state cached: the O(T) recurrence
    assert torch.equal(out.logits, own)
    g = torch.autograd.grad((out.logits * w).sum(), list(aaren.model.parameters()))
    for (name, _), a, b in zip(aaren.model.named_parameters(), g, g_own):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_every_hook_point_fires_with_its_axes(aaren, tokens):
    out = aaren.run(tokens, cache="all")
    assert set(out.cache) == set(aaren.specs)
    for name, spec in aaren.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, T), name
    c = out.cache
    assert c["blocks.0.aaren.state"].shape == (4, T, 4, 8 + 2)  # d_head 8, then u and m
    assert c["blocks.0.aaren.scores"].shape == (4, T, 4)
    assert aaren.names("state") == ["blocks.0.aaren.state", "blocks.1.aaren.state"]
    mixer = aaren.model.blocks[1].aaren
    with torch.no_grad():  # the mixer output is read from the state: out_proj(w / u)
        assert torch.allclose(mixer.out_proj(read_out(c["blocks.1.aaren.state"]).flatten(2)),
                              c["blocks.1.aaren.out"], atol=1e-6)
    assert torch.equal(unpack(c["blocks.1.aaren.state"])[0], c["blocks.1.aaren.scores"].cummax(1).values)
    assert torch.allclose(c["blocks.1.resid_post"], c["blocks.0.resid_post"] + c["blocks.1.aaren.out"]
                          + c["blocks.1.mlp.out"], atol=1e-6)
    assert torch.allclose(aaren.decode(c["blocks.1.resid_post"]), out.logits, atol=1e-6)


@pytest.mark.parametrize("t", [0, 3, T - 1])
def test_state_edit_at_t_changes_outputs_from_t_on_only(aaren, tokens, t):
    name, mixer_out = "blocks.0.aaren.state", "blocks.0.aaren.out"
    clean = aaren.run(tokens, cache=[name, mixer_out])
    out = aaren.run(tokens, cache=[name, mixer_out], interventions={name: Add(torch.ones(10), positions=[t])})
    assert torch.equal(out.logits[:, :t], clean.logits[:, :t])
    assert torch.equal(out.cache[mixer_out][:, :t], clean.cache[mixer_out][:, :t])
    assert not torch.allclose(out.cache[mixer_out][:, t], clean.cache[mixer_out][:, t])  # o_t reads it
    if t + 1 < T:  # later steps combine the edited state with their tokens
        assert (out.cache[mixer_out][:, t + 1:] - clean.cache[mixer_out][:, t + 1:]).abs().amax(-1).min() > 1e-4
    states = out.cache[name]  # the states the recurrence used
    assert torch.equal(states[:, :t], clean.cache[name][:, :t])
    assert torch.equal(states[:, t], clean.cache[name][:, t] + 1)


@pytest.mark.parametrize("t", [1, 4])
def test_an_edited_state_is_what_the_rnn_runs_on_from(aaren, tokens, t):
    name = "blocks.0.aaren.state"
    edited = torch.randn(4, 4, 10, generator=torch.Generator().manual_seed(6))
    edited[..., -2] = edited[..., -2].abs() + 0.5  # a positive denominator
    clean = aaren.run(tokens, cache=[name, "embed"]).cache
    source = clean[name].clone()
    source[:, t] = edited
    out = aaren.run(tokens, cache=[name, "blocks.0.aaren.out"], interventions={name: Patch(source, positions=[t])})
    block = aaren.model.blocks[0]
    with torch.no_grad():  # expected: the RNN step continued from the edited state, token by token
        scores, values = block.aaren.scores_values(block.norm1(clean["embed"]))
        state, expected = unpack(edited), [edited]
        for s in range(t + 1, T):
            state = combine(state, (scores[:, s], torch.ones_like(scores[:, s]), values[:, s]))
            expected.append(pack(*state))
        expected = torch.stack(expected, 1)  # (B, T - t, H, dh + 2)
        mixed = block.aaren.out_proj(read_out(expected).flatten(2))
    assert torch.allclose(out.cache[name][:, t:], expected, atol=1e-6)
    assert torch.allclose(out.cache["blocks.0.aaren.out"][:, t:], mixed, atol=1e-6)


def test_patching_the_state_at_t_carries_the_source_history(aaren, tokens):
    """Base and source differ only up to step t: patching a layer's state at t makes that
    layer's outputs from t on the source's; patching every layer's makes the logits after t
    the source's (at t the residual stream still holds base's own token t)."""
    t = 3
    source = tokens.clone()
    source[:, :t + 1] = (tokens[:, :t + 1] + 1) % V
    names = ["blocks.0.aaren.state", "blocks.1.aaren.state"]
    src = aaren.run(source, cache="all").cache
    one = aaren.run(tokens, cache=["blocks.0.aaren.out"],
                    interventions={names[0]: Patch(src[names[0]], positions=[t])}).cache["blocks.0.aaren.out"]
    assert torch.allclose(one[:, t:], src["blocks.0.aaren.out"][:, t:], atol=1e-6)
    assert not torch.allclose(one[:, :t], src["blocks.0.aaren.out"][:, :t])
    out = aaren.run(tokens, interventions={n: Patch(src[n], positions=[t]) for n in names}).logits
    assert torch.allclose(out[:, t + 1:], src["logits"][:, t + 1:], atol=1e-5)
    assert not torch.allclose(out[:, :t], src["logits"][:, :t])


def test_a_zeroed_state_is_an_empty_memory(aaren, tokens):
    name = "blocks.0.aaren.state"
    out = aaren.run(tokens, cache=[name, "blocks.0.aaren.out"], interventions={name: Zero(positions=[2])})
    assert torch.isfinite(out.logits).all()
    mixer = aaren.model.blocks[0].aaren
    with torch.no_grad():  # o_2 = 0: the mixer output is the projection's bias there
        assert torch.allclose(out.cache["blocks.0.aaren.out"][:, 2], mixer.out_proj.bias.expand(4, -1))


def test_gradients_through_the_cached_state_are_those_of_running_on_from_it(aaren, tokens):
    """d(logits)/d(cached state at t) includes every later step: it matches a central finite
    difference of runs whose state at t is patched (float64, so the difference is exact to ~1e-8)."""
    aaren.model.double()
    name, t = "blocks.0.aaren.state", 2
    out = aaren.run(tokens, cache=[name], grad=True)
    (g,) = torch.autograd.grad(out.logits[:, -1].sum(), out.cache[name])
    assert g.shape == (4, T, 4, 10) and g[:, t].abs().sum() > 0 and g[:, T - 1].abs().sum() > 0
    assert g[:, t, :, -1].abs().sum() > 0  # the max matters to later steps (the weight of the past)
    clean = out.cache[name].detach()
    direction = torch.randn(clean[:, t].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    eps = 1e-5

    def f(sign):
        source = clean.clone()
        source[:, t] += sign * eps * direction
        return aaren.run(tokens, interventions={name: Patch(source, positions=[t])}).logits[:, -1].sum()

    numeric = (f(1) - f(-1)) / (2 * eps)
    assert torch.allclose((g[:, t] * direction).sum(), numeric, atol=1e-7, rtol=1e-6)


def test_hooks_removed_and_used_cleared(aaren, tokens):
    aaren.run(tokens, cache="state", interventions={"blocks.1.aaren.state": Zero(positions=[1])})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in aaren.model.modules())
    assert all(b.aaren.hook_state.used is None for b in aaren.model.blocks)


def test_bad_configs_and_too_long_inputs_are_refused(aaren):
    with pytest.raises(ValueError, match="divisible"):
        AarenAdapter.build(vocab_size=V, seq_len=T, seed=0, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="learned positions"):
        aaren.run(torch.zeros(1, T + 1, dtype=torch.long))


def test_fit_trains_and_save_load_roundtrip(tokens, tmp_path):
    from archbench.tasks import Count
    task = Count(length=5, m=2)
    adapter = AarenAdapter.for_task(task, seed=0, d_model=16, n_heads=2, d_mlp=32)
    report = adapter.fit(task, 0, steps=20, eval_every=10, n_train=256, batch=32)
    assert 0.0 <= report.accuracy <= 1.0 and report.steps == 20
    adapter.save(tmp_path / "org")
    back = AarenAdapter.load(tmp_path / "org")
    x = task.sample(8, 0).tokens
    assert torch.equal(back.run(x).logits, adapter.run(x).logits)
    assert torch.equal(back.run(x, cache="all").cache["blocks.1.aaren.state"],
                       adapter.run(x, cache="all").cache["blocks.1.aaren.state"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["modadd", "parity", "recall", "count", "facts"])
def test_organisms_pass_the_behavioural_gate(name):
    from archbench import registry
    task = registry.task(name).for_seed(0)
    adapter = AarenAdapter.for_task(task, 0)
    assert adapter.fit(task, 0).accuracy >= 0.9

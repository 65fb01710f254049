"""The MoE adapter: parity with Hugging Face Mixtral, every hook fires, experts and routing act."""

import pytest
import torch
from transformers import MixtralForCausalLM

from archbench.adapters.moe import EXPERTS_NAME, MoEAdapter
from archbench.hooks import Patch, Zero
from archbench.tasks.modadd import ModAdd

torch.set_num_threads(1)


@pytest.fixture
def moe():
    return MoEAdapter.build(vocab_size=10, seq_len=6, seed=0)


@pytest.fixture
def tokens():
    return torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))  # (B, T)


def test_no_hook_run_is_exactly_the_wrapped_model(moe, tokens):
    with torch.no_grad():
        own = moe.model(input_ids=tokens, use_cache=False).logits  # (B, T, V)
    assert torch.equal(moe.run(tokens).logits, own)
    assert torch.equal(moe.run(tokens, cache="all").logits, own)  # caching is read-only


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_hooked_experts_equal_transformers_default_paths(moe, tokens, impl):
    ours = moe.run(tokens).logits
    moe.model.config._attn_implementation = "eager"
    moe.model.config._experts_implementation = impl
    try:
        with torch.no_grad():
            theirs = moe.model(input_ids=tokens, use_cache=False).logits
    finally:
        moe.model.config._attn_implementation = "archbench_eager"
        moe.model.config._experts_implementation = EXPERTS_NAME
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_every_hook_point_fires_with_its_axes(moe, tokens):
    out = moe.run(tokens, cache="all")
    assert set(out.cache) == set(moe.specs)
    assert len(moe.names("expert")) == 2 * 4 and len(moe.names("router")) == 2
    for name, spec in moe.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, 6), name
    assert out.cache["blocks.0.moe.router"].shape == (4, 6, 4)
    c = out.cache
    assert torch.allclose(c["blocks.0.resid_post"], c["blocks.0.resid_mid"] + c["blocks.0.moe.out"], atol=1e-5)
    assert torch.allclose(moe.decode(c["blocks.1.resid_post"]), out.logits, atol=1e-5)


def test_expert_outputs_weighted_by_router_sum_to_moe_out(moe, tokens):
    out = moe.run(tokens, cache="all").cache
    for i in range(2):
        weights, logits = moe.routing(tokens, i)  # (B, T, E)
        assert torch.equal(logits, out[f"blocks.{i}.moe.router"])
        assert ((weights > 0).sum(-1) == 2).all()  # top-2
        experts = torch.stack([out[f"blocks.{i}.moe.experts.{e}.out"] for e in range(4)], -2)  # (B, T, E, d)
        combined = (weights.unsqueeze(-1) * experts).sum(-2)  # (B, T, d)
        assert torch.allclose(combined, out[f"blocks.{i}.moe.out"], atol=1e-6)


def test_zero_mixer_changes_logits(moe, tokens):
    base = moe.run(tokens).logits
    out = moe.run(tokens, interventions={"blocks.1.attn.out": Zero(positions=[4])}).logits
    assert torch.equal(out[:, :4], base[:, :4])
    assert not torch.allclose(out[:, 4], base[:, 4])


def test_ablating_a_routed_expert_removes_exactly_its_share(moe, tokens):
    c = moe.run(tokens, cache="all").cache
    weights, _ = moe.routing(tokens, 1)
    e = int(weights[0, 0].argmax())  # an expert routed at (0, 0)
    out = moe.run(tokens, cache=["blocks.1.moe.out"],
                  interventions={f"blocks.1.moe.experts.{e}.out": Zero()})
    expected = c["blocks.1.moe.out"] - weights[..., e, None] * c[f"blocks.1.moe.experts.{e}.out"]
    assert torch.allclose(out.cache["blocks.1.moe.out"], expected, atol=1e-6)
    assert not torch.allclose(out.logits, moe.run(tokens).logits)
    # ablating an expert that no token is routed to changes nothing
    unused = [x for x in range(4) if not (weights[..., x] > 0).any()]
    for x in unused:
        assert torch.allclose(moe.run(tokens, interventions={f"blocks.1.moe.experts.{x}.out": Zero()}).logits,
                              moe.run(tokens).logits)


def test_patching_an_expert_from_a_source_run(moe, tokens):
    source = tokens.flip(0)
    name = "blocks.0.moe.experts.1.out"
    src = moe.run(source, cache=[name]).cache[name]
    out = moe.run(tokens, cache=[name], interventions={name: Patch(src)})
    assert torch.equal(out.cache[name], src)


def test_router_intervention_forces_routing(moe, tokens):
    force = lambda logits, spec: torch.tensor([10.0, 9.0, -10.0, -10.0]).expand_as(logits)
    out = moe.run(tokens, cache="all", interventions={"blocks.0.moe.router": force}).cache
    w = torch.softmax(torch.tensor([10.0, 9.0]), 0)
    combined = w[0] * out["blocks.0.moe.experts.0.out"] + w[1] * out["blocks.0.moe.experts.1.out"]
    assert torch.allclose(out["blocks.0.moe.out"], combined, atol=1e-6)
    assert not torch.allclose(moe.run(tokens, interventions={"blocks.0.moe.router": force}).logits,
                              moe.run(tokens).logits)


def test_hooks_removed_after_run(moe, tokens):
    with pytest.raises(RuntimeError, match="boom"):
        moe.run(tokens, interventions={"blocks.0.moe.router": lambda a, s: (_ for _ in ()).throw(RuntimeError("boom"))})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in moe.model.modules())


def test_loads_local_huggingface_checkpoint(moe, tokens, tmp_path):
    moe.model.save_pretrained(tmp_path / "hf")
    wrapped = MoEAdapter.from_pretrained(tmp_path / "hf")
    reference = MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                   experts_implementation="eager").eval()
    with torch.no_grad():
        own = reference(input_ids=tokens, use_cache=False).logits
    assert torch.allclose(wrapped.run(tokens).logits, own, atol=1e-6)
    assert len(wrapped.run(tokens, cache="expert").cache) == 8

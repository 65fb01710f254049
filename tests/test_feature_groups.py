"""Feature groups `name[a:b]`: cached as a slice, edited alone, and designated by KAN and spiking."""

import pytest
import torch

from archbench import feature_groups, iit, iit_sites, registry
from archbench.hooks import Patch, Zero
from archbench.tasks import Count


@pytest.fixture(scope="module")
def kan():
    task = Count(length=4, m=3)
    return task, registry.adapter("kan").for_task(task, 0)


def test_parse_split_and_refusals():
    assert feature_groups.parse("blocks.0.edges[4:8]") == ("blocks.0.edges", slice(4, 8))
    assert feature_groups.parse("blocks.0.edges") is None
    assert feature_groups.split("h", 16, 4) == ["h[0:4]", "h[4:8]", "h[8:12]", "h[12:16]"]
    with pytest.raises(ValueError, match="do not split"):
        feature_groups.split("h", 10, 4)
    with pytest.raises(KeyError, match="empty slice"):
        feature_groups.parse("h[3:3]")


def test_a_cached_group_is_its_hook_point_s_slice(kan):
    task, adapter = kan
    x = task.sample(16, 0, "test").tokens  # (16, T)
    out = adapter.run(x, cache=["blocks.0.edges[4:8]", "blocks.0.edges"])
    assert list(out.cache) == ["blocks.0.edges", "blocks.0.edges[4:8]"]
    assert torch.equal(out.cache["blocks.0.edges[4:8]"], out.cache["blocks.0.edges"][:, :, 4:8])


def test_an_intervention_on_a_group_edits_that_slice_alone(kan):
    task, adapter = kan
    x, src = task.sample(16, 0, "test").tokens, task.sample(16, 1, "test").tokens
    at = adapter.answer_position(task.seq_len)
    clean = adapter.run(x, cache=["blocks.0.edges"]).cache["blocks.0.edges"]  # (16, T, out, in)
    source = adapter.run(src, cache=["blocks.0.edges[0:4]"]).cache["blocks.0.edges[0:4]"]  # (16, T, 4, in)
    out = adapter.run(x, cache=["blocks.0.edges"],
                      interventions={"blocks.0.edges[0:4]": Patch(source, positions=at)})
    edited = out.cache["blocks.0.edges"]
    assert torch.equal(edited[:, at, :4], source[:, at]) and torch.equal(edited[:, at, 4:], clean[:, at, 4:])
    assert not torch.equal(out.logits, adapter.run(x).logits)
    # two groups of one hook point compose; a whole-point patch of the same values is the same run
    both = adapter.run(x, interventions={"blocks.0.edges[0:4]": Zero(), "blocks.0.edges[4:16]": Zero()})
    assert torch.equal(both.logits, adapter.run(x, interventions={"blocks.0.edges": Zero()}).logits)


def test_group_edits_are_differentiable_and_shapes_are_checked(kan):
    task, adapter = kan
    x = task.sample(8, 0, "test").tokens
    leaf = {}

    def take(act, spec):
        assert spec.name == "blocks.0.edges[8:12]" and spec.role == "mlp"
        leaf["a"] = act.detach().requires_grad_(True)  # (8, T, 4, in)
        return leaf["a"]

    logits = adapter.run(x, interventions={"blocks.0.edges[8:12]": take}, grad=True).logits
    (grad,) = torch.autograd.grad(logits[:, -1].sum(), leaf["a"])
    assert grad.shape == leaf["a"].shape and float(grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="expected"):
        adapter.run(x, interventions={"blocks.0.edges[8:12]": lambda a, s: a[:, :, :1]})
    with pytest.raises(KeyError, match="no hook point"):
        adapter.run(x, cache=["blocks.9.edges[0:4]"])
    with pytest.raises(KeyError, match="no hook point"):
        adapter.run(x, interventions={"nowhere[0:4]": Zero()})


@pytest.mark.parametrize("family, designated, n", [("kan", "blocks.0.edges[0:4]", 4),
                                                   ("spiking", "blocks.1.mem[0:16]", 4)])
def test_kan_and_spiking_designate_group_zero_among_their_groups(family, designated, n):
    task = Count(length=4, m=3)
    adapter = registry.adapter(family).for_task(task, 0)
    al = iit_sites.alignment(adapter, task)
    assert iit_sites.why_not(family) is None
    assert al.designated == designated and len(al.candidates) == n
    assert al.position == adapter.answer_position(task.seq_len)
    # every candidate is a group of the designated one's hook point, together covering it
    base = feature_groups.base_name(designated)
    assert {feature_groups.base_name(c) for c in al.candidates} == {base}
    whole = adapter.run(task.sample(4, 0, "test").tokens, cache=[base, *al.candidates]).cache
    assert torch.equal(torch.cat([whole[c] for c in al.candidates], dim=2), whole[base])


def test_a_group_of_a_stream_site_is_refused_as_a_designated_component():
    task = Count(length=4, m=3)
    adapter = registry.adapter("kan").for_task(task, 0)
    with pytest.raises(ValueError, match="never the residual stream"):
        iit.Alignment("blocks.0.out[0:4]", ("blocks.0.out[0:4]", "blocks.0.out[4:8]"), 3).check(adapter)


def test_strict_iit_losses_reach_the_designated_group_of_a_kan(kan):
    task, adapter = kan
    al = iit_sites.alignment(adapter, task)
    pairs = iit.pair_batch(task.counterfactuals(32, 0, "train"), torch.arange(16))
    loss_iit, loss_strict = iit.iit_losses(adapter, pairs, al, torch.Generator().manual_seed(0))
    (loss_iit + loss_strict).backward()
    coef = adapter.kan.act_fun[0].coef.grad  # (in, out, coefficients)
    assert coef is not None and float(coef.abs().sum()) > 0
    adapter.model.zero_grad()


@pytest.mark.slow  # about 15 s on one core
def test_a_strict_iit_kan_holds_count_in_its_first_node_group_and_patching_finds_it():
    from archbench import known_answer, localisation

    task = Count(length=4, m=3)
    adapter = registry.adapter("kan").for_task(task, 0)
    al = iit_sites.alignment(adapter, task)
    report = iit.fit_iit(adapter, task, 0, al, **{**known_answer.iit_config("kan", task), "steps": 600})
    m = known_answer.measure(adapter, task, 0, al)
    assert report.accuracy >= 0.9 and m["iia"] >= 0.9, (report.accuracy, m)
    assert m["max_other_change"] <= 0.1, m  # strict training made the other node groups inert
    patch = localisation.patching_scores(adapter, task, 0, al)
    assert localisation.rank(al.designated, patch) == 1
    control = registry.adapter("kan").for_task(task, 0)
    assert patch[al.designated] > localisation.patching_scores(control, task, 0, al)[al.designated] + 0.5

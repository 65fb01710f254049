"""Planted-mechanism tests for ablation and attribution that a chance-level scorer would fail.

`Planted` solves modular addition with K components (`blocks.{i}.mlp.out`, role mlp) that
add into one stream read by a threshold readout: with `mode="single"` component 0 carries
the one-hot answer and the others carry noise; with `mode="all"` each carries 1/K of it and
the readout needs every share (ablating any one drops the answer). A ranking no better than
a random order scores 0 on both; a K-dependent score differs between K = 2 and K = 4.

`PlantedRecall` is a differentiable associative-recall model that reads exactly the recall
task's relevant positions: answer logit = sum over pairs of (key . query) * value, a
trilinear form of the matching key, its value and the query. `ignore=True` outputs a
constant: the model ignores its input.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from archbench.adapter import Adapter, Site, hook
from archbench.hooks import HookPoint
from archbench.tasks.modadd import ModAdd
from archbench.tasks.recall import Recall
from archbench.techniques.ablation import Ablation, kept_counts, random_subsets
from archbench.techniques.attribution import Attribution

torch.set_num_threads(1)
D = ("batch", "pos", "d")


class _PlantedModel(nn.Module):
    def __init__(self, vocab: int, n: int, mode: str):
        super().__init__()
        self.vocab, self.p, self.n, self.mode = vocab, vocab - 1, n, mode
        self.embed = HookPoint()
        self.comps = nn.ModuleList(HookPoint() for _ in range(n))
        self.stream = HookPoint()
        self.register_buffer("tiebreak", torch.linspace(0.1, 0.0, vocab))  # (V,)

    def forward(self, tokens):
        B, T = tokens.shape
        e = self.embed(F.one_hot(tokens, self.vocab).float())  # (B, T, V)
        ans = torch.zeros(B, T, self.vocab)  # (B, T, V)
        ans[:, -1] = F.one_hot((tokens[:, 0] + tokens[:, 1]) % self.p, self.vocab).float()
        total = 0 * e
        for i, hook in enumerate(self.comps):
            if self.mode == "all":
                h = ans / self.n
            else:
                h = ans if i == 0 else 0.01 * torch.randn(B, T, self.vocab)
            total = total + hook(h)
        s = self.stream(total)  # (B, T, V)
        return 10.0 * F.relu(s - (1 - 1 / (2 * self.n))) + self.tiebreak  # (B, T, V)


class Planted(Adapter):
    family = "planted"
    capabilities = frozenset()
    default_config = {"n": 2, "mode": "single"}

    @classmethod
    def build_model(cls, config):
        return _PlantedModel(config["vocab_size"], config["n"], config["mode"])

    def forward(self, tokens):
        return self.model(tokens)

    def hooks(self):
        m, n = self.model, self.config["n"]
        return [hook("embed", "embed", D, 0, Site(m.embed)),
                *[hook(f"blocks.{i}.mlp.out", "mlp", D, i, Site(h)) for i, h in enumerate(m.comps)],
                hook("stream", "stream", D, n, Site(m.stream))]


@pytest.fixture(scope="module")
def modadd():
    return ModAdd(p=23)


def _ablate(task, **kw):
    torch.manual_seed(0)
    return Ablation(n_train=128, n_test=256)(Planted.for_task(task, 0, **kw), task, 0)


def _consistent(r):
    assert r.applicable and 0.0 <= r.score <= 1.0
    assert r.score == pytest.approx(min(1.0, max(0.0, sum(r.per_example) / len(r.per_example))), abs=1e-6)


def test_a_single_component_mechanism_scores_the_same_among_2_and_4_components(modadd):
    r2, r4 = _ablate(modadd, n=2), _ablate(modadd, n=4)
    for r, n in ((r2, 2), (r4, 4)):
        _consistent(r)
        assert r.metrics["n_components"] == n and r.metrics["order"][0] == "blocks.0.mlp.out"
        assert r.metrics["curve_kept"] == list(range(1, n + 1))
        assert r.metrics["area_ranked"] == 1.0 and r.metrics["area_random"] < 0.8
    # the random order's area moves with K; the chance-corrected score does not
    assert r2.metrics["area_random"] > r4.metrics["area_random"] + 0.05
    assert r2.score == pytest.approx(1.0, abs=1e-6) and r4.score == pytest.approx(1.0, abs=1e-6)
    # the random curve is exact: component 0 kept in k of K subsets
    chance = r4.metrics["accuracy_all_ablated"]
    expected = [k / 4 + (1 - k / 4) * chance for k in (1, 2, 3)] + [1.0]
    assert r4.metrics["curve_accuracy_random"] == pytest.approx(expected, abs=0.02)
    assert r4.metrics["random_subsets_per_point"] == [4, 6, 4, 0]


def test_a_mechanism_that_needs_every_component_scores_zero(modadd):
    for n in (2, 4):
        r = _ablate(modadd, n=n, mode="all")
        _consistent(r)
        assert r.metrics["accuracy_clean"] == 1.0 and r.metrics["accuracy_all_ablated"] < 0.1
        assert r.metrics["area_ranked"] == pytest.approx(r.metrics["area_random"], abs=1e-9)
        assert r.score == pytest.approx(0.0, abs=1e-9)
        assert all(v == pytest.approx(0.0, abs=1e-9) for v in r.per_example)


def test_curve_helpers():
    assert kept_counts(4, 16) == [1, 2, 3, 4]
    ks = kept_counts(40, 16)
    assert len(ks) == 16 and ks[0] == 1 and ks[-1] == 40
    rng = __import__("numpy").random.default_rng(0)
    assert len(random_subsets(4, 2, 16, rng)) == 6  # every subset: exact
    drawn = random_subsets(10, 5, 16, rng)
    assert len(drawn) == len(set(drawn)) == 16 and all(len(s) == 5 for s in drawn)


def test_moe_experts_are_not_ablation_components():
    """One component granularity per family: an MoE block's experts sit inside its mlp output."""
    from archbench.adapters.moe import MoEAdapter
    from archbench.adapters.transformer import TransformerAdapter

    task = ModAdd(p=7)
    moe, ref = MoEAdapter.for_task(task, 0), TransformerAdapter.for_task(task, 0)
    assert len(moe.names("expert")) == 8  # still readable by name and role
    r = Ablation(n_train=32, n_test=32)(moe, task, 0)
    _consistent(r)
    sites = {d["site"] for d in r.details}
    assert not any(".experts." in s for s in sites)
    assert {d["role"] for d in r.details} == {"mixer", "mlp"}
    assert r.metrics["n_components"] == len(ref.names(["mixer", "mlp"])) == 4


class _PlantedRecallModel(nn.Module):
    def __init__(self, vocab: int, ignore: bool):
        super().__init__()
        self.vocab, self.ignore = vocab, ignore
        self.embed = HookPoint()
        self.register_buffer("tiebreak", torch.linspace(0.1, 0.0, vocab))  # (V,)

    def forward(self, tokens):
        e = self.embed(F.one_hot(tokens, self.vocab).float())  # (B, T, V)
        keys, values, query = e[:, 0:-1:2], e[:, 1:-1:2], e[:, -1:]  # (B, P, V), (B, P, V), (B, 1, V)
        match = (keys * query).sum(-1, keepdim=True)  # (B, P, 1): 1 at the matching key
        logits = 10.0 * (match * values).sum(1)  # (B, V)
        if self.ignore:
            logits = 0 * logits
        logits = logits + self.tiebreak
        return logits[:, None].expand(-1, tokens.shape[1], -1)  # (B, T, V)


class PlantedRecall(Adapter):
    family = "planted-recall"
    capabilities = frozenset({"gradients"})
    default_config = {"ignore": False}

    @classmethod
    def build_model(cls, config):
        return _PlantedRecallModel(config["vocab_size"], config["ignore"])

    def forward(self, tokens):
        return self.model(tokens)

    def hooks(self):
        return [hook("embed", "embed", D, 0, Site(self.model.embed))]


class NoGradPlantedRecall(PlantedRecall):
    family = "planted-recall-nograd"
    capabilities = frozenset()


def test_recall_marks_the_query_relevant():
    task = Recall()
    ex = task.sample(64, 0, "test")
    assert ex.relevant[:, -1].all() and (ex.relevant.sum(1) == 3).all()
    # changing the query (to another key of the sequence) changes the answer
    other = ex.tokens.clone()
    other[:, -1] = torch.where(other[:, 0] == other[:, -1], other[:, 2], other[:, 0])
    changed = task.rule(other) != ex.answer
    assert changed.float().mean() > 0.5


@pytest.mark.parametrize("cls", [PlantedRecall, NoGradPlantedRecall])
def test_attribution_on_a_planted_recall_model(cls):
    task = Recall()
    good = Attribution(n_examples=64, n_steps=8)(cls.for_task(task, 0), task, 0)
    _consistent(good)
    assert good.metrics["constant_positions"] == []  # the recall query varies: it is scored
    assert good.metrics["method"] == ("integrated_gradients" if cls is PlantedRecall else "feature_ablation")
    assert good.score == pytest.approx(1.0) and good.metrics["auroc"] == pytest.approx(1.0)
    ignore = Attribution(n_examples=64, n_steps=8)(cls.for_task(task, 0, ignore=True), task, 0)
    _consistent(ignore)
    assert ignore.metrics["auroc"] == pytest.approx(0.5)  # all ties: raw AUROC at chance
    assert ignore.score == pytest.approx(0.0, abs=1e-9)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in ignore.per_example)


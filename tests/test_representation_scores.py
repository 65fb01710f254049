"""Planted-model tests for the representation scores (probe, SAE, CKA).

`Planted` runs on parity with known secret positions (5, 6, 9); its primary variable is
partial_xor = bit5 ^ bit6. It has an embed site (the one-hot input), a `mid` stream and a
`deep` stream (the readout's input, read by the logits). `mode` says what `mid` and `deep`
hold at the answer position (elsewhere small noise):
- "mid": mid = one-hot of partial_xor (+ noise), deep = one-hot of the answer;
- "deep": mid = noise, deep = one-hot of partial_xor (the variable only at the readout's input);
- "lookup": mid = one-hot of the tuple of the three secret bits (8 values): every function of
  the relevant inputs, the variable and any control task alike, is linearly decodable there;
- "none": mid and deep are noise (the model ignores its input).
A score that is chance-level, or that reads the readout's input, fails these tests.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from archbench.adapter import Adapter, Site, hook
from archbench.hooks import HookPoint
from archbench.tasks.parity import Parity

torch.set_num_threads(1)
D = ("batch", "pos", "d")
WIDTH = 16


def _technique(module: str, cls: str):
    return getattr(importlib.import_module(f"archbench.techniques.{module}"), cls)


Probe = _technique("probe", "Probe")
probe_module = importlib.import_module("archbench.techniques.probe")


class _PlantedModel(nn.Module):
    def __init__(self, vocab: int, mode: str, seed: int):
        super().__init__()
        self.vocab, self.mode = vocab, mode
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("rot", torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=gen))[0])
        self.embed, self.mid, self.deep = HookPoint(), HookPoint(), HookPoint()

    def forward(self, tokens):
        B, T = tokens.shape
        e = self.embed(F.one_hot(tokens, self.vocab).float())  # (B, T, V)
        xor = tokens[:, 5] ^ tokens[:, 6]  # (B,)
        answer = (tokens[:, 5] + tokens[:, 6] + tokens[:, 9]) % 2  # (B,)
        mid = 0.05 * torch.randn(B, T, WIDTH)  # (B, T, W)
        deep = 0.05 * torch.randn(B, T, WIDTH)  # (B, T, W)
        if self.mode == "mid":
            mid[:, -1, :2] += F.one_hot(xor, 2).float()
        if self.mode == "lookup":
            mid[:, -1, :8] += F.one_hot(4 * tokens[:, 5] + 2 * tokens[:, 6] + tokens[:, 9], 8).float()
        if self.mode in ("mid", "lookup"):
            deep[:, -1, :2] += F.one_hot(answer, 2).float()
        if self.mode == "deep":
            deep[:, -1, :2] += F.one_hot(xor, 2).float()
        mid = self.mid(mid @ self.rot + 0 * e.sum(-1, keepdim=True))  # (B, T, W) rotated
        deep = self.deep(deep)  # (B, T, W)
        logits = torch.zeros(B, T, self.vocab)
        logits[..., :2] = 10 * deep[..., :2]
        return logits  # (B, T, V)


class Planted(Adapter):
    family = "planted"
    default_config = {"mode": "mid"}

    @classmethod
    def build_model(cls, config):
        return _PlantedModel(config["vocab_size"], config["mode"], config.get("seed", 0))

    def forward(self, tokens):
        return self.model(tokens)

    def hooks(self):
        m = self.model
        return [hook("embed", "embed", D, 0, Site(m.embed)), hook("mid", "stream", D, 1, Site(m.mid)),
                hook("deep", "stream", D, 2, Site(m.deep))]


@pytest.fixture(scope="module")
def task():
    return Parity(n_bits=10, secret=(5, 6, 9))


def _planted(task, mode):
    torch.manual_seed(0)
    return Planted.for_task(task, 0, mode=mode)


def _ok(result, n=None):
    assert result.applicable, result.reason
    assert 0.0 <= result.score <= 1.0
    if n is not None:
        assert len(result.per_example) == n
    assert sum(result.per_example) / len(result.per_example) == pytest.approx(
        result.score, abs=1e-9) or result.score in (0.0, 1.0)


FAST = {"n_train": 512, "n_val": 256, "n_test": 256}


# ---- probe --------------------------------------------------------------------------------

def test_probe_scores_a_variable_held_at_an_intermediate_site(task):
    r = Probe(**FAST)(_planted(task, "mid"), task, 0)
    _ok(r, 256)
    assert r.metrics["best_site"] == "mid"
    assert r.score > 0.7 and r.metrics["normalised_accuracy"] > 0.95
    assert r.metrics["control_normalised_accuracy"] < 0.3


def test_probe_ignores_a_variable_held_only_at_the_readout_input(task):
    r = Probe(**FAST)(_planted(task, "deep"), task, 0)
    _ok(r)
    by_site = {d["site"]: d for d in r.details}
    assert by_site["deep"]["normalised"] > 0.95 and not by_site["deep"]["scored"]
    assert r.score < 0.1


def test_probe_selectivity_is_zero_where_every_function_of_the_inputs_is_decodable(task):
    """A lookup table of the relevant inputs decodes the variable and the control alike."""
    r = Probe(**FAST)(_planted(task, "lookup"), task, 0)
    _ok(r)
    assert r.metrics["normalised_accuracy"] > 0.95  # the plain probe would score ~1
    assert r.metrics["control_normalised_accuracy"] > 0.9
    assert r.score < 0.1


def test_probe_on_a_model_that_ignores_its_input(task):
    r = Probe(**FAST)(_planted(task, "none"), task, 0)
    _ok(r)
    assert r.score < 0.1


def test_probe_random_init_transformer_has_about_zero_selectivity(task):
    from archbench.adapters.transformer import TransformerAdapter

    r = Probe(**FAST)(TransformerAdapter.for_task(task, 0), task, 0)
    _ok(r)
    assert r.score < 0.15


def test_probe_is_not_applicable_without_a_representation_site(task):
    class DeepOnly(Planted):
        family = "deep-only"

        def hooks(self):
            return [hook("embed", "embed", D, 0, Site(self.model.embed)),
                    hook("deep", "stream", D, 2, Site(self.model.deep))]

    r = Probe(**FAST)(DeepOnly.for_task(task, 0), task, 0)
    assert not r.applicable and "readout" in r.reason


def test_control_labels_are_a_fixed_function_of_the_relevant_inputs(task):
    ex = {s: task.sample(256, 0, s) for s in ("train", "test")}
    keys = {s: probe_module.control_keys(e, e.latents[task.primary]) for s, e in ex.items()}  # (n, T)
    values = {s: e.latents[task.primary].numpy() for s, e in ex.items()}
    a = probe_module.control_labels(keys, values, 2, 4, seed=3)  # split -> (n, 4)
    again = probe_module.control_labels(keys, values, 2, 4, seed=3)
    assert all(torch.equal(a[s], again[s]) for s in a)  # deterministic
    other = probe_module.control_labels(keys, values, 2, 8, seed=4)
    assert not torch.equal(a["train"], other["train"][:, :4])  # seeded
    labels = torch.cat([a["train"], a["test"]])  # (2n, 4)
    tup = torch.cat([4 * e.tokens[:, 5] + 2 * e.tokens[:, 6] + e.tokens[:, 9] for e in ex.values()])
    xor = torch.cat([e.latents[task.primary] for e in ex.values()])
    for r in range(4):
        table = {}
        for t, lab in zip(tup.tolist(), labels[:, r].tolist()):
            assert table.setdefault(t, lab) == lab  # a function of the secret bits, in both splits
        for v in (0, 1):  # each class twice among the four tuples of each value of the variable
            tuples = {t for t, x in zip(tup.tolist(), xor.tolist()) if x == v}
            assert sorted(table[t] for t in tuples) == [0, 0, 1, 1]


def test_projection_keeps_the_ridge_fit_when_it_spans_the_train_rows():
    """PCA onto the span of the train rows leaves a ridge classifier's predictions unchanged."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 50, generator=gen) @ torch.randn(50, 600, generator=gen)  # (N, F) rank 50
    x_test = torch.randn(80, 50, generator=gen) @ torch.randn(50, 600, generator=gen)
    y = F.one_hot(torch.randint(0, 3, (200,), generator=gen), 3).double()
    full = probe_module.Projection(x, None, 0)
    small = probe_module.Projection(x, 256, 0)
    assert small.describe()["method"] == "pca" and small.describe()["exact"]
    (p_full,), = probe_module.ridge_paths(full(x), y, [0.1], full(x_test), scale=full.feature_var * 200)
    (p_small,), = probe_module.ridge_paths(small(x), y, [0.1], small(x_test), scale=small.feature_var * 200)
    assert torch.allclose(p_full, p_small, atol=1e-6)


# ---- SAE ----------------------------------------------------------------------------------

SAE = _technique("sae", "SAE")
FAST_SAE = {"n_train": 512, "n_test": 256, "steps": 60}


def test_sae_scores_a_variable_held_at_an_intermediate_site(task):
    r = SAE(**FAST_SAE)(_planted(task, "mid"), task, 0)
    _ok(r, 256)
    assert r.metrics["site"] == "mid" and r.metrics["sae_seeds"] == [1000, 1001, 1002]
    assert r.score > 0.8
    assert r.metrics["excluded_sites"] == ["deep", "embed"]


def test_sae_ignores_a_variable_held_only_at_the_readout_input(task):
    deep = SAE(**FAST_SAE)(_planted(task, "deep"), task, 0)
    _ok(deep)
    assert deep.metrics["site"] == "mid" and deep.score < 0.3
    none = SAE(**FAST_SAE)(_planted(task, "none"), task, 0)
    assert abs(deep.score - none.score) < 0.1  # no better than a model that ignores its input


def test_sae_seeds_are_its_own_and_averaged(task):
    model = _planted(task, "mid")
    a = SAE(**FAST_SAE)(model, task, 1)
    assert a.metrics["sae_seeds"] == [1010, 1011, 1012]
    one = SAE(**FAST_SAE, n_sae_seeds=1)(model, task, 1)
    assert one.metrics["sae_seeds"] == [1010] and one.metrics["score_sd_over_sae_seeds"] == 0.0


def test_sae_projects_wide_sites_and_splices_back(task):
    r = SAE(**FAST_SAE, width=4)(_planted(task, "mid"), task, 0)
    _ok(r)
    assert r.metrics["projection"]["method"] == "pca" and r.metrics["projection"]["out_width"] == 4
    assert r.score > 0.8  # the variable's two directions are the top principal components


# ---- CKA ----------------------------------------------------------------------------------

CKA = _technique("cka", "CKA")
cka_module = importlib.import_module("archbench.techniques.cka")


def test_debiased_cka_is_about_zero_for_independent_wide_representations():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 2000, generator=gen), torch.randn(64, 2000, generator=gen)
    assert cka_module.linear_cka(x, y) > 0.9  # the biased estimator: width >> n
    assert abs(cka_module.debiased_cka(x, y)) < 0.05
    assert cka_module.debiased_cka(x, x @ torch.linalg.qr(torch.randn(2000, 2000, generator=gen))[0]) \
        == pytest.approx(1.0, abs=1e-9)


def test_debiased_cka_leave_one_out_values_match_brute_force():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = x[:, :3] + torch.randn(40, 3, generator=gen, dtype=torch.float64)
    theta, loo = cka_module.debiased_cka(x, y, loo=True)
    brute = [cka_module.debiased_cka(torch.cat([x[:i], x[i + 1:]]), torch.cat([y[:i], y[i + 1:]]))
             for i in (0, 13, 39)]
    assert loo[[0, 13, 39]].tolist() == pytest.approx(brute, abs=1e-9)


def test_cka_scores_an_intermediate_site_and_never_the_readout_input(task):
    mid = CKA(n_test=256, n_select=256)(_planted(task, "mid"), task, 0)
    _ok(mid, 256)
    assert mid.metrics["best_site"] == "mid" and mid.score > 0.8
    assert mid.metrics["excluded_sites"] == ["deep", "embed"] and len(mid.metrics["gram"]) == 64 * 65 // 2
    deep = CKA(n_test=256, n_select=256)(_planted(task, "deep"), task, 0)
    _ok(deep)
    assert deep.metrics["deepest_site_cka"] > 0.9 and deep.score < 0.1


def test_cka_random_init_transformer_is_near_zero(task):
    from archbench.adapters.transformer import TransformerAdapter

    r = CKA(n_test=256, n_select=256)(TransformerAdapter.for_task(task, 0), task, 0)
    _ok(r)
    assert r.score < 0.15


def test_debiased_cka_ignores_a_huge_constant_feature():
    """Recurrent states can hold -1e38 sentinels; CKA is shift-invariant, so they must not matter."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    y = x[:, :2] + 0.5 * torch.randn(60, 2, generator=gen, dtype=torch.float64)
    with_sentinel = torch.cat([x, torch.full((60, 1), -1e38, dtype=torch.float64)], 1)
    assert cka_module.debiased_cka(with_sentinel, y) == pytest.approx(cka_module.debiased_cka(x, y), abs=1e-9)

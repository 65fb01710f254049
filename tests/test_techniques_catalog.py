"""Known-answer tests for the technique catalog on hand-built models.

`Chain` solves modular addition by construction, with named components:
- `blocks.0.attn.out` (mixer) holds a one-hot of (a + b) mod p at the last position,
- `blocks.0.mlp.out` and `blocks.1.mlp.out` (mlp) are small noise nothing needs,
- `blocks.0.resid_post` (stream) = (attn + mlp0) @ R, with R the identity or a fixed rotation,
- `blocks.1.resid_post` (stream) = resid0 @ R^T + mlp1, read by `decode` (10 x + a tie-break).
So the answer is carried by one known component, and by one known direction per value in
the intermediate stream (in the token basis when R = I, rotated otherwise). With
`ignore=True` the mixer outputs zeros: the model ignores its input.

`LinearCount` is a differentiable model for the count task whose output depends only on
the positions holding `a` (the task's relevant positions), or with `wrong=True` only on the
positions holding `b`.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from archbench.adapter import Adapter, Site, hook
from archbench.hooks import HookPoint
from archbench.tasks.count import Count
from archbench.tasks.modadd import ModAdd

torch.set_num_threads(1)
D = ("batch", "pos", "d")


def _technique(module: str, cls: str):
    return getattr(importlib.import_module(f"archbench.techniques.{module}"), cls)


Ablation = _technique("ablation", "Ablation")
Attribution = _technique("attribution", "Attribution")
LogitLens = _technique("logit_lens", "LogitLens")
TunedLens = _technique("tuned_lens", "TunedLens")
Steering = _technique("steering", "Steering")
SAE = _technique("sae", "SAE")
CKA = _technique("cka", "CKA")
cka_module = importlib.import_module("archbench.techniques.cka")


class _ChainModel(nn.Module):
    def __init__(self, vocab: int, ignore: bool, rotate: bool):
        super().__init__()
        self.vocab, self.p, self.ignore = vocab, vocab - 1, ignore
        gen = torch.Generator().manual_seed(1)
        rot = torch.linalg.qr(torch.randn(vocab, vocab, generator=gen))[0] if rotate else torch.eye(vocab)
        self.register_buffer("rot", rot)  # (V, V) orthogonal
        self.register_buffer("tiebreak", torch.linspace(0.1, 0.0, vocab))  # (V,)
        self.embed, self.attn, self.mlp0 = HookPoint(), HookPoint(), HookPoint()
        self.res0, self.mlp1, self.res1 = HookPoint(), HookPoint(), HookPoint()

    def decode(self, x):
        return 10.0 * x + self.tiebreak  # (B, T, V)

    def forward(self, tokens):
        B, T = tokens.shape
        e = self.embed(F.one_hot(tokens, self.vocab).float())  # (B, T, V)
        h = torch.zeros(B, T, self.vocab)  # (B, T, V)
        if not self.ignore:
            h[:, -1] = F.one_hot((tokens[:, 0] + tokens[:, 1]) % self.p, self.vocab).float()
        h = self.attn(h + 0 * e)  # (B, T, V)
        r0 = self.res0((h + self.mlp0(0.01 * torch.randn(B, T, self.vocab))) @ self.rot)  # (B, T, V)
        r1 = self.res1(r0 @ self.rot.T + self.mlp1(0.01 * torch.randn(B, T, self.vocab)))  # (B, T, V)
        return self.decode(r1)


class Chain(Adapter):
    family = "chain"
    capabilities = frozenset({"readout"})
    default_config = {"ignore": False, "rotate": False}

    @classmethod
    def build_model(cls, config):
        return _ChainModel(config["vocab_size"], config["ignore"], config["rotate"])

    def forward(self, tokens):
        return self.model(tokens)

    def decode(self, stream):
        return self.model.decode(stream)

    def hooks(self):
        m = self.model
        return [hook("embed", "embed", D, 0, Site(m.embed)), hook("blocks.0.attn.out", "mixer", D, 0, Site(m.attn)),
                hook("blocks.0.mlp.out", "mlp", D, 0, Site(m.mlp0)), hook("blocks.0.resid_post", "stream", D, 1, Site(m.res0)),
                hook("blocks.1.mlp.out", "mlp", D, 1, Site(m.mlp1)), hook("blocks.1.resid_post", "stream", D, 2, Site(m.res1))]


class NoReadoutChain(Chain):
    family = "chain-no-readout"
    capabilities = frozenset()


class _LinearCountModel(nn.Module):
    def __init__(self, vocab: int, wrong: bool):
        super().__init__()
        self.vocab, self.channel = vocab, 1 if wrong else Count.A
        self.embed = HookPoint()
        self.register_buffer("u", torch.linspace(1.0, 2.0, vocab))  # (V,) all positive

    def forward(self, tokens):
        e = self.embed(F.one_hot(tokens, self.vocab).float())  # (B, T, V)
        z = e[..., self.channel].sum(1)  # (B,) differentiable count
        logits = z[:, None] * self.u + torch.linspace(0.1, 0.0, self.vocab)  # (B, V)
        return logits[:, None].expand(-1, tokens.shape[1], -1)  # (B, T, V)


class LinearCount(Adapter):
    family = "linear-count"
    capabilities = frozenset({"gradients"})
    default_config = {"wrong": False}

    @classmethod
    def build_model(cls, config):
        return _LinearCountModel(config["vocab_size"], config["wrong"])

    def forward(self, tokens):
        return self.model(tokens)

    def hooks(self):
        return [hook("embed", "embed", D, 0, Site(self.model.embed))]


class NoGradLinearCount(LinearCount):
    family = "linear-count-nograd"
    capabilities = frozenset()


@pytest.fixture(scope="module")
def task():
    return ModAdd(p=23)


def _ok(result, n=None):
    assert result.applicable and isinstance(result.score, float) and 0.0 <= result.score <= 1.0
    if n is not None:
        assert len(result.per_example) == n
    mean = sum(result.per_example) / len(result.per_example)
    assert result.score == pytest.approx(min(1.0, max(0.0, mean)), abs=1e-6)


def _chain(task, **kw):
    torch.manual_seed(0)
    return Chain.for_task(task, 0, **kw)


def test_ablation_ranks_the_answer_component_first(task):
    r = Ablation(n_train=256, n_test=256)(_chain(task), task, 0)
    _ok(r, 256)
    assert r.metrics["order"][0] == "blocks.0.attn.out"
    assert r.metrics["curve_kept"] == [1, 2, 3]
    assert r.metrics["accuracy_clean"] == 1.0 and r.metrics["accuracy_all_ablated"] < 0.1
    assert r.score == pytest.approx(1.0, abs=1e-6)  # one component of three does it all
    assert r.metrics["area_ranked"] == 1.0 and r.metrics["area_random"] < 0.75
    eff = {d["site"]: d for d in r.details}
    for kind in ("zero_effect", "mean_effect", "resample_effect"):
        assert eff["blocks.0.attn.out"][kind] > 0.85 and abs(eff["blocks.0.mlp.out"][kind]) < 0.02
    ignore = Ablation(n_train=256, n_test=256)(_chain(task, ignore=True), task, 0)
    _ok(ignore)
    assert ignore.score < 0.05


def test_attribution_auroc_on_a_model_that_reads_only_the_relevant_positions():
    task = Count()
    for adapter_cls in (LinearCount, NoGradLinearCount):
        good = Attribution(n_examples=128, n_steps=8)(adapter_cls.for_task(task, 0), task, 0)
        _ok(good)
        assert good.score == pytest.approx(1.0)
        assert good.metrics["constant_positions"] == [task.seq_len - 1]  # the query token
        wrong = Attribution(n_examples=128, n_steps=8)(adapter_cls.for_task(task, 0, wrong=True), task, 0)
        assert wrong.score < 0.3
        # reading only irrelevant positions is below chance: raw AUROC < 0.5, negative per example
        assert wrong.metrics["auroc"] < 0.5 and wrong.score == 0.0 and min(wrong.per_example) < 0
    assert good.metrics["method"] == "feature_ablation"


def test_attribution_auroc_helpers():
    auroc_rows = _technique("attribution", "auroc_rows")
    auroc = _technique("attribution", "auroc")
    s = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    lab = torch.tensor([[True, False, True], [True, False, False]])
    assert auroc_rows(s, lab).tolist() == [1.0, 0.5]
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])) == 0.75


def test_logit_lens_reads_the_answer_only_in_the_token_basis(task):
    plain = LogitLens(n_test=256)(_chain(task), task, 0)
    _ok(plain, 256)
    assert plain.score == 1.0 and plain.metrics["first_decodable_layer"] == 1
    rotated = LogitLens(n_test=256)(_chain(task, rotate=True), task, 0)
    assert rotated.score < 0.2 and rotated.metrics["first_decodable_layer"] == 2
    ignore = LogitLens(n_test=256)(_chain(task, ignore=True), task, 0)
    assert ignore.score < 0.1
    assert not LogitLens()(NoReadoutChain.for_task(task, 0), task, 0).applicable


def test_tuned_lens_undoes_the_rotation(task):
    for cls in (Chain, NoReadoutChain):
        torch.manual_seed(0)
        r = TunedLens(n_train=1024, n_test=256)(cls.for_task(task, 0, rotate=True), task, 0)
        _ok(r, 256)
        assert r.score > 0.95
    assert r.metrics["translator_target"] == "final logits"
    ignore = TunedLens(n_train=1024, n_test=256)(_chain(task, ignore=True), task, 0)
    assert ignore.score < 0.1


def test_steering_moves_the_answer_along_the_difference_of_means(task):
    r = Steering(n_train=1024, n_pairs=128)(_chain(task, rotate=True), task, 0)
    _ok(r, 128)
    assert r.score > 0.95 and r.metrics["best_site"] == "blocks.0.resid_post"
    assert all(d["trivial"] for d in r.details if d["site"] == "blocks.1.resid_post")
    ignore = Steering(n_train=1024, n_pairs=128)(_chain(task, ignore=True), task, 0)
    _ok(ignore)
    assert ignore.score < 0.15


def test_sae_finds_one_latent_per_value(task):
    r = SAE(n_train=1024, n_test=512, steps=100)(_chain(task, rotate=True), task, 0)
    _ok(r, 512)
    assert r.metrics["site"] == "blocks.0.resid_post"
    assert r.score > 0.8 and r.metrics["variance_explained"] > 0.9
    assert r.metrics["accuracy_spliced"] > 0.9
    ignore = SAE(n_train=1024, n_test=512, steps=100)(_chain(task, ignore=True), task, 0)
    _ok(ignore)
    assert ignore.score < 0.15


def test_cka_with_the_ground_truth_and_across_models(task):
    r = CKA(n_test=256)(_chain(task, rotate=True), task, 0)
    _ok(r, 256)
    assert r.score > 0.95 and r.metrics["best_site"] == "blocks.0.resid_post"
    ignore = CKA(n_test=256)(_chain(task, ignore=True), task, 0)
    _ok(ignore)
    assert ignore.score < 0.2
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    theta, loo = cka_module.linear_cka(x, y, loo=True)
    brute = [cka_module.linear_cka(torch.cat([x[:i], x[i + 1:]]), torch.cat([y[:i], y[i + 1:]]))
             for i in (0, 17, 63)]
    assert loo[[0, 17, 63]].tolist() == pytest.approx(brute, abs=1e-9)
    df = cka_module.cka_matrix({"plain": _chain(task), "rotated": _chain(task, rotate=True)}, task, 0, n=128)
    pair = df[(df.arch_a == "plain") & (df.arch_b == "rotated") & (df.site_a == df.site_b)
              & (df.site_a == "blocks.0.resid_post")]
    assert pair.cka.item() > 0.95  # CKA is rotation-invariant
    assert set(df.arch_a) == {"task", "plain", "rotated"}


def test_every_technique_runs_on_a_random_init_transformer(task):
    from archbench.adapters.transformer import TransformerAdapter

    model = TransformerAdapter.for_task(task, 0)
    small = {Ablation: {"n_train": 128, "n_test": 128}, LogitLens: {"n_test": 128},
             TunedLens: {"n_train": 256, "n_test": 128}, Steering: {"n_train": 256, "n_pairs": 64},
             SAE: {"n_train": 256, "n_test": 128, "steps": 20}, CKA: {"n_test": 128}}
    for cls, cfg in small.items():
        _ok(cls(**cfg)(model, task, 0))
    assert not Attribution()(model, task, 0).applicable  # modadd: only a and b vary, both relevant


def test_stored_grams_give_exact_cross_architecture_cka():
    """The report's arch x arch CKA comes from stored Grams; it must equal CKA on activations."""
    from archbench.techniques.cka import cka_from_packed, linear_cka, normalised_gram, pack_gram

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=gen)  # (n, F) one model's activations
    y = x @ torch.randn(7, 5, generator=gen) + 0.5 * torch.randn(40, 5, generator=gen)  # (n, G)
    packed = [pack_gram(normalised_gram(a)) for a in (x, y)]
    assert abs(cka_from_packed(*packed, n=40) - linear_cka(x, y)) < 1e-5
    assert abs(cka_from_packed(packed[0], packed[0], n=40) - 1.0) < 1e-5


def test_report_similarity_table_uses_the_stored_grams():
    import pandas as pd

    from archbench.techniques.cka_similarity import similarity
    from archbench.techniques.cka import linear_cka, normalised_gram, pack_gram

    gen = torch.Generator().manual_seed(1)
    acts = {"transformer": torch.randn(16, 4, generator=gen), "mamba": torch.randn(16, 6, generator=gen)}
    rows = [{"technique": "cka", "status": "ok", "control": False, "task": "modadd", "seed": 0, "arch": a,
             "score": 0.5, "metrics": {"gram": pack_gram(normalised_gram(x)), "gram_n": 16}}
            for a, x in acts.items()]
    table = similarity(pd.DataFrame(rows), "transformer")
    exact = table.extra["exact"].set_index(["arch_a", "arch_b"]).cka
    assert abs(exact["transformer", "mamba"] - linear_cka(acts["transformer"], acts["mamba"])) < 1e-4
    assert abs(exact["mamba", "mamba"] - 1.0) < 1e-4

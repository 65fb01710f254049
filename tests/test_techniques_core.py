"""Known-answer tests for the core techniques (probe, patching) on hand-built models.

`HandBuilt` solves modular addition by construction: its embed site is the one-hot input,
its block-0 stream is input-independent noise that nothing reads, and its block-1 stream
holds a one-hot of (a + b) mod p at the last position only, computed from the embed site;
the logits read the block-1 stream. So the sum lives at (blocks.1.out, last position) and
(through the input) at (embed, position of a); nowhere else. With `ignore=True` the model
ignores its input altogether.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from archbench.adapter import Adapter, Site, hook
from archbench.hooks import HookPoint
from archbench.tasks.modadd import ModAdd

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _load(module: str, path: str):
    """`archbench.<module>` when archbench is installed, else the file itself."""
    try:
        return importlib.import_module(f"archbench.{module}")
    except ImportError:
        spec = importlib.util.spec_from_file_location(f"_core_{module.replace('.', '_')}", ROOT / path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


Probe = _load("techniques.probe", "techniques/probe.py").Probe
Patching = _load("techniques.patching", "techniques/patching.py").Patching
TransformerAdapter = _load("adapters.transformer", "adapters/transformer.py").TransformerAdapter

D = ("batch", "pos", "d")
FAST_PROBE = {"n_train": 512, "n_test": 256}


class _SumModel(nn.Module):
    def __init__(self, vocab_size: int, ignore: bool):
        super().__init__()
        self.vocab, self.p, self.ignore = vocab_size, vocab_size - 1, ignore
        self.hook_embed, self.hook_s0, self.hook_s1 = HookPoint(), HookPoint(), HookPoint()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        e = self.hook_embed(F.one_hot(tokens, self.vocab).float())  # (B, T, V)
        self.hook_s0(torch.randn(B, T, self.vocab))  # (B, T, V) noise, read by nothing
        s1 = torch.zeros(B, T, self.vocab)  # (B, T, V)
        if not self.ignore:
            total = (e[:, 0].argmax(-1) + e[:, 1].argmax(-1)) % self.p  # (B,)
            s1[:, -1] = F.one_hot(total, self.vocab).float()
        s1 = self.hook_s1(s1)  # (B, T, V)
        return 10.0 * s1 + torch.linspace(0.1, 0.0, self.vocab)  # (B, T, V) ties go to token 0


class HandBuilt(Adapter):
    family = "handbuilt"
    default_config = {"ignore": False}

    @classmethod
    def build_model(cls, config):
        return _SumModel(config["vocab_size"], config["ignore"])

    def forward(self, tokens):
        return self.model(tokens)

    def hooks(self):
        m = self.model
        return [hook("embed", "embed", D, 0, Site(m.hook_embed)), hook("blocks.0.out", "stream", D, 1, Site(m.hook_s0)),
                hook("blocks.1.out", "stream", D, 2, Site(m.hook_s1))]


class HalfNullModAdd(ModAdd):
    """ModAdd whose even counterfactual pairs expect the base answer (so must be dropped)."""

    def interchange(self, base, source):
        expected = self.rule(source).clone()  # (n,)
        expected[::2] = self.rule(base)[::2]
        return expected


@pytest.fixture(scope="module")
def task():
    return ModAdd(p=23)


def _by_site(result, key):
    return {d["site"]: d[key] for d in result.details}


def _in_unit(result):
    assert result.applicable and isinstance(result.score, float) and 0.0 <= result.score <= 1.0


def test_probe_reports_but_never_scores_the_readout_input(task):
    """HandBuilt holds the sum only at its deepest stream (the readout's input): score ~0."""
    torch.manual_seed(0)
    r = Probe(**FAST_PROBE)(HandBuilt.for_task(task, 0), task, 0)
    _in_unit(r)
    norm, scored = _by_site(r, "normalised"), _by_site(r, "scored")
    assert norm["blocks.1.out"] > 0.97 and not scored["blocks.1.out"] and not scored["embed"]
    assert abs(norm["blocks.0.out"]) < 0.1  # noise nothing reads
    assert r.metrics["best_site"] == "blocks.0.out" and r.metrics["excluded_sites"] == ["blocks.1.out", "embed"]
    assert r.score < 0.1
    assert len(r.per_example) == FAST_PROBE["n_test"]
    assert sum(r.per_example) / len(r.per_example) == pytest.approx(_by_site(r, "selectivity")["blocks.0.out"])
    assert 0 <= r.metrics["majority_baseline"] < 0.2


def test_probe_counts_unseen_test_labels_as_errors(task):
    class Relabelled(ModAdd):
        def sample(self, n, seed, split="train"):
            ex = super().sample(n, seed, split)
            if split == "test":
                ex.latents["sum"][::2] = 99  # a class the train split never shows
            return ex

    torch.manual_seed(0)
    r = Probe(**FAST_PROBE)(HandBuilt.for_task(task, 0), Relabelled(p=23), 0)
    assert _by_site(r, "accuracy")["blocks.1.out"] == pytest.approx(0.5, abs=0.01)


def test_patching_localises_the_sum(task):
    torch.manual_seed(0)
    r = Patching(n_pairs=128)(HandBuilt.for_task(task, 0), task, 0)
    _in_unit(r)
    iia = {(d["site"], d["position"]): d["iia"] for d in r.details}
    assert len(iia) == 3 * (task.seq_len + 1)  # every position, and the one each pair changed
    assert iia[("blocks.1.out", 2)] == 1.0 and iia[("embed", 0)] == 1.0  # a's input, the answer site
    assert iia[("embed", "aligned")] == 1.0  # modadd changes a: aligned is position 0 for every pair
    assert iia[("embed", 1)] == 0.0 and iia[("embed", 2)] == 0.0  # b and "=" do not differ
    assert iia[("blocks.1.out", 0)] == 0.0 and iia[("blocks.1.out", 1)] == 0.0
    assert max(iia[("blocks.0.out", p)] for p in (0, 1, 2, "aligned")) == 0.0  # noise nothing reads
    # The causal cells are trivial (the input itself, the readout's own input) and every other
    # cell is no better than the embedding at its position, so nothing intermediate carries the
    # sum and the score is 0: patching scores localisation, not accuracy.
    why = {(d["site"], d["position"]): d["trivial_reason"] for d in r.details}
    assert {k for k, v in why.items() if v == "input embedding"} == {("embed", p) for p in (0, 1, 2, "aligned")}
    assert {k for k, v in why.items() if v == "readout input"} == {("blocks.1.out", 2)}
    assert all(d["trivial"] for d in r.details) and r.metrics["best_site"] is None
    assert r.score == 0.0 and len(r.per_example) == 128
    assert r.metrics["n_pairs_used"] == 128 and r.metrics["last_stream_last_position_iia"] == 1.0


def test_patching_at_the_answer_position_is_the_full_sweep_s_cells_there(task):
    """positions="answer" (a checkpoint's row) patches the answer position and the aligned one
    only, and each of those cells has exactly the IIA the full sweep gives it."""
    torch.manual_seed(0)
    full = Patching(n_pairs=64)(HandBuilt.for_task(task, 0), task, 0)
    torch.manual_seed(0)
    answer = Patching(n_pairs=64, positions="answer")(HandBuilt.for_task(task, 0), task, 0)
    last = task.seq_len - 1
    cells = {(d["site"], d["position"]): (d["iia"], d["trivial_reason"]) for d in answer.details}
    assert set(cells) == {(site, pos) for site in ("embed", "blocks.0.out", "blocks.1.out") for pos in (last, "aligned")}
    assert cells == {k: v for k, v in {(d["site"], d["position"]): (d["iia"], d["trivial_reason"])
                                       for d in full.details}.items() if k in cells}
    assert answer.metrics["last_stream_last_position_iia"] == full.metrics["last_stream_last_position_iia"] == 1.0
    assert answer.metrics["embed_iia_aligned"] == full.metrics["embed_iia_aligned"] == 1.0
    with pytest.raises(ValueError, match="positions='every'"):
        Patching(n_pairs=8, positions="every")(HandBuilt.for_task(task, 0), task, 0)


def test_a_checkpoint_row_runs_each_technique_at_its_checkpoint_sizes():
    assert Patching.for_arch("hf:smol").config == {**Patching.default_config, **Patching.checkpoint_config}
    assert Patching.for_arch("transformer").config == Patching.default_config
    assert "positions" not in Patching.default_config  # the synthetic cells keep their stored identity


def test_patching_drops_pairs_that_cannot_show_an_effect():
    torch.manual_seed(0)
    task = HalfNullModAdd(p=23)
    r = Patching(n_pairs=64)(HandBuilt.for_task(task, 0), task, 0)
    assert r.metrics["n_pairs_used"] == 32 and len(r.per_example) == 32


def test_a_model_that_ignores_its_input_scores_about_zero(task):
    torch.manual_seed(0)
    model = HandBuilt.for_task(task, 0, ignore=True)
    probe, patch = Probe(**FAST_PROBE)(model, task, 0), Patching(n_pairs=128)(model, task, 0)
    _in_unit(probe)
    _in_unit(patch)
    assert probe.score < 0.1
    assert patch.score < 0.15  # only pairs whose expected answer is the constant prediction


def test_transformer_random_init_end_to_end(task):
    model = TransformerAdapter.for_task(task, 0)
    probe = Probe(**FAST_PROBE)(model, task, 0)
    _in_unit(probe)
    assert {d["role"] for d in probe.details} == {"embed", "stream"}
    assert len(probe.details) == 1 + model.config["n_layers"]
    patch = Patching(n_pairs=64)(model, task, 0)
    _in_unit(patch)
    assert len(patch.details) == (1 + model.config["n_layers"]) * (task.seq_len + 1)  # + aligned


def test_probe_on_a_per_position_latent():
    from archbench.tasks.count import Count

    task = Count()
    model = TransformerAdapter.for_task(task, 0)
    r = Probe(n_train=128, n_test=64)(model, task, 0)
    _in_unit(r)
    assert len(r.per_example) == 64  # one value per test example, averaged over positions


def test_probe_standardisation_survives_huge_sentinel_features():
    """Recurrent states can hold -1e38 sentinels (RWKV's running max); float32 sums overflow."""
    from archbench.techniques.probe import Projection, ridge_paths

    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=gen)  # (N,)
    signal = y.float()[:, None] + 0.1 * torch.randn(256, 1, generator=gen)  # (N, 1)
    sentinel = torch.full((256, 3), -1e38)  # (N, 3) constant huge values
    x = torch.cat([signal, sentinel], 1)  # (N, 4)
    proj = Projection(x, None, 0)
    (pred,), = ridge_paths(proj(x), F.one_hot(y, 2).double(), [1e-3], proj(x))  # (N, 2)
    assert (pred.argmax(-1) == y).float().mean() > 0.95

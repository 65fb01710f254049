"""Known-answer tests for the behavioural scores (logit lens, tuned lens, steering, patching).

The scores decide among the task's answer tokens and are chance-corrected, so a model that
knows nothing scores ~0 on a binary task, not 0.5. `Bits` is a hand-built parity model
(secret bits i < j < l; partial_xor p = t_i ^ t_j is the primary variable, the answer is
p ^ t_l) with two streams:
- `blocks.0.out` (layer 1): the one-hot input (dims 0..2) plus, at position `where` (the
  last position or j), p written as +-1 along dim 3;
- `blocks.1.out` (layer 2, the readout's input): one-hot of the answer at the last position.
`read` says how block 1 gets p: "v" from dim 3 of block 0 at `where` (the planted site),
"bits" from block 0's copies of bits i and j (so dim 3 is written but unused), "none"
(the model always answers 0: a constant guess). `fragile` flips the answer whenever block
0's last position is moved by more than 0.25 in any direction; `early` also writes the
answer one-hot into block 0's last position, where the logit lens can read it.

`Subjects` solves facts at the last subject token: block 0 holds a one-hot of the subject
(looked up from both name tokens) at position 2 only, and block 1 reads it there.
"""

from __future__ import annotations

import importlib

import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from archbench.adapter import Adapter, Site, hook
from archbench.hooks import HookPoint
from archbench.tasks.facts import Facts
from archbench.tasks.parity import Parity

torch.set_num_threads(1)
D = ("batch", "pos", "d")
WIDTH = 16


def _technique(module: str, cls: str):
    return getattr(importlib.import_module(f"archbench.techniques.{module}"), cls)


LogitLens = _technique("logit_lens", "LogitLens")
TunedLens = _technique("tuned_lens", "TunedLens")
Steering = _technique("steering", "Steering")
Patching = _technique("patching", "Patching")


class _BitsModel(nn.Module):
    def __init__(self, secret, read: str, where: str, fragile: bool, early: bool):
        super().__init__()
        self.i, self.j, self.l = secret
        self.read, self.where, self.fragile, self.early = read, where, fragile, early
        self.hook_embed, self.hook_s0, self.hook_s1 = HookPoint(), HookPoint(), HookPoint()

    def decode(self, x):
        return 10.0 * x[..., :3] + torch.tensor([0.1, 0.05, 0.0])  # (B, T, 3) ties go to token 0

    def _block0(self, e):
        """(B, T, W) one-hot input -> (B, T, W) block-0 stream."""
        bits = e[..., 1].round().long()  # (B, T)
        p = bits[:, self.i] ^ bits[:, self.j]  # (B,)
        s0 = e.clone()
        at = -1 if self.where == "last" else self.j
        s0[:, at, 3] = 2.0 * p - 1.0
        if self.early:
            s0[:, -1, :2] += F.one_hot(p ^ bits[:, self.l], 2).float()
        return s0

    def forward(self, tokens):
        B, T = tokens.shape
        e = self.hook_embed(F.one_hot(tokens, WIDTH).float())  # (B, T, W)
        s0 = self.hook_s0(self._block0(e))  # (B, T, W)
        if self.read == "v":
            p = (s0[:, -1 if self.where == "last" else self.j, 3] > 0).long()  # (B,)
        else:
            p = s0[:, self.i, 1].round().long() ^ s0[:, self.j, 1].round().long()  # (B,)
        answer = p ^ s0[:, self.l, 1].round().long()  # (B,)
        if self.fragile:
            moved = (s0[:, -1] - self._block0(F.one_hot(tokens, WIDTH).float())[:, -1]).norm(dim=-1)  # (B,)
            answer = answer ^ (moved > 0.25).long()
        if self.read == "none":
            answer = torch.zeros_like(answer)
        s1 = torch.zeros(B, T, WIDTH)  # (B, T, W)
        s1[:, -1] = F.one_hot(answer, WIDTH).float()
        return self.decode(self.hook_s1(s1))  # (B, T, 3)


class Bits(Adapter):
    family = "bits"
    capabilities = frozenset({"readout"})
    default_config = {"secret": (1, 4, 6), "read": "v", "where": "last", "fragile": False, "early": False}

    @classmethod
    def build_model(cls, config):
        return _BitsModel(config["secret"], config["read"], config["where"], config["fragile"], config["early"])

    def forward(self, tokens):
        return self.model(tokens)

    def decode(self, stream):
        return self.model.decode(stream)

    def hooks(self):
        m = self.model
        return [hook("embed", "embed", D, 0, Site(m.hook_embed)), hook("blocks.0.out", "stream", D, 1, Site(m.hook_s0)),
                hook("blocks.1.out", "stream", D, 2, Site(m.hook_s1))]


@pytest.fixture(scope="module")
def parity():
    return Parity(n_bits=8, secret=(1, 4, 6))


def _bits(task, **kw):
    return Bits.for_task(task, 0, secret=task.secret, **kw)


def _consistent(r, n=None):
    """Applicable, score in [0, 1], and the score is the clipped mean of per_example."""
    assert r.applicable and 0.0 <= r.score <= 1.0
    if n is not None:
        assert len(r.per_example) == n
    mean = sum(r.per_example) / len(r.per_example)
    assert r.score == pytest.approx(min(1.0, max(0.0, mean)), abs=1e-9)
    return mean


def _cells(result, key):
    return {(d["site"], d.get("position", d.get("scale"))): d[key] for d in result.details}


# --- lenses ------------------------------------------------------------------------------

@pytest.mark.parametrize("lens", [LogitLens(n_test=256), TunedLens(n_train=512, n_test=256)])
def test_a_constant_guess_scores_zero_on_a_binary_task(parity, lens):
    r = lens(_bits(parity, read="none"), parity, 0)
    mean = _consistent(r, 256)
    assert r.score < 1e-9 and mean < 1e-9  # raw top-1 scored ~0.5 here
    assert 0.45 < r.metrics["accuracy"] <= r.metrics["chance"] < 0.6  # the raw rate sits at chance
    assert r.metrics["model_accuracy"] == r.metrics["accuracy"]


def test_logit_lens_scores_only_the_answer_written_in_the_readout_basis(parity):
    early = LogitLens(n_test=256)(_bits(parity, early=True), parity, 0)
    _consistent(early, 256)
    assert early.score == 1.0 and early.metrics["first_decodable_layer"] == 1
    # The model is perfect, but block 0 holds only p (not an answer token) at the last
    # position: a lens that read the readout or the model's accuracy would score 1 here.
    late = LogitLens(n_test=256)(_bits(parity), parity, 0)
    assert late.metrics["model_accuracy"] == 1.0
    assert late.score < 1e-9 and late.metrics["first_decodable_layer"] == 2
    norm = {d["site"]: d["normalised"] for d in late.details}
    assert norm["blocks.0.out"] <= 0.0 and norm["blocks.1.out"] == 1.0  # the deepest: reported, unscored


def test_tuned_lens_reads_an_affine_answer_only(parity):
    # Block 0 holds p along dim 3 and the bits as one-hots: the answer p ^ t_l is not affine in them.
    r = TunedLens(n_train=1024, n_test=256)(_bits(parity), parity, 0)
    _consistent(r, 256)
    assert r.score < 0.15
    early = TunedLens(n_train=1024, n_test=256)(_bits(parity, early=True), parity, 0)
    assert early.score == 1.0


# --- steering ----------------------------------------------------------------------------

def test_steering_moves_the_planted_direction(parity):
    r = Steering(n_train=512, n_pairs=128)(_bits(parity), parity, 0)
    _consistent(r, 128)
    assert r.score > 0.9 and r.metrics["best_site"] == "blocks.0.out" and r.metrics["best_scale"] == 1.0
    assert r.metrics["success"] == 1.0 and r.metrics["chance"] < 0.1  # a random push rarely flips p
    assert {d["scale"] for d in r.details} == {0.5, 1.0}


def test_steering_a_constant_guess_scores_zero(parity):
    r = Steering(n_train=512, n_pairs=128)(_bits(parity, read="none"), parity, 0)
    _consistent(r)
    assert r.score == 0.0  # it was ~0.5: `expected` is the constant guess on half the pairs
    assert 40 < r.metrics["n_pairs_used"] < 90 and r.metrics["n_bases_wrong"] == 128 - r.metrics["n_pairs_used"]


def test_steering_subtracts_a_random_push_of_the_same_norm(parity):
    # Any push of block 0 flips this model's answer: raw success is 1 at every scale.
    r = Steering(n_train=512, n_pairs=128)(_bits(parity, read="bits", fragile=True), parity, 0)
    _consistent(r, 128)
    success = _cells(r, "success")
    assert success[("blocks.0.out", 1.0)] == 1.0 and success[("blocks.0.out", 0.5)] == 1.0
    assert r.score == 0.0 and r.metrics["chance"] == 1.0


def test_steering_with_nothing_to_steer_scores_zero():
    class Wrong(Bits):  # answers every base wrong: the logits of tokens 0 and 1 swapped
        def forward(self, tokens):
            return super().forward(tokens)[..., [1, 0, 2]]

    task = Parity(n_bits=8, secret=(1, 4, 6))
    r = Steering(n_train=256, n_pairs=64)(Wrong.for_task(task, 0, secret=task.secret), task, 0)
    assert r.applicable and r.score == 0.0 and r.metrics["nothing_to_steer"] is True
    assert r.per_example == [0.0] * 64 and r.metrics["n_pairs_used"] == 0


# --- patching ----------------------------------------------------------------------------

def test_patching_finds_the_partial_xor_where_it_is_computed(parity):
    i, j, _ = parity.secret
    r = Patching(n_pairs=128)(_bits(parity, where="j"), parity, 0)
    _consistent(r, 128)
    iia, why = _cells(r, "iia"), _cells(r, "trivial_reason")
    # p lives at (block 0, j): every pair changes it there, while the embedding at j changes
    # only for pairs that flip bit j (about half), the cap a fixed-position sweep had.
    assert iia[("blocks.0.out", j)] == 1.0 and 0.3 < iia[("embed", j)] < 0.7
    assert r.metrics["best_site"] == "blocks.0.out" and r.metrics["best_position"] == j
    assert r.score == 1.0 and r.metrics["iia"] == 1.0 and 0.5 <= r.metrics["chance"] < 0.65
    # The aligned patch of the embedding is the whole counterfactual; block 0 at the changed
    # bit does no better (it only hits pairs that flipped j), so it is trivial.
    assert iia[("embed", "aligned")] == 1.0 and iia[("blocks.0.out", "aligned")] == iia[("embed", j)]
    assert why[("blocks.0.out", "aligned")] == "no better than the embedding"
    assert why[("blocks.0.out", i)] == "no better than the embedding"  # bit i's copy is never read
    assert why[("blocks.1.out", parity.seq_len - 1)] == "readout input"
    assert r.metrics["embed_iia_aligned"] == 1.0


def test_patching_at_the_last_position(parity):
    r = Patching(n_pairs=128)(_bits(parity), parity, 0)
    assert r.score == 1.0 and r.metrics["best_position"] == parity.seq_len - 1


@pytest.mark.parametrize("kw", [{"read": "none"}, {"read": "bits"}])
def test_patching_a_constant_or_input_reading_model_scores_zero(parity, kw):
    # "bits": the model reads only copies of its input bits, which are exactly as causal as
    # the embedding at their positions: nothing intermediate carries p.
    r = Patching(n_pairs=128)(_bits(parity, **kw), parity, 0)
    _consistent(r, 128)
    assert r.score == 0.0 and r.metrics["best_site"] is None


class _SubjectsModel(nn.Module):
    def __init__(self, task: Facts):
        super().__init__()
        kb = task.kb()
        self.vocab, self.n = task.vocab_size, len(kb["names"])
        table = torch.full((task.vocab_size, task.vocab_size), -1)  # (V, V) name tokens -> subject
        table[torch.as_tensor(kb["names"][:, 0]), torch.as_tensor(kb["names"][:, 1])] = torch.arange(self.n)
        self.register_buffer("table", table)
        self.register_buffer("attribute", torch.as_tensor(kb["attribute"]))  # (S, R) tokens
        self.relation0 = task.relation0
        self.hook_embed, self.hook_s0, self.hook_s1 = HookPoint(), HookPoint(), HookPoint()

    def forward(self, tokens):
        B, T = tokens.shape
        e = self.hook_embed(F.one_hot(tokens, self.vocab).float())  # (B, T, V)
        tok = e.argmax(-1)  # (B, T)
        subject = self.table[tok[:, 1], tok[:, 2]]  # (B,) -1: no such subject
        s0 = e.clone()
        s0[:, 2] = 0.0
        s0[:, 2, :self.n] = F.one_hot(subject.clamp_min(0), self.n).float() * (subject >= 0)[:, None]
        s0 = self.hook_s0(s0)  # (B, T, V): the subject at the last subject token only
        found = s0[:, 2, :self.n].max(-1)  # (B,)
        answer = self.attribute[found.indices, s0[:, 3].argmax(-1) - self.relation0]  # (B,)
        answer = torch.where(found.values > 0.5, answer, 0)
        s1 = torch.zeros(B, T, self.vocab)
        s1[:, -1] = F.one_hot(answer, self.vocab).float()
        return 10.0 * self.hook_s1(s1) + torch.linspace(0.1, 0.0, self.vocab)  # (B, T, V)


class Subjects(Adapter):
    family = "subjects"

    @classmethod
    def build_model(cls, config):
        return _SubjectsModel(Facts())

    def forward(self, tokens):
        return self.model(tokens)

    def hooks(self):
        m = self.model
        return [hook("embed", "embed", D, 0, Site(m.hook_embed)), hook("blocks.0.out", "stream", D, 1, Site(m.hook_s0)),
                hook("blocks.1.out", "stream", D, 2, Site(m.hook_s1))]


def test_patching_aligns_with_the_changed_name_token():
    task = Facts()
    cf = task.counterfactuals(128, 0, "test")
    last_changed = (cf.base[:, 2] != cf.source[:, 2]).float().mean().item()  # aligned = 2 on these
    assert 0.3 < last_changed < 1.0
    r = Patching(n_pairs=128)(Subjects.for_task(task, 0), task, 0)
    _consistent(r, 128)
    iia, why = _cells(r, "iia"), _cells(r, "trivial_reason")
    assert iia[("blocks.0.out", 2)] == 1.0 and r.metrics["best_position"] == 2
    # Aligned, block 0 holds the source's subject wherever its last name changed, while the
    # embedding there hands over a first-name/last-name mix that names another subject.
    assert iia[("blocks.0.out", "aligned")] == pytest.approx(last_changed)
    assert iia[("embed", "aligned")] < iia[("blocks.0.out", "aligned")] - 0.05
    assert why[("blocks.0.out", "aligned")] == ""
    assert why[("blocks.0.out", 1)] == "no better than the embedding"


# --- random-init controls and the verdict ------------------------------------------------

def test_random_init_transformer_scores_about_zero(parity):
    from archbench.adapters.transformer import TransformerAdapter

    model = TransformerAdapter.for_task(parity, 0)
    for technique in (LogitLens(n_test=256), TunedLens(n_train=512, n_test=256),
                      Steering(n_train=256, n_pairs=128), Patching(n_pairs=128)):
        r = technique(model, parity, 0)
        _consistent(r)
        assert r.score < 0.2, technique.name


def test_signed_per_example_values_reach_the_verdict(parity):
    """Signed per-example values reach the verdict, each cell's mean clipped at chance (0)."""
    from archbench.verdict import verdicts

    rows = []
    for seed in (0, 1, 2):
        for control, kw in ((False, {"early": True}), (True, {"read": "none"})):
            r = LogitLens(n_test=128)(_bits(parity, **kw), parity, seed)
            rows.append({"technique": "logit_lens", "task": "parity", "arch": "transformer", "seed": seed,
                         "control": control, "status": "ok", "reason": None, "score": r.score,
                         "per_example": r.per_example})
    assert min(min(row["per_example"]) for row in rows if row["control"]) < 0  # signed values
    row = verdicts(pd.DataFrame(rows)).set_index("arch").loc["transformer"]
    assert row["effect"] >= 1.0 - 1e-9 and row["verdict"] == "transfers"

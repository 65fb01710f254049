"""Causal tracing on planted models with a known answer, on a trained transformer, and on controls.

`Relay` is a hand-built model for facts_long whose stream (`blocks.{i}.resid_post`, role
stream, depth i + 1) holds the tokens' one-hots (V features) and a subject code (S features).
Block `read_block` reads the three subject positions' one-hots and writes a soft one-hot of
the subject (softmax of how many name tokens match, x beta) at position `write_position`,
overwriting that position's code; the next block copies that code to the last position; the
readout gives each attribute gamma x the code's mass on the subjects with that attribute under
the relation at the last position. Every other block is the identity. So exactly one state at
one position holds the subject once it is read: restoring it recovers the whole effect
(normalised IE 1), restoring any state that nothing reads afterwards recovers exactly 0, and
restoring one subject position's tokens before the read recovers part of it. A tracer that
corrupts the wrong positions, restores the wrong (site, position), mislabels layers or
position kinds, or scores a trivial cell fails these tests.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from archbench import registry
from archbench.adapter import Adapter, Site, hook
from archbench.hooks import HookPoint
from archbench.tasks.facts import Facts
from archbench.tasks.facts_long import FactsLong
from archbench.tasks.modadd import ModAdd
from archbench.techniques.causal_tracing import CausalTracing, position_kinds

torch.set_num_threads(1)
D = ("batch", "pos", "d")
N_BLOCKS = 4
# One-hot embeddings hold their token far above 3 standard deviations of their entries (a match
# count of 3 against 2 survives noise of std 0.44), so the planted models are traced with 8.
PLANTED = {"n_examples": 64, "noise_scale": 8.0}


class _RelayModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.V, self.read_block, self.write = config["vocab_size"], config["read_block"], config["write_position"]
        self.subject = list(config["subject_positions"])
        self.relation0, self.attribute0 = config["relation0"], config["attribute0"]
        self.beta, self.gamma = config["beta"], config["gamma"]
        self.register_buffer("names", torch.tensor(config["names"]))  # (S, n_parts) name token ids
        attribute = torch.tensor(config["attribute"]) - config["attribute0"]  # (S, R) attribute index
        self.register_buffer("table", F.one_hot(attribute, config["n_attributes"]).float())  # (S, R, A)
        self.S, self.R = attribute.shape
        self.embed = HookPoint()
        self.resid = nn.ModuleList(HookPoint() for _ in range(N_BLOCKS))

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()  # (B, T, V + S)
        if i == self.read_block:  # read the subject: how many of its name tokens each position holds
            onehots = x[:, self.subject, :self.V]  # (B, n_parts, V)
            matches = torch.stack([onehots[:, j, self.names[:, j]] for j in range(len(self.subject))],
                                  -1).sum(-1)  # (B, S)
            x[:, self.write, self.V:] = (self.beta * matches).softmax(-1)  # (B, S) overwrite the code
        elif i == self.read_block + 1:  # carry the code to the last position
            x[:, -1, self.V:] = x[:, self.write, self.V:]
        return x

    def forward(self, tokens):
        B, T = tokens.shape
        x = self.embed(F.pad(F.one_hot(tokens, self.V).float(), (0, self.S)))  # (B, T, V + S)
        for i, point in enumerate(self.resid):
            x = point(self.block(i, x))
        last = x[:, -1]  # (B, V + S)
        relation = last[:, self.relation0:self.relation0 + self.R]  # (B, R) the relation's one-hot
        code = last[:, self.V:]  # (B, S)
        attribute = torch.einsum("bs,br,sra->ba", code, relation, self.table)  # (B, A) mass per attribute
        logits = torch.zeros(B, T, self.V)  # (B, T, V)
        logits[:, -1, self.attribute0:self.attribute0 + attribute.shape[1]] = self.gamma * attribute
        return logits


class Relay(Adapter):
    family = "relay"
    default_config = {"read_block": 1, "write_position": 3, "beta": 10.0, "gamma": 10.0}

    @classmethod
    def for_facts(cls, task, **knobs):
        kb = task.kb()
        return cls.build(task.vocab_size, task.seq_len, 0, names=kb["names"].tolist(),
                         attribute=kb["attribute"].tolist(), subject_positions=list(task.subject_positions),
                         relation0=task.relation0, attribute0=task.attribute0, n_attributes=task.n_attributes,
                         **knobs)

    @classmethod
    def build_model(cls, config):
        return _RelayModel(config)

    def forward(self, tokens):
        return self.model(tokens)

    def hooks(self):
        m = self.model
        return [hook("embed", "embed", D, 0, Site(m.embed)),
                *[hook(f"blocks.{i}.resid_post", "stream", D, i + 1, Site(p)) for i, p in enumerate(m.resid)]]


class NoEmbedRelay(Relay):
    family = "relay-no-embed"

    def hooks(self):
        return [h for h in super().hooks() if h.spec.role != "embed"]


@pytest.fixture(scope="module")
def task():
    return FactsLong()


def cell(result, site, position):
    return next(d for d in result.details if d["site"] == site and d["position"] == position)


def test_position_kinds():
    assert position_kinds([1, 2, 3], 6, 7) == ["context", "subject_first", "subject_middle", "subject_last",
                                               "context", "context", "last_token"]
    assert position_kinds([1, 2], 3, 4) == ["context", "subject_first", "subject_last", "last_token"]


@pytest.mark.parametrize("read_block, write_position, kind", [(1, 3, "subject_last"), (0, 1, "subject_first"),
                                                              (2, 2, "subject_middle")])
def test_the_planted_state_is_found(task, read_block, write_position, kind):
    model = Relay.for_facts(task, read_block=read_block, write_position=write_position)
    assert model.accuracy(task.sample(200, 0, "test")) == 1.0
    res = CausalTracing(**PLANTED)(model, task, 0)
    m = res.metrics
    assert m["n_examples_used"] > 40 and m["total_effect"] > 0.3
    assert res.score == pytest.approx(1.0, abs=1e-5)
    assert m["peak_subject_site"] == f"blocks.{read_block}.resid_post" and m["peak_subject_layer"] == read_block + 1
    assert m["peak_subject_position"] == write_position and m["peak_subject_position_kind"] == kind
    assert m["n_layers"] == 4 and m["early_site_fraction"] == pytest.approx(read_block / 3)
    assert len(res.per_example) == m["n_examples_used"]
    assert res.per_example == pytest.approx([1.0] * len(res.per_example), abs=1e-5)
    for d in res.details:
        if d["role"] == "stream" and d["layer"] > read_block + 1 and d["position_kind"].startswith("subject"):
            assert d["ie"] == pytest.approx(0.0, abs=1e-6), d  # nothing reads them after the read
        if d["role"] == "stream" and d["layer"] == read_block + 1 and d["position"] in (1, 2, 3):
            assert d["ie"] == pytest.approx(1.0 if d["position"] == write_position else 0.0, abs=1e-5), d
    # before the read, one subject position's clean tokens recover part of the effect, not all
    if read_block > 0:
        early = [cell(res, "blocks.0.resid_post", p)["ie"] for p in (1, 2, 3)]
        assert all(0.02 < e < 0.9 for e in early), early
    # the code reaches the last position one block after the read (the readout's input is trivial)
    readout = cell(res, "blocks.3.resid_post", 6)
    assert readout["trivial"] and readout["ie"] == pytest.approx(1.0, abs=1e-5)
    if read_block + 2 < 4:
        assert m["last_token_peak_layer"] == read_block + 2 and m["last_token_peak_ie"] == pytest.approx(1.0, abs=1e-5)
    else:
        assert m["last_token_peak_ie"] == pytest.approx(0.0, abs=1e-6)  # only the readout's input holds it
    best_other = max(cell(res, f"blocks.{i}.resid_post", p)["ie"] for i in range(4) for p in (1, 2))
    best_last = max(cell(res, f"blocks.{i}.resid_post", 3)["ie"] for i in range(4))
    assert m["last_subject_vs_other_subject"] == pytest.approx(best_last - best_other)
    assert (m["last_subject_vs_other_subject"] > 0.1) == (write_position == 3)


def test_trivial_cells_and_the_depth_value(task):
    res = CausalTracing(**PLANTED)(Relay.for_facts(task), task, 0)
    embeds = [d for d in res.details if d["site"] == "embed"]
    assert len(embeds) == 7 and all(d["trivial"] and d["layer"] == 0 and d["subject_ie"] is None for d in embeds)
    for d in embeds:
        if d["position_kind"] in ("context", "last_token"):  # no noise there: restoring it changes nothing
            assert d["ie"] == pytest.approx(0.0, abs=1e-6)
        else:  # restoring one subject token's embedding = restoring it in block 0's identity output
            assert d["ie"] == pytest.approx(cell(res, "blocks.0.resid_post", d["position"])["ie"], abs=1e-5)
    assert len(res.details) == 5 * 7 and {d["position_kind"] for d in res.details} == {
        "context", "subject_first", "subject_middle", "subject_last", "last_token"}
    scored = [d for d in res.details if d["subject_ie"] is not None]
    assert len(scored) == 4 * 3 and all(d["role"] == "stream" and d["position"] in (1, 2, 3) for d in scored)
    assert CausalTracing.depth_value == "subject_ie"
    assert {(r["layer"], r["position_kind"]) for r in res.metrics["ie_by_layer_kind"]} == {
        (layer, kind) for layer in (1, 2, 3, 4) for kind in ("context", "subject_first", "subject_middle",
                                                             "subject_last", "last_token")} - {(4, "last_token")}


def test_a_model_that_reads_the_subject_before_any_stream_site_scores_zero(task):
    # block 0 writes the code straight to the last position: no state at a subject position
    # after the embedding holds anything the answer needs
    res = CausalTracing(**PLANTED)(Relay.for_facts(task, read_block=0, write_position=6), task, 0)
    assert res.metrics["n_examples_used"] > 40
    assert res.score == 0.0 and max(abs(v) for v in res.per_example) < 1e-6
    assert res.metrics["last_token_peak_layer"] == 1 and res.metrics["last_token_peak_ie"] == pytest.approx(1.0)


def test_not_applicable_without_subject_positions_or_embedding(task):
    tracer = CausalTracing()
    plain = registry.adapter("transformer").for_task(ModAdd(p=7), 0)
    res = tracer(plain, ModAdd(p=7), 0)
    assert not res.applicable and "names no subject positions" in res.reason
    res = tracer(NoEmbedRelay.for_facts(task), task, 0)
    assert not res.applicable and "no embed hook point" in res.reason
    assert registry.get("techniques", "causal_tracing") is CausalTracing


@pytest.fixture(scope="module")
def trained_transformer(task):
    adapter = registry.adapter("transformer").for_task(task, 0, d_model=32)  # 2 blocks
    report = adapter.fit(task, 0, steps=600)
    assert report.accuracy >= 0.95
    return adapter


def test_trained_transformer_invariants(task, trained_transformer):
    res = CausalTracing(n_examples=64, n_noise=5)(trained_transformer, task, 0)
    m = res.metrics
    assert m["n_examples_used"] >= 48 and m["total_effect"] > 0.3
    for d in res.details:
        if d["position"] == 0:  # causal: position 0 never sees the noise, restoring it changes nothing
            assert d["ie"] == pytest.approx(0.0, abs=1e-5), d
        if d["site"] == "blocks.1.resid_post" and d["position"] < 6:  # nothing reads the last block's earlier positions
            assert d["ie"] == pytest.approx(0.0, abs=1e-5), d
    assert cell(res, "blocks.1.resid_post", 6)["ie"] == pytest.approx(1.0, abs=1e-5)  # the readout's input
    mean = sum(res.per_example) / len(res.per_example)
    assert res.score == pytest.approx(min(1.0, max(0.0, mean))) and 0.05 < res.score < 0.9
    assert m["peak_subject_layer"] == 1  # only block 0's output at a subject position can still be read
    assert m["last_token_peak_layer"] == 1 and m["last_token_peak_ie"] > res.score


def test_a_random_init_transformer_has_nothing_to_trace(task):
    # it answers about 1 in 8 right with a near-uniform P(correct) the noise cannot drop by 0.1
    # (a random Mamba is not at 0: `CausalTracing.control_floor`)
    control = registry.adapter("transformer").for_task(task, 0, d_model=32)
    res = CausalTracing(n_examples=64, n_noise=5)(control, task, 0)
    assert res.applicable and res.score == 0.0 and res.metrics["nothing_to_trace"]
    assert res.per_example == [0.0] * 64 and res.metrics["n_examples_used"] == 0


def test_runs_on_facts_with_two_subject_tokens():
    task = Facts()
    res = CausalTracing(**PLANTED)(Relay.for_facts(task, write_position=2), task, 0)
    assert res.score == pytest.approx(1.0, abs=1e-5)
    assert res.metrics["peak_subject_position_kind"] == "subject_last" and res.metrics["peak_subject_layer"] == 2
    assert {d["position_kind"] for d in res.details if d["position"] == 1} == {"subject_first"}

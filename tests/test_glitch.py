"""Known-answer tests for the glitch search, attribution's per-position weights and the glitch tables.

`PlantedCount` answers the count task from its (hooked) one-hot input embedding:
- `mode="rule"`: #a mod m, exactly the rule; any token outside {a, b, c} in the body makes
  it answer wrong, so a search that substitutes tokens the task never puts there (the query,
  an answer token) glitches it;
- `mode="peek"`: #a + [token at PEEK is b] mod m: it reads an irrelevant position, so it is
  right where PEEK holds a or c and flips exactly when a c at PEEK becomes b;
- `mode="pair"`: #a + [tokens at PEEK and PEEK2 are both b] mod m: where both hold c no
  single substitution flips it, the pair does;
- `mode="constant"`: always count 0 (it ignores its input).
The matrix's transformer trained for 300 steps on facts is the trained organism; its
random-init twin is the control.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from archbench import registry
from archbench import report_tables as tables
from archbench.adapter import Adapter, Site, hook
from archbench.adapters.transformer import TransformerAdapter
from archbench.hooks import HookPoint
from archbench.report import _md_table
from archbench.report_latex import table as latex_table
from archbench.tasks import Count, Facts, ModAdd, Recall
from archbench.techniques.attribution import Attribution
from archbench.techniques.glitch import Glitch, pair_sample, rule_keeps
from archbench.techniques.glitch_tables import glitch_tables, position_correlations

torch.set_num_threads(1)
D = ("batch", "pos", "d")
PEEK, PEEK2 = 3, 5
B, C = 1, 2


class _CountModel(nn.Module):
    def __init__(self, vocab: int, m: int, mode: str):
        super().__init__()
        self.vocab, self.m, self.mode = vocab, m, mode
        self.embed = HookPoint()
        self.register_buffer("tiebreak", torch.linspace(0.01, 0.0, vocab))  # (V,)

    def forward(self, tokens):
        e = self.embed(F.one_hot(tokens, self.vocab).float())  # (B, T, V)
        body = e[:, :-1]  # (B, L, V)
        count = body[..., Count.A].sum(1).round().long()  # (B,)
        if self.mode == "peek":
            count = count + (body[:, PEEK, B] > 0.5).long()
        elif self.mode == "pair":
            count = count + ((body[:, PEEK, B] > 0.5) & (body[:, PEEK2, B] > 0.5)).long()
        elif self.mode == "constant":
            count = torch.zeros_like(count)
        invalid = body[..., Count.QUERY:].sum((1, 2)) > 0  # (B,) a token the task never puts in the body
        count = torch.where(invalid, count + 1, count)
        answer = Count.ANSWER0 + count % self.m  # (B,)
        logits = 10.0 * F.one_hot(answer, self.vocab).float() + self.tiebreak  # (B, V)
        return logits[:, None].expand(-1, tokens.shape[1], -1)  # (B, T, V)


class PlantedCount(Adapter):
    family = "planted-count"
    capabilities = frozenset()
    default_config = {"mode": "rule", "m": 4}

    @classmethod
    def build_model(cls, config):
        return _CountModel(config["vocab_size"], config["m"], config["mode"])

    def forward(self, tokens):
        return self.model(tokens)

    def hooks(self):
        return [hook("embed", "embed", D, 0, Site(self.model.embed))]


@pytest.fixture(scope="module")
def count():
    return Count()


def _glitch(task, mode, **cfg):
    return Glitch(**cfg)(PlantedCount.for_task(task, 0, mode=mode), task, 0)


def _rates(result) -> dict[int, float | None]:
    return {d["position"]: d["glitch_rate"] for d in result.details}


def _consistent(r):
    assert r.applicable and 0.0 <= r.score <= 1.0
    assert r.score == pytest.approx(sum(r.per_example) / len(r.per_example))
    assert r.metrics["robustness"] == pytest.approx(1.0 - r.metrics["glitch_rate"])
    assert r.score <= r.metrics["robustness"] + 1e-9  # robust by the rule is robust, and also moved


def test_a_model_that_implements_the_rule_never_glitches(count):
    r = _glitch(count, "rule")
    _consistent(r)
    assert r.score == 1.0 and r.metrics["glitch_rate"] == 0.0 and r.metrics["mean_min_edits"] is None
    assert r.metrics["n_examples_scored"] > 100 and r.metrics["rule_change_sensitivity"] == 1.0
    # every body position was edited (b <-> c only: a -> b would change the count, and a token
    # outside the position's pool would make this model answer wrong); the constant query never
    rates = _rates(r)
    assert all(rates[p] == 0.0 for p in range(count.length)) and rates[count.length] is None
    assert all(d["n_tried"] > 0 for d in r.details[:-1]) and r.details[-1]["n_tried"] == 0
    assert r.metrics["pairs_tried"] > 0  # no single glitch: every example went on to pairs


def test_a_model_that_reads_an_irrelevant_position_glitches_exactly_there(count):
    r = _glitch(count, "peek")
    _consistent(r)
    rates = _rates(r)
    assert rates[PEEK] == 1.0  # every c -> b at PEEK flips the answer
    assert all(rates[p] == 0.0 for p in range(count.length) if p != PEEK)
    ex = count.sample(128, 0, "test")
    peek_c = (ex.tokens[:, PEEK] == C)  # correct there (c reads as c) and editable to b
    correct = ex.tokens[:, PEEK] != B
    # the glitched examples are exactly those with c at PEEK, each by one edit
    assert r.metrics["glitch_rate"] == pytest.approx(float(peek_c.sum()) / float(correct.sum()), abs=1e-9)
    assert 0.3 < r.score < 0.7 and r.metrics["mean_min_edits"] == 1.0
    assert r.score == pytest.approx(r.metrics["robustness"])  # every a -> b edit moves its count
    assert r.metrics["n_examples_correct"] == int(correct.sum())


def test_a_glitch_that_needs_two_edits_is_found_by_the_pair_search(count):
    r = _glitch(count, "pair")
    _consistent(r)
    ex = count.sample(128, 0, "test")
    both_b = (ex.tokens[:, PEEK] == B) & (ex.tokens[:, PEEK2] == B)
    correct = (~both_b).nonzero()[:, 0].tolist()
    by_example = dict(zip(correct, r.metrics["min_edits"]))  # every correct example has a valid edit
    assert len(by_example) == r.metrics["n_examples_scored"] == len(correct)
    for i, k in by_example.items():
        a, b = int(ex.tokens[i, PEEK]), int(ex.tokens[i, PEEK2])
        expected = 1 if {a, b} == {B, C} else 2 if (a, b) == (C, C) else None
        assert k == expected, (i, a, b, k)
    assert 1.0 < r.metrics["mean_min_edits"] < 2.0
    without_pairs = _glitch(count, "pair", max_pairs=0)
    assert without_pairs.metrics["robustness"] > r.metrics["robustness"] and without_pairs.metrics["pairs_tried"] == 0


def test_a_model_that_ignores_its_input_is_robust_but_scores_0(count):
    r = _glitch(count, "constant")
    _consistent(r)
    assert r.metrics["robustness"] == 1.0 and r.metrics["rule_change_sensitivity"] == 0.0
    assert r.score == 0.0  # robust only because it reads nothing


def test_the_budget_caps_single_substitutions_per_example(count):
    full = _glitch(count, "rule", max_pairs=0)  # every b <-> c edit: ~5 per example
    capped = _glitch(count, "rule", max_pairs=0, max_singles=2)
    assert capped.metrics["n_examples_scored"] == full.metrics["n_examples_scored"]
    assert capped.metrics["singles_tried"] == sum(min(2, d) for d in _editable(count))
    assert full.metrics["singles_tried"] == sum(_editable(count)) > capped.metrics["singles_tried"]


def _editable(count) -> list[int]:
    """The b/c positions of each test example with one: its valid single substitutions."""
    ex = count.sample(128, 0, "test")
    n = (ex.tokens[:, :-1] != Count.A).sum(1).tolist()
    return [k for k in n if k]


def test_trained_transformer_is_robust_and_its_random_init_control_is_not():
    task = Facts()  # the matrix's transformer size: a smaller random-init one answers nearly one token
    control = TransformerAdapter.for_task(task, 0)
    trained = TransformerAdapter.for_task(task, 0)
    trained.fit(task, 0, steps=300, lr=3e-3, n_train=2048, batch=64, eval_every=50, target=1.01,
                plateau_steps=None, warmup=20)
    good, floor = Glitch()(trained, task, 0), Glitch()(control, task, 0)
    for r in (good, floor):
        _consistent(r)
        assert r.metrics["edited_positions"] == [0]  # the filler: subject and relation are relevant
    assert good.metrics["n_examples_scored"] > 120 and good.score > 0.95
    assert floor.score < 0.2 and floor.metrics["mean_min_edits"] == 1.0


def test_modadd_has_no_irrelevant_position_to_edit():
    task = ModAdd(p=23)
    r = Glitch()(TransformerAdapter.for_task(task, 0), task, 0)
    assert not r.applicable and "no irrelevant position" in r.reason


def test_rule_keeps_drops_sequences_the_rule_refuses():
    task = Recall()
    ex = task.sample(8, 0, "test")
    edited = ex.tokens.clone()
    edited[::2, -1] = task.n_keys + 1  # a query that is no key: the rule raises on these rows
    keep = rule_keeps(task, edited, ex.answer, ex.relevant)
    assert keep.tolist() == [False, True] * 4


def test_pair_sample_lists_or_draws_pairs_at_distinct_positions():
    import numpy as np

    rng = np.random.default_rng(0)
    positions = torch.tensor([0, 0, 1, 2])
    assert pair_sample(positions, 10, rng) == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    many = pair_sample(torch.arange(100) % 7, 20, rng)
    assert len(set(many)) == 20 and all(a < b and a % 7 != b % 7 for a, b in many)


# ---- attribution's per-position weight ------------------------------------------------------------

def test_attribution_details_weigh_only_the_positions_the_model_reads(count):
    r = Attribution(n_examples=128)(PlantedCount.for_task(count, 0, mode="rule"), count, 0)
    assert r.applicable and r.score == pytest.approx(1.0)  # feature ablation: only the a positions matter
    ex = count.sample(128, 0, "test")
    assert [d["position"] for d in r.details] == list(range(count.length))  # the constant query is left out
    n_a = (ex.tokens[:, :-1] == Count.A).sum(1).clamp_min(1).float()  # (n,)
    for d in r.details:
        p = d["position"]
        is_a = (ex.tokens[:, p] == Count.A).float()
        assert d["mean_abs_attribution_irrelevant"] == pytest.approx(0.0, abs=1e-9)
        assert d["relevant_share"] == pytest.approx(float(is_a.mean()))
        assert d["mean_abs_attribution"] == pytest.approx(float((is_a / n_a).mean()), abs=1e-6)
    total = sum(d["mean_abs_attribution"] for d in r.details)
    assert total == pytest.approx(float((ex.tokens[:, :-1] == Count.A).any(1).float().mean()), abs=1e-6)


# ---- the report's tables ------------------------------------------------------------------------------

G = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  # the seed-mean glitch rate per position
WOBBLE = [0.3, -0.3, 0.3, -0.3, 0.3, -0.3, 0.3, -0.3]  # +- per seed: seed 0 alone is reordered
LOW = [0.25, 0.0] * 4  # the weaker patching site: a mean over sites would break the order


def _cell(technique, arch, task, seed, details, control=False, glitch_rate=None):
    metrics = {} if glitch_rate is None else {"glitch_rate": glitch_rate}
    return {"technique": technique, "status": "ok", "arch": arch, "task": task, "seed": seed, "control": control,
            "score": 0.5, "metrics": metrics, "details": details}


def _glitch_rows(rates):
    return ([{"position": p, "glitch_rate": v, "n_tried": 10, "relevant": False} for p, v in enumerate(rates)]
            + [{"position": 8, "glitch_rate": None, "n_tried": 0, "relevant": False}])


def _patching_rows(high, low):
    rows = []
    for p in range(8):
        a, b = (high[p], low[p]) if p % 2 == 0 else (low[p], high[p])
        rows += [{"site": "embed", "position": p, "iia": 1.0, "trivial": True, "trivial_reason": "input embedding"},
                 {"site": "blocks.0.resid_post", "position": p, "iia": a, "trivial": False, "trivial_reason": ""},
                 {"site": "blocks.1.resid_post", "position": p, "iia": b, "trivial": False, "trivial_reason": ""}]
    return rows + [{"site": "blocks.1.resid_post", "position": "aligned", "iia": 1.0, "trivial": False,
                    "trivial_reason": ""},
                   {"site": "blocks.1.resid_post", "position": 8, "iia": 0.9, "trivial": True,
                    "trivial_reason": "readout input"}]


@pytest.fixture
def store_cells():
    rows = []
    for seed, sign in ((0, 1), (1, -1)):
        wobbled = [g + sign * w for g, w in zip(G, WOBBLE)]
        rows.append(_cell("glitch", "transformer", "count", seed, _glitch_rows(wobbled), glitch_rate=0.2 + 0.2 * seed))
        rows.append(_cell("attribution", "transformer", "count", seed,
                          [{"position": p, "mean_abs_attribution": 0.5, "mean_abs_attribution_irrelevant": g,
                            "relevant_share": 0.3} for p, g in enumerate(G)]))
        rows.append(_cell("patching", "transformer", "count", seed, _patching_rows([1 - g for g in G], LOW)))
        rows.append(_cell("glitch", "mamba", "count", seed, _glitch_rows([0.0] * 8), glitch_rate=0.0))
        rows.append(_cell("attribution", "mamba", "count", seed,
                          [{"position": p, "mean_abs_attribution": 0.1 * p, "relevant_share": 0.3} for p in range(8)]))
        rows.append(_cell("glitch", "kan", "count", seed, _glitch_rows(G), glitch_rate=0.5))
        rows.append(_cell("attribution", "kan", "count", seed,
                          [{"position": p, "mean_abs_attribution": 0.1 * p, "relevant_share": 0.3} for p in (0, 1)]))
        rows.append(_cell("glitch", "transformer", "count", seed, _glitch_rows(G[::-1]), control=True, glitch_rate=0.9))
    rows.append(_cell("glitch", "transformer", "facts", 0,
                      [{"position": 0, "glitch_rate": 0.0, "n_tried": 7, "relevant": False}], glitch_rate=0.0))
    rows.append({**_cell("glitch", "transformer", "modadd", 0, None), "status": "n/a", "score": None})
    return pd.DataFrame(rows)


def test_position_correlations_pool_seeds_and_take_the_best_site(store_cells):
    corr = position_correlations(store_cells).set_index(["arch", "task", "technique"])
    t = corr.loc[("transformer", "count", "attribution")]
    assert t.rho == pytest.approx(1.0) and t.n == 8  # the seed means, not seed 0 alone
    seed0 = [g + w for g, w in zip(G, WOBBLE)]
    assert spearmanr(seed0, G)[0] < 0.9  # what seed 0 alone would give
    p = corr.loc[("transformer", "count", "patching")]
    assert p.rho == pytest.approx(-1.0) and p.n == 8  # the max over sites; embedding, aligned, readout left out
    assert pd.isna(corr.loc[("mamba", "count", "attribution")].rho)
    assert "glitch rate constant" in corr.loc[("mamba", "count", "attribution")].reason
    assert corr.loc[("mamba", "count", "patching")].reason == "patching: no cells"
    kan = corr.loc[("kan", "count", "attribution")]
    assert pd.isna(kan.rho) and kan.n == 2 and "fewer than 3" in kan.reason
    facts = corr.loc[("transformer", "facts", "attribution")]
    assert facts.reason == "attribution: no cells"


def test_glitch_tables_render_rho_dashes_and_the_family_rates(store_cells, monkeypatch):
    position, family = Glitch.report_tables(store_cells, "transformer")
    assert (position.key, family.key) == ("glitch-position", "glitch-family")
    rows = {(r[0], r[1]): r for r in position.rows}
    assert rows["count", "transformer"][2:6] == ["0.30", "2", "ρ=1.00 (n=8)", "ρ=-1.00 (n=8)"]
    assert rows["count", "mamba"][4:6] == ["—", ""] and "constant" in rows["count", "mamba"][6]
    assert rows["count", "kan"][4] == "—" and "fewer than 3" in rows["count", "kan"][6]
    assert [r[1] for r in position.rows][:3] == ["transformer", "kan", "mamba"]  # reference first
    assert "Ablation scores components, not positions" in position.note
    fam = {r[0]: r for r in family.rows}
    # transformer: mean over tasks of the seed means, (0.3 + 0.0) / 2, not the mean over cells (0.2)
    assert fam["transformer"][1:] == ["0.15", "0.90", "count, facts"]
    assert fam["mamba"][1:3] == ["0.00", ""] and family.rows[0][0] == "transformer"
    for t in (position, family):
        assert _md_table(t) and latex_table(t)
    assert [t.key for t in tables.technique_tables(store_cells, "transformer")] == ["glitch-position", "glitch-family"]
    assert registry.technique("glitch") is Glitch


def test_no_glitch_cells_no_tables(store_cells):
    assert glitch_tables(store_cells[store_cells.technique != "glitch"], "transformer") == []


def test_a_position_enters_only_from_the_seeds_whose_glitch_cell_searched_it():
    """Parity's secret is drawn per seed: position 0 is relevant in seed 1 (never searched there),
    so seed 1's attribution and patching values at position 0 must not be pooled."""
    def glitch(searched):
        return [{"position": p, "glitch_rate": G[p] if p in searched else None, "n_tried": 10 * (p in searched)}
                for p in range(5)]

    def site(p, iia):
        return {"site": "blocks.0.resid_post", "position": p, "iia": iia, "trivial": False, "trivial_reason": ""}

    rows = [_cell("glitch", "gru", "parity", 0, glitch(range(5))),
            _cell("glitch", "gru", "parity", 1, glitch(range(1, 5))),
            _cell("attribution", "gru", "parity", 0,
                  [{"position": p, "mean_abs_attribution": 0.2, "mean_abs_attribution_irrelevant": G[p]}
                   for p in range(5)]),
            _cell("attribution", "gru", "parity", 1,  # relevant in every example at 0: no irrelevant mean there
                  [{"position": 0, "mean_abs_attribution": 9.0, "mean_abs_attribution_irrelevant": None}]
                  + [{"position": p, "mean_abs_attribution": 0.2, "mean_abs_attribution_irrelevant": G[p]}
                     for p in range(1, 5)]),
            _cell("patching", "gru", "parity", 0, [site(p, 1 - G[p]) for p in range(5)]),
            _cell("patching", "gru", "parity", 1, [site(0, -5.0)] + [site(p, 1 - G[p]) for p in range(1, 5)])]
    corr = position_correlations(pd.DataFrame(rows)).set_index("technique")
    assert corr.loc["attribution"].rho == pytest.approx(1.0) and corr.loc["attribution"].n == 5
    assert corr.loc["patching"].rho == pytest.approx(-1.0) and corr.loc["patching"].n == 5


def test_edits_that_leave_the_task_distribution_are_never_tried():
    """A recall edit that repeats a key keeps the rule's answer but is no sequence the task
    draws: it is not a test of the rule, so it is not tried."""
    from archbench.tasks.mqar import MQAR
    from archbench.tasks.recall import Recall
    task = Recall()
    ex = task.sample(64, 0, "test")
    assert task.in_distribution(ex.tokens).all()
    edited = ex.tokens.clone()
    edited[:, 0] = edited[:, 2]  # the first key repeats the second
    off = ~task.in_distribution(edited)
    assert off.all()
    assert not rule_keeps(task, edited, ex.answer, ex.relevant).any()
    mq = MQAR(n_pairs=4, n_queries=2, n_keys=8, n_values=8)
    toks = mq.sample(64, 0, "test").tokens
    assert mq.in_distribution(toks).all()
    wrong = toks.clone()
    wrong[:, mq.first_query_pos + 1] = (wrong[:, mq.first_query_pos + 1] - mq.n_keys + 1) % mq.n_values + mq.n_keys
    assert not mq.in_distribution(wrong).any()  # an answered query followed by another value

"""Multi-query associative recall (archbench/tasks/mqar.py): its ground truth, recomputed in
plain Python from the tokens (not through `rule`), its knobs and splits, and (slow) that a
tiny transformer learns it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archbench import cite, registry
from archbench.tasks import BUILTIN_TASKS
from archbench.tasks.mqar import MQAR

torch.set_num_threads(1)

# defaults, the pair counts of Zoology's figure 2 (4, 8, 16), padding, a single query, the
# tiniest vocabularies, and Zoology's smallest setting (4 pairs, every key queried, length 64)
CONFIGS = [dict(), dict(n_pairs=4), dict(n_pairs=16), dict(n_pairs=8, length=40),
           dict(n_pairs=4, n_queries=1), dict(n_pairs=4, n_queries=4, n_keys=4, n_values=2),
           dict(n_pairs=4, n_queries=4, length=64)]
IDS = ["default", "pairs4", "pairs16", "padded", "one_query", "tiny_vocab", "zoology_smallest"]


def parse(task: MQAR, row: list[int]) -> dict:
    """The sequence's parts, checking its format along the way: the answer by hand."""
    pairs = row[:2 * task.n_pairs]
    keys, values = pairs[0::2], pairs[1::2]
    assert len(set(keys)) == len(keys) and all(0 <= k < task.n_keys for k in keys)
    assert all(task.n_keys <= v < task.n_keys + task.n_values for v in values)
    n_fill = task.seq_len - 2 * task.n_pairs - (2 * task.n_queries - 1)
    assert row[2 * task.n_pairs:2 * task.n_pairs + n_fill] == [task.filler] * n_fill
    tail = row[2 * task.n_pairs + n_fill:]
    queries, shown = tail[0::2], tail[1::2]
    assert len(queries) == task.n_queries and len(set(queries)) == len(queries)
    assert set(queries) <= set(keys)  # every query is a key of the sequence
    assert shown == [values[keys.index(q)] for q in queries[:-1]]  # earlier queries' values
    match = keys.index(queries[-1])
    return {"answer": values[match], "match_pos": 2 * match, "query": queries[-1]}


@pytest.mark.parametrize("knobs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_samples_follow_the_rule(knobs, split):
    task = MQAR(**knobs)
    ex = task.sample(300, seed=1, split=split)
    assert ex.tokens.shape == (300, task.seq_len) and int(ex.tokens.max()) < task.vocab_size
    truth = [parse(task, row) for row in ex.tokens.tolist()]
    assert ex.answer.tolist() == [t["answer"] for t in truth]
    assert ex.latents["value"].tolist() == [t["answer"] for t in truth]
    assert ex.latents["match_pos"].tolist() == [t["match_pos"] for t in truth]
    assert ex.latents["query"].tolist() == [t["query"] for t in truth]
    assert all(v.dtype == torch.long and v.shape == (300,) for v in ex.latents.values())
    # the relevance mask marks exactly the matching key, its value and the last query
    assert (ex.relevant.sum(dim=1) == 3).all()
    rows = torch.arange(300)
    assert ex.relevant[rows, ex.latents["match_pos"]].all()
    assert ex.relevant[rows, ex.latents["match_pos"] + 1].all() and ex.relevant[:, -1].all()
    # the answer is one of the value tokens, which are exactly answer_tokens
    assert task.answer_tokens().tolist() == list(range(task.n_keys, task.n_keys + task.n_values))
    assert torch.isin(ex.answer, task.answer_tokens()).all()


def test_queries_are_spread_over_the_pairs():
    task = MQAR()
    ex = task.sample(2000, seed=0)
    pair = ex.latents["match_pos"] // 2
    assert set(pair.tolist()) == set(range(task.n_pairs))  # every pair is the answer sometimes
    assert 0.08 < (pair == 0).float().mean() < 0.17  # about 1 / n_pairs
    asked = ex.tokens[:, task.first_query_pos::2]  # (n, M)
    assert all(len(set(r)) == task.n_queries for r in asked.tolist())


def test_by_hand():
    task = MQAR(n_pairs=3, n_queries=2, n_keys=5, n_values=4)
    assert (task.vocab_size, task.seq_len, task.filler) == (10, 9, 9)
    x = torch.tensor([[0, 5, 3, 8, 4, 5, 4, 5, 3],   # pairs 0:5 3:8 4:5, then 4 (5), then 3 -> 8
                      [1, 6, 2, 6, 0, 7, 0, 7, 1]])  # pairs 1:6 2:6 0:7, then 0 (7), then 1 -> 6
    assert task.rule(x).tolist() == [8, 6]
    lat = task.latents(x)
    assert lat["value"].tolist() == [8, 6] and lat["match_pos"].tolist() == [2, 0]
    assert lat["query"].tolist() == [3, 1]
    assert task.relevance(x).tolist() == [  # matching key, its value, the last query
        [False, False, True, True, False, False, False, False, True],
        [True, True, False, False, False, False, False, False, True]]
    padded = MQAR(n_pairs=3, n_queries=2, n_keys=5, n_values=4, length=11)
    y = torch.cat([x[:, :6], torch.full((2, 2), 9), x[:, 6:]], dim=1)  # (2, 11): two fillers
    assert padded.first_query_pos == 8 and padded.rule(y).tolist() == [8, 6]
    assert padded.latents(y)["match_pos"].tolist() == [2, 0]


def test_the_length_knob():
    plain, padded = MQAR(n_pairs=4, n_queries=3), MQAR(n_pairs=4, n_queries=3, length=30)
    assert plain.seq_len == 2 * 4 + 2 * 3 - 1 == 13 and padded.seq_len == 30
    assert plain.vocab_size == padded.vocab_size == 32 + 32 + 1
    assert not (plain.sample(200, seed=0).tokens == plain.filler).any()
    tokens = padded.sample(200, seed=0).tokens  # (200, 30)
    assert (tokens[:, 8:25] == padded.filler).all() and not (tokens[:, :8] == padded.filler).any()
    assert not (tokens[:, 25:] == padded.filler).any()
    # the derived length is the explicit minimal one: one task, whichever way it is written
    assert MQAR(n_pairs=4, n_queries=3, length=13).config() == plain.config()
    for task in (plain, padded):
        twin = MQAR(**task.config())
        assert twin.config() == task.config()
        assert all(isinstance(v, int) for v in task.config().values())
        assert torch.equal(twin.sample(32, seed=0).tokens, task.sample(32, seed=0).tokens)
    with pytest.raises(ValueError, match="length"):
        MQAR(n_pairs=4, n_queries=3, length=12)
    with pytest.raises(ValueError, match="n_queries"):
        MQAR(n_pairs=4, n_queries=5)
    with pytest.raises(ValueError):
        MQAR(n_pairs=40, n_keys=32)


@pytest.mark.parametrize("knobs", CONFIGS, ids=IDS)
def test_splits_are_disjoint_and_non_empty(knobs):
    task = MQAR(**knobs)
    sets = {split: set(map(tuple, task.sample(n, seed=0, split=split).tokens.tolist()))
            for split, n in (("train", 2000), ("val", 300), ("test", 500))}
    assert all(sets.values())
    assert not sets["train"] & sets["test"] and not sets["val"] & (sets["train"] | sets["test"])
    for code, split in enumerate(("train", "val", "test")):
        assert (task.split_of(np.array(sorted(sets[split]))) == code).all()


@pytest.mark.parametrize("knobs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_counterfactuals_change_only_the_matching_value(knobs, split):
    task = MQAR(**knobs)
    cf = task.counterfactuals(200, seed=5, split=split)
    code = ("train", "val", "test").index(split)
    assert (task.split_of(cf.base.numpy()) == code).all() and (task.split_of(cf.source.numpy()) == code).all()
    base = [parse(task, r) for r in cf.base.tolist()]
    source = [parse(task, r) for r in cf.source.tolist()]
    assert cf.base_answer.tolist() == [b["answer"] for b in base]
    assert cf.expected.tolist() == [s["answer"] for s in source]
    assert bool((cf.expected != cf.base_answer).all())
    # one position changed: the matching key's value, relevant in the base
    assert cf.changed_positions.sum(dim=1).tolist() == [1] * 200
    rows = torch.arange(200)
    value_pos = torch.tensor([b["match_pos"] + 1 for b in base])  # (200,)
    assert cf.changed_positions[rows, value_pos].all()
    assert not (cf.changed_positions & ~task.relevance(cf.base)).any()


def test_registered_and_cited():
    assert BUILTIN_TASKS["mqar"] == "archbench.tasks.mqar:MQAR"
    assert isinstance(registry.task("mqar"), MQAR) and registry.task("mqar", n_pairs=16).n_pairs == 16
    [entry] = [e for e in cite.references() if "task:mqar" in e.tags]
    assert entry.field("year") == "2024" and entry.field("eprint") == "2312.04927"
    assert entry.field("title").startswith("Zoology")


@pytest.mark.slow
def test_a_tiny_transformer_learns_it():
    """Measured (seed 0, n_pairs 4, default training): held-out 1.000 at 400 steps, 10-20 s."""
    task = MQAR(n_pairs=4)
    adapter = registry.adapter("transformer").for_task(task, 0)
    report = adapter.fit(task, 0)
    assert report.accuracy >= 0.95, report
    # and the untrained model of the same seed is near chance (1 / n_values)
    untrained = registry.adapter("transformer").for_task(task, 0)
    assert untrained.accuracy(task.sample(1024, 0, "test")) < 0.15

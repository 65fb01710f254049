"""Ground truth of the built-in tasks, checked against independent recomputations.

Every answer here is recomputed from the tokens in plain Python (not through `rule`), so a
bug in a task's vectorised code cannot hide behind itself.
"""

from __future__ import annotations

import importlib
from functools import reduce

import numpy as np
import pytest
import torch

from archbench.tasks import (BUILTIN_TASKS, Count, Counterfactuals, Examples, Facts, ModAdd,
                             Parity, Recall, Task)

torch.set_num_threads(1)

TASKS = [ModAdd(), Parity(), Recall(), Count(), Facts()]
IDS = [t.name for t in TASKS]
N = 300


# --- independent recomputations ---------------------------------------------------------
def modadd_answer(task: ModAdd, row: list[int]) -> int:
    assert row[2] == task.p
    return (row[0] + row[1]) % task.p


def parity_answer(task: Parity, row: list[int]) -> int:
    assert row[-1] == 2 and set(row[:-1]) <= {0, 1}
    return reduce(lambda x, y: x ^ y, (row[i] for i in task.secret))


def recall_answer(task: Recall, row: list[int]) -> int:
    keys, values, query = row[0:-1:2], row[1:-1:2], row[-1]
    assert len(set(keys)) == len(keys) and all(0 <= k < task.n_keys for k in keys)
    assert all(task.n_keys <= v < task.n_keys + task.n_values for v in values)
    return values[keys.index(query)]


def count_answer(task: Count, row: list[int]) -> int:
    assert row[-1] == 3 and set(row[:-1]) <= {0, 1, 2}
    return 4 + sum(1 for t in row[:-1] if t == 0) % task.m


def facts_answer(task: Facts, row: list[int]) -> int:
    kb = task.kb()
    names = [tuple(n) for n in kb["names"].tolist()]
    subject = names.index((row[1], row[2]))
    relation = row[3] - (task.n_fillers + task.n_first + task.n_last)
    assert 0 <= row[0] < task.n_fillers and 0 <= relation < task.n_relations
    return int(kb["attribute"][subject, relation])


ANSWER = {"modadd": modadd_answer, "parity": parity_answer, "recall": recall_answer,
          "count": count_answer, "facts": facts_answer}


def feeds_primary(task: Task, tokens: torch.Tensor) -> torch.Tensor:
    """(n, T) bool: positions whose change may alter the primary variable."""
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    if task.name == "modadd":
        mask[:, 0] = True  # the counterfactual changes `a` only
    elif task.name == "parity":
        mask[:, list(task.secret[:2])] = True  # partial_xor reads the first two secret bits
    elif task.name == "recall":
        rows = torch.arange(len(tokens))
        mask[rows, task.latents(tokens)["match_pos"] + 1] = True  # the matching value
    elif task.name == "count":
        mask[:, :-1] = True  # every input token may be an `a`
    elif task.name == "facts":
        mask[:, 1:3] = True  # the subject's two tokens
    return mask


# --- the ground truth -------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS, ids=IDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_match_independent_recomputation(task, split):
    ex = task.sample(N, seed=1, split=split)
    assert isinstance(ex, Examples) and len(ex) == N
    assert ex.tokens.shape == (N, task.seq_len) and ex.tokens.dtype == torch.long
    assert int(ex.tokens.min()) >= 0 and int(ex.tokens.max()) < task.vocab_size
    assert ex.answer.shape == (N,) and ex.answer.dtype == torch.long
    assert int(ex.answer.min()) >= 0 and int(ex.answer.max()) < task.vocab_size
    want = [ANSWER[task.name](task, row) for row in ex.tokens.tolist()]
    assert ex.answer.tolist() == want


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_sampling_is_deterministic_by_seed(task):
    a, b, c = task.sample(64, seed=7), task.sample(64, seed=7), task.sample(64, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answer, b.answer)
    assert all(torch.equal(a.latents[k], b.latents[k]) for k in a.latents)
    assert not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, task.sample(64, seed=7, split="test").tokens)
    cf1, cf2 = task.counterfactuals(32, seed=3), task.counterfactuals(32, seed=3)
    assert torch.equal(cf1.base, cf2.base) and torch.equal(cf1.source, cf2.source)
    assert not torch.equal(cf1.source, task.counterfactuals(32, seed=4).source)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_a_fresh_instance_with_the_same_config_is_the_same_task(task):
    twin = type(task)(**task.config())
    assert twin.config() == task.config()
    assert all(isinstance(v, (int, tuple)) for v in task.config().values())
    assert torch.equal(twin.sample(32, seed=0).answer, task.sample(32, seed=0).answer)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_train_and_test_share_no_sequence(task):
    train = task.sample(2000, seed=0, split="train").tokens
    test = task.sample(500, seed=0, split="test").tokens
    assert not task.in_test_split(train.numpy()).any()
    assert task.in_test_split(test.numpy()).all()
    assert not set(map(tuple, train.tolist())) & set(map(tuple, test.tolist()))


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_the_validation_split_is_disjoint_from_train_and_test(task):
    sets = {split: set(map(tuple, task.sample(600, seed=0, split=split).tokens.tolist()))
            for split in ("train", "val", "test")}
    assert not sets["val"] & sets["train"] and not sets["val"] & sets["test"]
    codes = task.split_of(np.array(sorted(sets["val"])))
    assert (codes == 1).all()


def test_an_empty_split_is_an_error_not_an_endless_loop():
    class NoVal(Parity):
        val_fraction = 0.0

    with pytest.raises(ValueError, match="val split is .*empty"):
        NoVal().sample(8, seed=0, split="val")
    with pytest.raises(ValueError, match="split must be one of"):
        Parity().sample(8, seed=0, split="dev")


@pytest.mark.parametrize("task", TASKS, ids=IDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_counterfactuals(task, split):
    cf = task.counterfactuals(N, seed=5, split=split)
    assert isinstance(cf, Counterfactuals) and len(cf) == N and cf.variable == task.primary
    assert cf.base.shape == cf.source.shape == (N, task.seq_len)
    want_test = split == "test"
    assert (task.in_test_split(cf.base.numpy()) == want_test).all()
    assert (task.in_test_split(cf.source.numpy()) == want_test).all()
    # the expected answer is the rule on the patched input, recomputed independently
    assert cf.base_answer.tolist() == [ANSWER[task.name](task, r) for r in cf.base.tolist()]
    assert cf.expected.tolist() == [ANSWER[task.name](task, r) for r in cf.source.tolist()]
    assert torch.equal(cf.expected, task.rule(cf.source))
    # every built-in counterfactual changes the answer
    assert bool((cf.expected != cf.base_answer).all())
    # the source differs from the base only where the primary variable is fed
    changed = cf.base != cf.source
    assert torch.equal(cf.changed_positions, changed)
    assert bool(changed.any(dim=1).all())
    assert not bool((changed & ~feeds_primary(task, cf.base)).any())
    # and only at positions the answer depends on (in base or in source)
    relevant = task.relevance(cf.base) | task.relevance(cf.source)
    assert not bool((changed & ~relevant).any())
    # the primary latent at the answer position changes with the counterfactual
    lb, ls = task.latents(cf.base)[task.primary], task.latents(cf.source)[task.primary]
    if lb.dim() == 2:
        lb, ls = lb[:, task.primary_position], ls[:, task.primary_position]
    assert bool((lb != ls).all())


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_to_dataset(task):
    ds = task.to_dataset(50, seed=0)
    ex = task.sample(50, seed=0)
    assert len(ds) == 50
    assert ds["tokens"] == ex.tokens.tolist() and ds["answer"] == ex.answer.tolist()
    assert {f"latent_{k}" for k in ex.latents} <= set(ds.column_names)


# --- latents, relevance and answers on hand-written examples -----------------------------
def tok(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_modadd_by_hand():
    task = ModAdd(p=23)
    assert (task.vocab_size, task.seq_len) == (24, 3)
    x = tok([[20, 5, 23], [0, 0, 23], [11, 12, 23]])
    assert task.rule(x).tolist() == [2, 0, 0]
    lat = task.latents(x)
    assert lat["a"].tolist() == [20, 0, 11] and lat["b"].tolist() == [5, 0, 12]
    assert lat["sum"].tolist() == [2, 0, 0]
    assert task.relevance(x).tolist() == [[True, True, False]] * 3


def test_modadd_splits_cover_the_pairs():
    task = ModAdd()
    in_test = task.in_test_split(task.all_inputs())
    assert len(in_test) == 23 * 23
    assert 0.1 < in_test.mean() < 0.3  # about test_fraction = 0.2 of the pairs
    with pytest.raises(ValueError):
        ModAdd(p=1)


def test_parity_by_hand():
    task = Parity(n_bits=6, k=3, secret=(1, 3, 4))
    assert (task.vocab_size, task.seq_len) == (3, 7)
    x = tok([[0, 1, 0, 1, 0, 0, 2],   # bits 1,3,4 = 1,1,0
             [1, 1, 1, 0, 1, 1, 2],   # 1,0,1
             [0, 1, 0, 1, 1, 0, 2],   # 1,1,1
             [1, 0, 1, 0, 0, 1, 2]])  # 0,0,0
    assert task.rule(x).tolist() == [0, 0, 1, 0]
    lat = task.latents(x)
    assert lat["partial_xor"].tolist() == [0, 1, 0, 0]
    assert lat["parity"].tolist() == [0, 0, 1, 0]
    assert task.relevance(x)[0].tolist() == [False, True, False, True, True, False, False]


def test_parity_secret_comes_from_the_seed():
    assert Parity().secret == Parity(secret_seed=0).secret
    assert len(Parity().secret) == 3 and list(Parity().secret) == sorted(Parity().secret)
    assert {Parity(secret_seed=s).secret for s in range(10)} != {Parity().secret}


def test_parity_secrets_are_drawn_per_seed_and_spread_over_the_sequence():
    seeded = [Parity().for_seed(s) for s in range(20)]
    assert len({t.secret for t in seeded}) > 1  # a different secret for some seeds
    for t in seeded:
        first, *_, last = t.secret
        assert first <= 2 and last >= 10 and t.for_seed(99) is t  # fixed once drawn
        assert type(t)(**t.config()).secret == t.secret
    assert Parity(n_bits=10, secret=(5, 6, 9)).for_seed(3).secret == (5, 6, 9)  # the local variant
    assert Parity(n_bits=10, spread=False).secret == (5, 6, 9)  # the old default draw
    with pytest.raises(ValueError):
        Parity(n_bits=4, k=2, secret=(1, 1))


def test_recall_by_hand():
    task = Recall(n_pairs=3, n_keys=5, n_values=4)
    assert (task.vocab_size, task.seq_len) == (9, 7)
    x = tok([[0, 5, 3, 8, 4, 5, 3],   # 3 -> 8 at key position 2
             [1, 6, 2, 6, 0, 7, 1]])  # 1 -> 6 at key position 0
    assert task.rule(x).tolist() == [8, 6]
    lat = task.latents(x)
    assert lat["value"].tolist() == [8, 6] and lat["match_pos"].tolist() == [2, 0]
    assert task.relevance(x).tolist() == [  # matching key, its value, and the query
        [False, False, True, True, False, False, True],
        [True, True, False, False, False, False, True]]


def test_count_by_hand():
    task = Count(length=6, m=4)
    assert (task.vocab_size, task.seq_len) == (8, 7)
    x = tok([[0, 1, 0, 2, 0, 0, 3],   # 4 a -> 0 mod 4
             [1, 2, 1, 2, 1, 2, 3],   # 0 a
             [0, 0, 0, 1, 1, 1, 3]])  # 3 a
    assert task.rule(x).tolist() == [4, 4, 7]
    lat = task.latents(x)
    assert lat["count"].shape == (3, 7)
    assert lat["count"][0].tolist() == [1, 1, 2, 2, 3, 0, 0]
    assert lat["count"][2].tolist() == [1, 2, 3, 3, 3, 3, 3]
    assert lat["count_total"].tolist() == [4, 0, 3]
    assert task.relevance(x)[0].tolist() == [True, False, True, False, True, True, False]
    assert not task.relevance(x)[1].any()
    # the running count at the query position is the answer's count
    ex = task.sample(100, seed=0)
    assert torch.equal(ex.latents["count"][:, -1] + 4, ex.answer)


def test_facts_by_hand():
    task = Facts()
    assert (task.vocab_size, task.seq_len) == (26, 4)
    kb = task.kb()
    names, attribute = kb["names"], kb["attribute"]  # (16, 2), (16, 2)
    # a distinct pair of name tokens per subject, and every token shared by >= 2 subjects
    assert len({tuple(n) for n in names.tolist()}) == 16
    for col in (0, 1):
        assert np.bincount(names[:, col]).max() <= 4 and min(np.unique(
            names[:, col], return_counts=True)[1]) >= 2
    assert attribute.min() >= 18 and attribute.max() < 26
    s1, s2 = 3, 11
    x = tok([[0, *names[s1], 16], [7, *names[s2], 17], [5, *names[s1], 17]])
    assert task.rule(x).tolist() == [attribute[s1, 0], attribute[s2, 1], attribute[s1, 1]]
    lat = task.latents(x)
    assert lat["subject"].tolist() == [s1, s2, s1]
    assert lat["relation"].tolist() == [0, 1, 1]
    assert lat["attribute"].tolist() == task.rule(x).tolist()
    assert task.relevance(x).tolist() == [[False, True, True, True]] * 3
    # the knowledge base is a deterministic function of kb_seed
    assert np.array_equal(Facts(kb_seed=0).kb()["attribute"], attribute)
    assert not np.array_equal(Facts(kb_seed=1).kb()["attribute"], attribute)


def test_facts_every_fact_has_a_train_context():
    task = Facts()
    inputs = task.all_inputs()
    in_test = task.in_test_split(inputs)
    lat = task.latents(torch.as_tensor(inputs))
    train_facts = set(zip(lat["subject"][~torch.as_tensor(in_test)].tolist(),
                          lat["relation"][~torch.as_tensor(in_test)].tolist()))
    assert train_facts == {(s, r) for s in range(16) for r in range(2)}
    # and a train sample of ordinary size holds every fact
    ex = task.sample(2000, seed=0, split="train")
    assert len(set(zip(ex.latents["subject"].tolist(), ex.latents["relation"].tolist()))) == 32


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_latent_shapes(task):
    ex = task.sample(20, seed=0)
    per_position = {"count"} if task.name == "count" else set()
    assert task.primary in ex.latents
    for name, value in ex.latents.items():
        assert value.dtype == torch.long
        assert value.shape == ((20, task.seq_len) if name in per_position else (20,)), name
    assert ex.relevant.shape == (20, task.seq_len) and ex.relevant.dtype == torch.bool
    if task.name in ("facts", "recall"):  # the relation / the query key decides the answer
        assert ex.relevant[:, -1].all()
    else:  # elsewhere the last position is a constant query token ("=" in modadd)
        assert not ex.relevant[:, -1].any() and (ex.tokens[:, -1] == ex.tokens[0, -1]).all()


def test_builtin_table_resolves():
    assert set(BUILTIN_TASKS) == {"modadd", "parity", "recall", "count", "facts", "mqar", "facts_long",
                                  "regression"}
    for name, target in BUILTIN_TASKS.items():
        module, qualname = target.split(":")
        cls = getattr(importlib.import_module(module), qualname)
        assert issubclass(cls, Task) and cls.name == name

"""facts_long: the facts task with 3-token subjects and context between subject and relation.

Answers are recomputed from the tokens in plain Python (not through `rule`), and the
knowledge-base invariants of facts (distinct names, every name token shared, balanced
attributes, every fact in the train split) are checked on the long layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archbench import registry
from archbench.tasks import BUILTIN_TASKS
from archbench.tasks.facts import Facts
from archbench.tasks.facts_long import FactsLong

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return FactsLong()


def answer_by_hand(task: FactsLong, row: list[int]) -> int:
    kb = task.kb()
    names = [tuple(n) for n in kb["names"].tolist()]
    subject = names.index((row[1], row[2], row[3]))
    relation = row[6] - (task.n_fillers + task.n_first + task.n_middle + task.n_last)
    assert all(0 <= row[p] < task.n_fillers for p in (0, 4, 5)) and 0 <= relation < task.n_relations
    return int(kb["attribute"][subject, relation])


def test_layout_and_registration(task):
    assert (task.vocab_size, task.seq_len) == (8 + 4 + 4 + 4 + 2 + 8, 7)
    assert task.subject_positions == (1, 2, 3) and task.relation_position == 6
    assert Facts().subject_positions == (1, 2)  # the same property on facts, its subject's two tokens
    assert BUILTIN_TASKS["facts_long"] == "archbench.tasks.facts_long:FactsLong"
    assert type(registry.task("facts_long")) is FactsLong
    assert task.config() == {"n_subjects": 16, "n_first": 4, "n_middle": 4, "n_last": 4, "n_relations": 2,
                             "n_attributes": 8, "n_fillers": 8, "kb_seed": 0}
    assert "subject_positions" not in Facts().config()  # facts' organisms keep their identity


def test_knowledge_base_invariants(task):
    kb = task.kb()
    names, attribute = kb["names"], kb["attribute"]  # (16, 3), (16, 2)
    assert len({tuple(n) for n in names.tolist()}) == 16  # a distinct triple per subject
    for part, (lo, size) in enumerate([(8, 4), (12, 4), (16, 4)]):  # first, middle, last name tokens
        assert names[:, part].min() >= lo and names[:, part].max() < lo + size
        tokens, counts = np.unique(names[:, part], return_counts=True)
        assert len(tokens) == size and counts.min() >= 2  # every name token shared by two subjects
    assert attribute.min() >= 22 and attribute.max() < 30
    for r in range(2):  # balanced: each attribute twice per relation
        assert np.bincount(attribute[:, r] - 22, minlength=8).tolist() == [2] * 8
    assert np.array_equal(FactsLong(kb_seed=0).kb()["attribute"], attribute)
    assert not np.array_equal(FactsLong(kb_seed=1).kb()["names"], names)


def test_answers_latents_and_relevance_by_hand(task):
    ex = task.sample(300, seed=0, split="test")
    assert ex.tokens.shape == (300, 7)
    assert ex.answer.tolist() == [answer_by_hand(task, row) for row in ex.tokens.tolist()]
    names = [tuple(n) for n in task.kb()["names"].tolist()]
    assert ex.latents["subject"].tolist() == [names.index(tuple(r[1:4])) for r in ex.tokens.tolist()]
    assert torch.equal(ex.latents["attribute"], ex.answer)
    assert ex.relevant.tolist() == [[False, True, True, True, False, False, True]] * 300
    # the context positions vary independently of the subject
    for p in (0, 4, 5):
        assert len(set(ex.tokens[:, p].tolist())) == 8
    with pytest.raises(ValueError, match="does not name a subject"):
        task.rule(torch.tensor([[0, 8, 8, 8, 0, 0, 20]]))  # not a subject of the knowledge base


def test_splits_are_disjoint(task):
    seqs = {split: {tuple(r) for r in task.sample(1500, seed=0, split=split).tokens.tolist()}
            for split in ("train", "val", "test")}
    assert not seqs["train"] & seqs["test"] and not seqs["train"] & seqs["val"] and not seqs["val"] & seqs["test"]
    assert torch.equal(task.sample(50, seed=3).tokens, task.sample(50, seed=3).tokens)


def test_every_fact_has_a_train_context(task):
    inputs = task.all_inputs()
    assert inputs.shape == (8 ** 3 * 16 * 2, 7)
    train = torch.as_tensor(inputs[task.split_of(inputs) == 0])
    lat = task.latents(train)
    assert set(zip(lat["subject"].tolist(), lat["relation"].tolist())) == {(s, r) for s in range(16) for r in range(2)}
    ex = task.sample(2000, seed=0, split="train")
    assert len(set(zip(ex.latents["subject"].tolist(), ex.latents["relation"].tolist()))) == 32


def test_counterfactuals_swap_the_whole_subject(task):
    cf = task.counterfactuals(300, seed=0, split="test")
    assert (cf.expected != cf.base_answer).all()
    assert cf.expected.tolist() == [answer_by_hand(task, row) for row in cf.source.tolist()]
    assert torch.equal(cf.base[:, [0, 4, 5, 6]], cf.source[:, [0, 4, 5, 6]])  # only the subject changes
    assert not cf.changed_positions[:, [0, 4, 5, 6]].any()
    base_subject, source_subject = task.latents(cf.base)["subject"], task.latents(cf.source)["subject"]
    assert (base_subject != source_subject).all()
    assert task.in_test_split(cf.source.numpy()).all()


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="shared by two subjects"):
        FactsLong(n_subjects=6, n_first=4)
    with pytest.raises(ValueError, match="n_first \\* n_middle \\* n_last"):
        FactsLong(n_subjects=9, n_first=2, n_middle=2, n_last=2)

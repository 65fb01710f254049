"""The KAN's scalar-input mode and the symbolic technique: readout and loss as documented,
a planted KAN whose splines are the paper's formula is recovered, a random-init control
scores 0, other families and tasks are not applicable; a trained KAN (slow) recovers it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy
import torch
from torch.nn import functional as F

from archbench.adapters.kan import NON_ANSWER_LOGIT, KANAdapter
from archbench.adapters.transformer import TransformerAdapter
from archbench.tasks import ModAdd, Parity
from archbench.tasks.regression import Regression
from archbench.techniques.symbolic import (Symbolic, drop_negligible, elementary_functions, function_chains,
                                          r2_per_example)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return Regression()


def plant(adapter: KANAdapter, edges: dict, ranges: dict) -> None:
    """Set edge (layer, in, out) to the pure spline of a function on its input range."""
    from kan.spline import curve2coef, extend_grid

    kan = adapter.kan
    with torch.no_grad():
        for layer_index, layer in enumerate(kan.act_fun):
            lo, hi = ranges[layer_index]
            n_intervals = layer.grid.shape[1] - 1 - 2 * layer.k
            grid = extend_grid(torch.linspace(lo, hi, n_intervals + 1)[None, :].expand(layer.in_dim, -1), layer.k)
            layer.grid.copy_(grid)  # (in, G + 2k + 1)
            xs = torch.linspace(lo, hi, 400)[:, None].expand(-1, layer.in_dim)  # (400, in)
            ys = torch.zeros(400, layer.in_dim, layer.out_dim)  # (400, in, out)
            for (l, i, j), fn in edges.items():
                if l == layer_index:
                    ys[:, i, j] = fn(xs[:, i])
            layer.coef.copy_(curve2coef(xs, ys, layer.grid, layer.k))
            layer.scale_base.zero_()  # no SiLU branch: each edge is its spline
            layer.scale_sp.fill_(1.0)


@pytest.fixture(scope="module")
def planted(task):
    """A [2, 1, 1] KAN computing exp(sin(pi x1) + x2^2) with splines (20 grid intervals)."""
    kan = KANAdapter.for_task(task, seed=0, hidden=[1], grid=20)
    plant(kan, {(0, 0, 0): lambda x: torch.sin(math.pi * x), (0, 1, 0): lambda x: x ** 2,
                (1, 0, 0): torch.exp}, {0: (-1.0, 1.0), 1: (-1.05, 2.05)})
    return kan


# ---- the KAN's value mode -----------------------------------------------------------------

def test_value_mode_readout_hooks_and_shapes(task):
    kan = KANAdapter.for_task(task, seed=0)
    assert kan.value_input and kan.kan.width == [[2, 0], [5, 0], [1, 0]]
    tokens = task.sample(32, 0).tokens  # (32, 2)
    out = kan.run(tokens, cache="all")
    c = out.cache
    assert c["input"].shape == (32, 2, 1) and kan.specs["input"].axes == ("batch", "pos", "value")
    assert torch.equal(c["input"][..., 0], task.input_values(tokens).float())
    assert c["blocks.0.edges"].shape == (32, 2, 5, 2) and c["blocks.1.out"].shape == (32, 2, 1)
    assert out.logits.shape == (32, 1, 57)
    with torch.no_grad():
        y_hat = kan.kan(task.input_values(tokens).float())  # (32, 1): MultKAN.forward on the scalars
    assert torch.equal(c["blocks.1.out"][:, -1], y_hat) and torch.equal(kan.predict_values(tokens), y_hat[:, 0])
    tau = task.bin_width ** 2
    centres = task.bin_centres.float()
    assert torch.allclose(out.logits[:, 0, 41:], -(y_hat - centres) ** 2 / tau, rtol=1e-5)
    assert (out.logits[:, 0, :41] == NON_ANSWER_LOGIT).all()
    nearest = 41 + (y_hat - centres).abs().argmin(-1)  # (32,)
    assert torch.equal(kan.predict(tokens), nearest)


def test_value_mode_loss_without_guards_is_the_plain_cross_entropy(task):
    kan = KANAdapter.for_task(task, seed=1, guard_bins=0)
    ex = task.sample(64, 0)
    gen = torch.Generator().manual_seed(0)
    plain = F.cross_entropy(kan.forward(ex.tokens)[:, -1], ex.answer)
    assert torch.allclose(kan.loss(ex.tokens, ex.answer, {"lamb": 0.0}, gen), plain, rtol=1e-6)
    guarded = KANAdapter.for_task(task, seed=1)  # guard_bins 3: phantom bins only lower the end bins' pull
    assert not torch.allclose(guarded.loss(ex.tokens, ex.answer, {"lamb": 0.0}, gen), plain)
    reg = kan.loss(ex.tokens, ex.answer, {"lamb": 0.1, "lamb_l1": 1.0, "lamb_entropy": 2.0}, gen)
    assert reg > plain and kan.kan.acts is None  # pykan's regulariser added, its saved activations dropped


def test_value_mode_save_load_and_refusals(task, tmp_path):
    kan = KANAdapter.for_task(task, seed=0)
    kan.save(tmp_path / "org")
    back = KANAdapter.load(tmp_path / "org")
    tokens = task.sample(16, 0).tokens
    assert back.value_input and torch.equal(back.forward(tokens), kan.forward(tokens))
    with pytest.raises(ValueError, match="numeric tokens"):
        KANAdapter.for_task(Parity(n_bits=6, k=2), seed=0, input="value")
    with pytest.raises(ValueError, match="onehot"):
        KANAdapter.build(vocab_size=5, seq_len=2, seed=0, input="scalar")


# ---- the technique's parts ----------------------------------------------------------------

def test_elementary_functions_chains_and_r2():
    x, y = sympy.symbols("x_1 x_2")
    assert elementary_functions(sympy.exp(sympy.sin(sympy.pi * x) + y ** 2)) == {"exp", "sin", "pow2"}
    assert function_chains(sympy.exp(sympy.sin(sympy.pi * x) + y ** 2)) == {"x_1: exp > sin", "x_2: exp > pow2"}
    assert function_chains(sympy.sin(sympy.exp(x)) + y ** 2) == {"x_1: sin > exp", "x_2: pow2"}
    assert elementary_functions(sympy.Abs(x) + sympy.sqrt(y) + sympy.tanh(x * y) + 3 * x) == {"abs", "pow0.5", "tanh"}
    assert elementary_functions(x * y + 2) == set()
    rng = np.random.default_rng(0)
    target, guess = rng.normal(size=100), rng.normal(size=100)
    r2 = 1 - ((guess - target) ** 2).sum() / ((target - target.mean()) ** 2).sum()
    assert r2_per_example(guess, target).mean() == pytest.approx(r2, abs=1e-12)
    assert r2_per_example(np.full(100, target.mean()), target).mean() == pytest.approx(0.0, abs=1e-12)


def test_drop_negligible_keeps_what_matters():
    x1, x2 = sympy.symbols("x_1 x_2")
    inputs = np.stack(np.meshgrid(np.linspace(-1, 1, 21), np.linspace(-1, 1, 21)), -1).reshape(-1, 2)
    expr = 0.014 * (8.6 * x2) ** 2 + 1e-5 * x1 + 4e-4 * sympy.exp(6e-4 * x1) + sympy.sin(3 * x1)
    kept = drop_negligible(expr, [x1, x2], inputs, scale=1.0, tol=0.01)
    assert elementary_functions(kept) == {"pow2", "sin"}  # the small coefficient on a big term stays


# ---- the technique ------------------------------------------------------------------------

def test_planted_formula_is_recovered(planted, task):
    result = Symbolic()(planted, task, seed=0)
    m = result.metrics
    assert result.applicable and m["r2_network"] > 0.999  # the planted splines are the formula
    assert result.score > 0.99 and m["r2_symbolic"] > 0.99
    assert m["formula_match"] and m["functions_found"] == ["exp", "pow2", "sin"] == m["functions_true"]
    assert m["structure_match"] and m["chains_found"] == ["x_1: exp > sin", "x_2: exp > pow2"]
    assert np.mean(result.per_example) == pytest.approx(m["r2_symbolic"], abs=1e-12)
    assert len(result.per_example) == m["n_test"] and m["n_test"] > 250  # distinct test inputs
    chosen = {(d["layer"], d["in"], d["out"]): d["function"] for d in result.details}
    assert chosen == {(0, 0, 0): "sin", (0, 1, 0): "x^2", (1, 0, 0): "exp"}
    sin_edge = next(d for d in result.details if d["function"] == "sin")
    assert abs(abs(sin_edge["a"]) - math.pi) < 0.05  # sin(a x + b) with a = pi


def test_the_organism_is_untouched(planted, task):
    tokens = task.sample(64, 0).tokens
    before = planted.forward(tokens).clone()
    state = {k: v.clone() for k, v in planted.model.state_dict().items()}
    Symbolic(n_fit=64, n_test=64)(planted, task, seed=1)
    assert torch.equal(planted.forward(tokens), before)
    assert all(torch.equal(v, state[k]) for k, v in planted.model.state_dict().items())
    assert not planted.kan.symbolic_enabled


def test_random_init_control_scores_zero(task):
    control = KANAdapter.for_task(task, seed=0)  # what zoo.control builds: never trained
    result = Symbolic()(control, task, seed=0)
    assert result.applicable and result.score < 0.05
    assert result.metrics["r2_symbolic"] < 0.1 and result.metrics["r2_network"] < 0.1
    assert not result.metrics["structure_match"]  # (its function set can match by chance: seeds 1, 3)


def test_not_applicable_elsewhere(task):
    technique = Symbolic()
    transformer = TransformerAdapter.for_task(task, seed=0)
    assert "no symbolic fitting" in technique(transformer, task, 0).reason
    onehot = KANAdapter.for_task(task, seed=0, input="onehot", hidden=[2])
    assert "one-hot" in technique(onehot, task, 0).reason
    modadd = ModAdd(p=7)
    na = technique(KANAdapter.for_task(modadd, seed=0, hidden=[2]), modadd, 0)
    assert not na.applicable and "no continuous target" in na.reason and "\n" not in na.reason


@pytest.mark.slow
def test_a_trained_kan_recovers_the_papers_formula(task):
    kan = KANAdapter.for_task(task, seed=0)
    report = kan.fit(task, 0)  # the KAN's regression training config: 1500 steps, pykan's lamb 0.1
    assert report.accuracy > 0.9  # passes the zoo's gate
    result = Symbolic()(kan, task, seed=0)
    m = result.metrics
    assert m["r2_network"] > 0.99 and result.score > 0.99
    assert m["formula_match"] and m["structure_match"], m["formula"]

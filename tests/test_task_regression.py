"""The regression task: token layout, exact targets and bins recomputed in plain Python,
splits, latents and counterfactuals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from archbench import registry
from archbench.tasks import regression
from archbench.tasks.regression import Regression

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return Regression()


def paper_f(x1: float, x2: float) -> float:
    return math.exp(math.sin(math.pi * x1) + x2 ** 2)


def test_layout_and_sizes(task):
    assert (task.levels, task.bins, task.n_inputs) == (41, 16, 2)
    assert task.vocab_size == 57 and task.seq_len == 2
    assert task.answer_tokens().tolist() == list(range(41, 57))
    ex = task.sample(200, 0)
    assert ex.tokens.shape == (200, 2) and ((ex.tokens >= 0) & (ex.tokens < 41)).all()
    assert ((ex.answer >= 41) & (ex.answer < 57)).all()
    assert task.formula == "exp(sin(pi*x_1) + x_2**2)"
    assert registry.get("tasks", "regression") is Regression


def test_values_targets_and_bins_match_a_plain_recomputation(task):
    grid = [-1 + 2 * level / 40 for level in range(41)]
    ys = [paper_f(a, b) for a in grid for b in grid]
    lo, hi = min(ys), max(ys)
    width = (hi - lo) / 16
    ex = task.sample(300, 1, "test")
    x = task.input_values(ex.tokens)
    y = task.target_values(ex.tokens)
    assert x.dtype == torch.float64 and y.dtype == torch.float64
    for row, xs, target, answer in zip(ex.tokens.tolist(), x.tolist(), y.tolist(), ex.answer.tolist()):
        assert xs == pytest.approx([grid[row[0]], grid[row[1]]], abs=1e-12)
        assert target == pytest.approx(paper_f(*xs), rel=1e-12)
        assert answer == 41 + min(15, int((target - lo) // width))
        centre = float(task.bin_centres[answer - 41])
        assert abs(target - centre) <= width / 2 + 1e-12  # the answer bin holds y
    assert task.token_values[:41].tolist() == pytest.approx(grid, abs=1e-12)
    assert task.token_values[41:].abs().max() == 0
    assert task.bin_centres[0] == pytest.approx(lo + width / 2)
    assert task.bin_centres[-1] == pytest.approx(hi - width / 2)


def test_every_bin_and_extreme_is_reachable(task):
    answers = task.rule(torch.as_tensor(task.all_inputs()))  # all 1681 inputs
    assert set(answers.tolist()) == set(range(41, 57))  # the maximum lands in the last bin


def test_the_three_splits_hold_the_grid_disjointly(task):
    codes = task.split_of(task.all_inputs())
    counts = np.bincount(codes, minlength=3)
    assert counts.sum() == 41 * 41 and (counts > 0).all()
    assert 250 <= counts[2] <= 420  # about 20% of 1681 in the test split (336 measured)
    train = set(map(tuple, task.sample(2000, 0, "train").tokens.tolist()))
    test = set(map(tuple, task.sample(500, 0, "test").tokens.tolist()))
    assert not train & test and task.in_test_split(np.array(sorted(test))).all()


def test_sampling_is_deterministic_and_the_config_rebuilds_the_task(task):
    assert torch.equal(task.sample(64, 3).tokens, task.sample(64, 3).tokens)
    assert not torch.equal(task.sample(64, 3).tokens, task.sample(64, 4).tokens)
    assert task.config() == {"function": "exp_sin", "levels": 41, "bins": 16, "n_inputs": 2}
    twin = Regression(**task.config())
    assert torch.equal(twin.sample(64, 0).answer, task.sample(64, 0).answer)


def test_latents_and_relevance(task):
    ex = task.sample(50, 0, "test")
    assert set(ex.latents) == {"x_1", "x_2", "y_bin"} and task.primary == "y_bin"
    assert all(v.dtype == torch.long and v.shape == (50,) for v in ex.latents.values())
    assert torch.equal(ex.latents["y_bin"], ex.answer - 41)
    assert torch.equal(ex.latents["x_1"], ex.tokens[:, 0]) and torch.equal(ex.latents["x_2"], ex.tokens[:, 1])
    assert ex.relevant.all() and ex.relevant.shape == (50, 2)


@pytest.mark.parametrize("split", ["train", "test"])
def test_counterfactuals_change_x1_and_the_bin(task, split):
    cf = task.counterfactuals(200, seed=0, split=split)
    assert torch.equal(cf.base[:, 1], cf.source[:, 1])  # x2 unchanged
    assert (cf.base[:, 0] != cf.source[:, 0]).all()
    assert torch.equal(cf.expected, task.rule(cf.source)) and (cf.expected != cf.base_answer).all()
    code = {"train": 0, "test": 2}[split]
    assert (task.split_of(cf.base.numpy()) == code).all() and (task.split_of(cf.source.numpy()) == code).all()
    assert len(set(cf.source[:, 0].tolist())) > 10  # drawn among many levels, not one


def test_other_formulas_and_refusals(monkeypatch):
    small = Regression(function="sin_sq", levels=21, bins=8)
    ex = small.sample(40, 0, "test")
    x = small.input_values(ex.tokens)
    assert torch.allclose(small.target_values(ex.tokens), torch.sin(math.pi * x[:, 0]) + x[:, 1] ** 2)
    four = Regression(function="exp_sin4", levels=11, bins=16)
    assert four.seq_len == 4 and four.vocab_size == 27
    assert four.counterfactuals(20, seed=0).base.shape == (20, 4)
    with pytest.raises(ValueError, match="has 2 inputs"):
        Regression(n_inputs=3)
    with pytest.raises(ValueError, match="no function"):
        Regression(function="bessel")

    class NoTest(Regression):
        test_fraction = 0.0

    with pytest.raises(ValueError, match="split empty"):
        NoTest(levels=21)
    # x1 * x2 is flat in x1 at x2 = 0: no source can change the bin there
    monkeypatch.setitem(regression.FORMULAS, "product", ("x_1*x_2", 2))
    with pytest.raises(ValueError, match="no change of x1"):
        Regression(function="product")

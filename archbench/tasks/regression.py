"""Symbolic regression as a token task: quantised inputs x -> the bin of y = f(x).

The model system of Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks" (arXiv 2404.19756),
whose running example is f(x1, x2) = exp(sin(pi x1) + x2^2) on [-1, 1]^2: a KAN trained on
it recovers the formula with pykan's `auto_symbolic`. archbench tasks are token sequences
with the answer read at the last position, so the continuous problem is put on a grid:

    layout    position i (0 <= i < n_inputs) holds x_{i+1}; no query token, the answer is read
              at the last input position (a causal model has seen every input there)
    tokens    ids 0 .. levels-1: input level l, x = -1 + 2 l / (levels - 1) (evenly spaced
              on [-1, 1], both ends included); ids levels .. levels+bins-1: answer bin b
    answer    the bin of y = f(x) among `bins` equal-width bins over y's range on the grid
              (min to max over all levels^n_inputs inputs; the maximum goes to the last bin)

`input_values(tokens)` gives the continuous x of each token, `target_values(tokens)` the
exact y (float64), `bin_centres` each answer bin's centre, `formula` the sympy string in the
variables x_1 .. x_n. Formulas are chosen by name (knob `function`) from `FORMULAS`: the
paper's 2-variable example (default), its 4-variable example (Sec. 3.1, f = exp((sin(pi(x1^2
+ x2^2)) + sin(pi(x3^2 + x4^2)))/2); it needs about 11 levels or more for the counterfactual
check below, 9 are refused), and the inner function of the default alone (a one-layer KAN).

Size and splits. The base class hashes each sequence into train/val/test (70/10/20), so the
grid must be large enough for every split to hold sequences: levels = 21 gives only 441
inputs (about 88 test sequences), so the default is levels = 41: 1681 inputs, 328 of them
in the test split and 166 in val (the constructor checks that all three splits are
non-empty, among the first 10^5 inputs of a bigger grid).

Primary variable `y_bin` (the answer); latents also `x_1` .. `x_n` (level indices). Every
input position is relevant. Counterfactual source: x1 is replaced by another level drawn
uniformly among those that move y into a different bin (the other inputs unchanged), so the
expected answer is the rule on the source and always differs from the base's; the
constructor checks that every base has such a level (a formula flat in x1 somewhere on the
grid, such as x1*x2 at x2 = 0, is refused).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.base import Task

# name -> (sympy expression in x_1 .. x_n, number of inputs n)
FORMULAS: dict[str, tuple[str, int]] = {
    "exp_sin": ("exp(sin(pi*x_1) + x_2**2)", 2),  # Liu et al. 2024, Fig. 2.4 and the toy datasets of Sec. 3.1
    "exp_sin4": ("exp((sin(pi*(x_1**2 + x_2**2)) + sin(pi*(x_3**2 + x_4**2)))/2)", 4),  # Sec. 3.1
    "sin_sq": ("sin(pi*x_1) + x_2**2", 2),  # the inner sum of exp_sin: a [2, 1] KAN
}


class Regression(Task):
    """n_inputs quantised variables; answer = the bin of f(x) among `bins` bins.

    Knobs: function (a name in FORMULAS, default "exp_sin"), levels (grid points per
    variable, default 41), bins (answer bins, default 16), n_inputs (None: the formula's
    number of variables; given, it must equal it). vocab_size = levels + bins,
    seq_len = n_inputs.
    """

    name: ClassVar[str] = "regression"
    primary: ClassVar[str] = "y_bin"
    description: ClassVar[str] = "quantised x -> bin of f(x), f = exp(sin(pi x1) + x2^2) (Liu et al. 2024)"
    in_matrix: ClassVar[bool] = False  # pykan's finding (archbench/findings.py), with `symbolic`

    def __init__(self, function: str = "exp_sin", levels: int = 41, bins: int = 16, n_inputs: int | None = None):
        if function not in FORMULAS:
            raise ValueError(f"regression has no function {function!r}; known: {', '.join(FORMULAS)}")
        arity = FORMULAS[function][1]
        if n_inputs is not None and int(n_inputs) != arity:
            raise ValueError(f"function {function!r} has {arity} inputs, not n_inputs={n_inputs}")
        if levels < 2 or bins < 2:
            raise ValueError(f"regression needs levels >= 2 and bins >= 2, got levels={levels}, bins={bins}")
        self.function = function
        self.levels, self.bins, self.n_inputs = int(levels), int(bins), arity
        grid = self.all_inputs()  # (levels^n, n)
        y = self._f(self._values(grid))  # (levels^n,)
        self._y_min, self._y_max = float(y.min()), float(y.max())
        if not self._y_max > self._y_min:
            raise ValueError(f"function {function!r} is constant on the grid")
        # splits present among the inputs (the first 10^5 suffice on big grids: hashing is slow)
        if len(set(self.split_of(grid[:100_000]).tolist())) < 3:
            raise ValueError(f"regression with levels={levels} leaves a train, val or test split empty; "
                             "use more levels")
        # every base needs an x1 level that moves y into another bin (the counterfactual)
        by_x1 = self._bin_of(y).reshape(self.levels, -1)  # (levels of x1, levels^(n-1)) a-major grid
        if (by_x1 == by_x1[:1]).all(0).any():
            raise ValueError(f"function {function!r}: for some inputs no change of x1 changes the answer bin")

    # ---- the formula ------------------------------------------------------------------
    @property
    def formula(self) -> str:
        """The target function as a sympy string in x_1 .. x_n."""
        return FORMULAS[self.function][0]

    def sympy_formula(self):
        """The target function as a sympy expression, and its variables [x_1, ..., x_n]."""
        import sympy

        names = sympy.symbols([f"x_{i + 1}" for i in range(self.n_inputs)])
        expr = sympy.sympify(self.formula, locals={str(s): s for s in names})
        return expr, names

    def _f(self, x: np.ndarray) -> np.ndarray:
        """(n, n_inputs) float64 -> (n,) float64: the formula evaluated exactly."""
        import sympy

        if not hasattr(self, "_fn"):
            expr, names = self.sympy_formula()
            self._fn = sympy.lambdify(names, expr, "numpy")
        return np.broadcast_to(np.asarray(self._fn(*x.T), dtype=np.float64), (len(x),)).copy()

    # ---- tokens <-> values --------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.levels + self.bins

    @property
    def seq_len(self) -> int:
        return self.n_inputs

    @property
    def token_values(self) -> torch.Tensor:
        """(vocab,) float64: x of each input token id; 0 for answer ids (never an input)."""
        table = torch.zeros(self.vocab_size, dtype=torch.float64)  # (V,)
        table[:self.levels] = torch.as_tensor(self._values(np.arange(self.levels)))  # as input_values
        return table

    def _values(self, tokens: np.ndarray) -> np.ndarray:
        return -1.0 + 2.0 * np.asarray(tokens, dtype=np.float64) / (self.levels - 1)  # (n, T)

    def input_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, T) long -> (n, T) float64: the continuous x of each input token."""
        return torch.as_tensor(self._values(tokens.numpy()))  # (n, T)

    def target_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, T) long -> (n,) float64: the exact y = f(x)."""
        return torch.as_tensor(self._f(self._values(tokens.numpy())))  # (n,)

    @property
    def bin_width(self) -> float:
        return (self._y_max - self._y_min) / self.bins

    @property
    def bin_centres(self) -> torch.Tensor:
        """(bins,) float64: the centre of answer bin b (answer token levels + b)."""
        return self._y_min + self.bin_width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def _bin_of(self, y: np.ndarray) -> np.ndarray:
        return np.clip(np.floor((y - self._y_min) / self.bin_width), 0, self.bins - 1).astype(np.int64)

    def all_inputs(self) -> np.ndarray:
        """Every input sequence, (levels^n, n), x_1-major."""
        grids = np.meshgrid(*[np.arange(self.levels)] * self.n_inputs, indexing="ij")
        return np.stack([g.ravel() for g in grids], axis=1)  # (levels^n, n)

    # ---- the task contract --------------------------------------------------------------
    def answer_tokens(self) -> torch.Tensor:
        return torch.arange(self.levels, self.levels + self.bins)  # (bins,)

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        y = self._f(self._values(tokens.numpy()))  # (n,)
        return torch.as_tensor(self.levels + self._bin_of(y))  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, self.levels, size=(n, self.n_inputs))  # (n, T)

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {f"x_{i + 1}": tokens[:, i].clone() for i in range(self.n_inputs)}  # each (n,)
        out["y_bin"] = self.rule(tokens) - self.levels  # (n,) bin index
        return out

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones(tokens.shape, dtype=torch.bool)  # (n, T): every input matters

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        n = len(base)
        candidates = np.repeat(base[:, None, :], self.levels, axis=1)  # (n, levels, T)
        candidates[:, :, 0] = np.arange(self.levels)  # every level of x1
        bins = self._bin_of(self._f(self._values(candidates.reshape(-1, self.n_inputs)))).reshape(n, self.levels)
        base_bin = self._bin_of(self._f(self._values(base)))  # (n,)
        allowed = bins != base_bin[:, None]  # (n, levels): non-empty for every base (checked)
        pick = rng.random((n, self.levels)) * allowed  # (n, levels): uniform among the allowed
        source = base.copy()  # (n, T)
        source[:, 0] = pick.argmax(1)
        return source

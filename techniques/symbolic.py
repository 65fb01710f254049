"""Symbolic: does the network's own symbolic formula predict the task's continuous target?

The claim of Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks" (arXiv 2404.19756): a KAN
trained on a continuous function, here exp(sin(pi x1) + x2^2), can be turned into its
symbolic formula by fitting each learnt edge with a library function (pykan's
`auto_symbolic`: every edge phi(x) gets the function f and affine constants a, b, c, d that
best trade off fit and simplicity, c f(a x + b) + d) and composing the edges
(`symbolic_formula`). The technique runs that on a copy of the organism (the adapter's
`symbolic` method: the organism itself is never touched), fitting the edges on the network's
activations on `n_fit` train-split inputs, and reads off one sympy formula y_hat(x_1 .. x_n).

Library. `lib` is bounded to x, x^2, sin, exp, tanh and abs: the elementary functions of the
task's formulas plus a saturating (tanh) and a non-smooth (abs) distractor, so a wrong fit
has somewhere to go. pykan's full library (29 functions in pykan 0.2.8) would cost about
29/6 = 5 times the fitting time (each edge sweeps every function over a 101 x 101 grid of a
and b, three times) and holds functions singular at points a sweep of a x + b reaches (log,
1/x, sqrt, arctanh), and more near-duplicates for a fit to land on by chance (cos for sin,
x^3 for x).

Score. R^2 of the formula's predictions of the exact target y = f(x) (`task.target_values`)
on the distinct test-split inputs of `n_test` draws, the continuous x coming from
`task.input_values`: R^2 = 1 - sum (y_hat - y)^2 / sum (y - mean y)^2. It is
chance-corrected by construction: a constant predictor (the best one is the test mean) has
R^2 = 0, so the chance level is 0, and 1 is a formula that reproduces y exactly. Per example
the value is 1 - (y_hat_i - y_i)^2 / Var(y) (Var over the scored examples, divided by n), whose
mean is R^2 exactly; the score is that mean clipped to [0, 1]. A non-finite prediction (an
exp that overflows) counts as predicting 0.

Metrics. `formula` (the readable formula: summands, at any depth, replaced by their means
while the output stays within RMS `term_tol` = 1% of std(y) of the fitted formula's on the
scored inputs (`drop_negligible`), the constants rounded to `digits` = 3 significant digits,
then sympy-simplified), `formula_raw` (full precision; the score evaluates this one),
`formula_true`, `r2_symbolic` (unclipped), `r2_network` (R^2 of the KAN's own y_hat: how
much of the target the network itself has), `functions_found` and `functions_true` (the sets
of elementary functions in the readable formula and in the task's formula: applied
functions by name, exp, sin, tanh, abs, and integer powers as pow2, pow3 ...; products and
sums are not counted), `formula_match` (True iff the two sets are equal),
`chains_found`, `chains_true` and `structure_match` (stricter: per occurrence of a variable,
the chain of functions from the root down to it, e.g. "x_1: exp > sin", and True iff the two
sets of chains are equal), `n_edges`. `formula_match` alone is weak evidence: with a library
of six functions a random network's formula often uses the same three (the random-init
controls of seeds 1 and 3 match exp, sin, pow2; R^2 -2.0 on seed 1), while their chains differ.
`details` holds one row per edge: layer, in, out, the chosen function and its affine
constants a, b, c, d.

Applicability. Only adapters that provide symbolic fitting (a `symbolic` method: KAN) with
scalar inputs (a KAN reading one-hot tokens has a formula in indicator variables, not in x),
and only tasks with a continuous target (`target_values`, `input_values`, `formula`:
`regression`). Everything else is not applicable, with the reason in one line.

What it cannot detect. R^2 measures values, not form: a formula of another form with the
right values (exp(a)exp(b) for exp(a + b), a polynomial that matches sin on [-1, 1]) scores
as high as the true one; `formula_match` compares only the set of elementary functions and
`structure_match` only how they nest over the variables, neither the constants (sin(3 x_1)
matches sin(pi x_1)). A formula that is right only where the inputs lie (the grid on
[-1, 1]) is not tested elsewhere. pykan's library bounds what can be found:
a function outside it (a Bessel function) is approximated by the best library fit, and the
edge-by-edge fit composes per-edge errors, so a network that computes y well can still get a
poor formula (r2_network high, r2_symbolic low). The random-init control has a formula too
(random splines fitted by library functions); it predicts y no better than a constant.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch

from archbench.technique import Result, Technique


def _function_name(node) -> str | None:
    """The elementary function a sympy node applies, or None (sums, products, atoms)."""
    import sympy

    if isinstance(node, sympy.Function):
        return type(node).__name__.lower()  # exp, sin, tanh, abs (sympy's Abs)
    if isinstance(node, sympy.Pow):
        if node.exp.is_Number:
            v = float(node.exp)
            return f"pow{int(v)}" if v == int(v) else f"pow{v:g}"
        return "pow"
    return None


def elementary_functions(expr) -> set[str]:
    """The elementary functions in a sympy expression: {"exp", "sin", "pow2", ...}.

    Applied functions by lower-case name (sympy's Abs -> "abs"), powers with a numeric
    exponent as pow{e} (x**2 -> "pow2", x**0.5 -> "pow0.5"), others as "pow"; the exponent
    -1 of a quotient counts as "pow-1". Numbers and symbols (pi, x_1) are not functions.
    """
    import sympy

    return {name for node in sympy.preorder_traversal(expr) if (name := _function_name(node))}


def function_chains(expr) -> set[str]:
    """How the functions nest: per occurrence of a variable, the functions from the root down
    to it, ignoring sums and products: exp(sin(pi x_1) + x_2^2) -> {"x_1: exp > sin",
    "x_2: exp > pow2"}."""
    chains = set()

    def visit(node, chain: tuple[str, ...]) -> None:
        if node.is_Symbol:
            chains.add(f"{node}: {' > '.join(chain)}")
            return
        name = _function_name(node)
        for arg in node.args:
            visit(arg, chain + (name,) if name else chain)

    visit(expr, ())
    return chains


def round_constants(expr, digits: int):
    """Every float constant of `expr` rounded to `digits` significant digits."""
    import sympy

    return expr.xreplace({f: sympy.Float(float(f"{float(f):.{digits}g}")) for f in expr.atoms(sympy.Float)})


def _values(expr, names, x: np.ndarray) -> np.ndarray:
    """A sympy expression evaluated on inputs x (n, T): (n,) float64."""
    import sympy

    if not expr.free_symbols:
        return np.full(len(x), float(expr))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = sympy.lambdify(names, expr, "numpy")(*x.T)
    return np.broadcast_to(np.asarray(out, dtype=np.float64), (len(x),))  # (n,)


def drop_negligible(expr, names, x: np.ndarray, scale: float, tol: float):
    """`expr` with every summand that barely matters replaced by its mean, at every depth.

    Summands of every sum in the expression, outermost first, are tried in turn: one is
    replaced by its mean over the inputs x (n, T) when the whole formula's output then stays
    within RMS `tol * scale` of the original (the changes accumulate: the bound holds for all
    replacements together). pykan fits every edge, so an edge the network hardly uses still
    contributes a term like 1e-4 * x_1 or 4e-4 * exp(6e-4 x_1); deciding by effect on the
    output, not by the size of a coefficient, keeps a small coefficient on a large inner
    term (0.014 (8.6 x_2)^2 = 1.04 x_2^2), and a formula whose every term is small beside the
    target's spread (a random-init network's) becomes a constant.
    """
    import sympy

    reference = _values(expr, names, x)  # (n,)
    current = expr
    summands = [t for node in sympy.preorder_traversal(expr) if isinstance(node, sympy.Add)
                for t in node.args if t.free_symbols]
    for term in dict.fromkeys(summands):  # outermost first, each once
        mean = _values(term, names, x).mean()
        if not np.isfinite(mean):
            continue
        trial = current.xreplace({term: sympy.Float(float(mean))})
        change = _values(trial, names, x) - reference  # (n,)
        if np.isfinite(change).all() and np.sqrt((change ** 2).mean()) <= tol * scale:
            current = trial
    return current


def r2_per_example(y_hat: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,), (n,) -> (n,): 1 - (y_hat - y)^2 / Var(y), whose mean is R^2 (Var divides by n)."""
    return 1.0 - (y_hat - y) ** 2 / y.var()  # (n,)


class Symbolic(Technique):
    name = "symbolic"
    # n_fit train draws fit the edges (pykan fits each edge on its activations), n_test test
    # draws score the formula; both deduplicated. term_tol: the readable formula's summands
    # become constants while its output stays within RMS term_tol * std(y) of the fitted
    # formula's; digits: its constants' significant digits.
    default_config = {"n_fit": 256, "n_test": 1024, "lib": ["x", "x^2", "sin", "exp", "tanh", "abs"],
                      "weight_simple": 0.8, "term_tol": 0.01, "digits": 3}

    def why_not(self, adapter, task) -> str | None:
        missing = [a for a in ("target_values", "input_values", "formula") if not hasattr(task, a)]
        if missing:
            return f"task {task.name} has no continuous target to fit a formula to (no {', '.join(missing)})"
        if not callable(getattr(adapter, "symbolic", None)):
            return f"{adapter.family} has no symbolic fitting (pykan's auto_symbolic is the KAN family's)"
        if not getattr(adapter, "value_input", False):
            return f"{adapter.family} reads one-hot tokens here: its formula would be in indicators, not in x"
        return super().why_not(adapter, task)

    def run(self, adapter, task, seed: int) -> Result:
        import sympy

        cfg = self.config
        fit_tokens = torch.unique(task.sample(cfg["n_fit"], seed, "train").tokens, dim=0)  # (n_fit', T)
        test_tokens = torch.unique(task.sample(cfg["n_test"], seed, "test").tokens, dim=0)  # (n, T)
        formulas, symbolic_copy = adapter.symbolic(fit_tokens, lib=tuple(cfg["lib"]),
                                                   weight_simple=cfg["weight_simple"])
        expr = formulas[0]
        true_expr, names = task.sympy_formula()

        x = task.input_values(test_tokens).numpy()  # (n, T) float64
        y = task.target_values(test_tokens).numpy()  # (n,) float64
        y_sym = _values(expr, names, x).copy()  # (n,)
        y_sym[~np.isfinite(y_sym)] = 0.0
        y_net = adapter.predict_values(test_tokens).double().numpy()  # (n,)
        per_example = r2_per_example(y_sym, y)  # (n,)
        r2_network = float(r2_per_example(y_net, y).mean())

        with contextlib.redirect_stdout(io.StringIO()):
            kept = drop_negligible(expr, names, x, float(y.std()), cfg["term_tol"])
            readable = sympy.simplify(round_constants(kept, cfg["digits"]))
        found, true = elementary_functions(readable), elementary_functions(true_expr)
        chains_found, chains_true = function_chains(readable), function_chains(true_expr)
        kan = symbolic_copy.kan
        details = []
        for layer, fun in enumerate(kan.symbolic_fun):
            for j in range(fun.out_dim):
                for i in range(fun.in_dim):
                    if float(fun.mask[j, i]) == 0:
                        continue
                    a, b, c, d = (float(v) for v in fun.affine[j, i])
                    details.append({"layer": layer, "in": i, "out": j, "function": fun.funs_name[j][i],
                                    "a": a, "b": b, "c": c, "d": d})
        metrics = {"formula": str(readable), "formula_raw": str(expr), "formula_true": str(true_expr),
                   "r2_symbolic": float(per_example.mean()), "r2_network": r2_network,
                   "functions_found": sorted(found), "functions_true": sorted(true),
                   "formula_match": found == true, "chains_found": sorted(chains_found),
                   "chains_true": sorted(chains_true), "structure_match": chains_found == chains_true,
                   "n_edges": len(details),
                   "n_fit": len(fit_tokens), "n_test": len(test_tokens)}
        return Result.from_per_example(per_example, metrics=metrics, details=details)

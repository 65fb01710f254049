"""Linear CKA: how similar is a site's representation to the task's ground truth, or to another model's?

Linear centred kernel alignment (Kornblith et al. 2019, "Similarity of neural network
representations revisited"): CKA(X, Y) = <K, L>_F / (||K||_F ||L||_F) for the centred Gram
matrices K = Xc Xc^T, L = Yc Yc^T; invariant to rotation and isotropic scaling.

Per cell: X is a `stream` or `state` site's activation at the answer position (`adapter.answer_position`) on test
examples, Y the one-hot of the primary variable, and the score is the largest CKA over the
sites (the deepest is excluded when there is another, as in patching: it is the readout's
input, so any model that solves the task represents the answer there). CKA is not a mean
over examples, so `per_example` holds leave-one-out jackknife pseudo-values
n*theta - (n-1)*theta_(-i), re-centred so that their mean is the score theta; their spread
is the jackknife's. All leave-one-out values come from the full Grams in O(n^2).

Across architectures: every cell also stores the normalised centred Gram matrix of its best
site on the first `n_gram` test examples (the same inputs for every architecture of a task
and seed), from which the report computes exact linear CKA between architectures
(`cka_from_packed`) without rerunning a model. `cka_matrix(adapters, task, seed)` returns a long-form DataFrame of
CKA between every pair of sites of every pair of adapters (and the ground truth, arch
"task"), on the same examples; `df.groupby(["arch_a", "arch_b"]).cka.max().unstack()` gives
an architecture x architecture table.
"""

from __future__ import annotations

import pandas as pd
import torch

from archbench.technique import Result, Technique

SITE_ROLES = ("stream", "state")


def _hsic_loo(g: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tr(H G H L) on all n rows and leaving out each row i: raw Grams (n, n) -> (), (n,)."""
    n = g.shape[0]
    r, q = g.sum(1), l.sum(1)  # (n,)
    gl = g * l  # (n, n)
    full = gl.sum() - 2 * (r @ q) / n + g.sum() * l.sum() / n**2
    m = n - 1
    t = gl.sum() - 2 * gl.sum(1) + gl.diagonal()  # (n,) sum over the kept block of G*L
    rs, qs = r - g.diagonal(), q - l.diagonal()  # (n,) row sums of row i over kept columns
    cross = (r @ q) - l @ r - g @ q + gl.sum(1) - rs * qs  # (n,) sum_a (r_a - G_ai)(q_a - L_ai), a != i
    sg = g.sum() - 2 * r + g.diagonal()  # (n,)
    sl = l.sum() - 2 * q + l.diagonal()  # (n,)
    return full, t - 2 * cross / m + sg * sl / m**2


def linear_cka(x: torch.Tensor, y: torch.Tensor, loo: bool = False):
    """CKA of x (n, F) and y (n, G); with loo=True also the (n,) leave-one-out values."""
    g, l = x.double() @ x.double().T, y.double() @ y.double().T  # (n, n), (n, n)
    (xy, xy_i), (xx, xx_i), (yy, yy_i) = _hsic_loo(g, l), _hsic_loo(g, g), _hsic_loo(l, l)
    theta = xy / (xx * yy).sqrt().clamp_min(1e-30)
    if not loo:
        return float(theta)
    return float(theta), xy_i / (xx_i * yy_i).sqrt().clamp_min(1e-30)


def _primary(ex, task) -> torch.Tensor:
    lat = ex.latents[task.primary]
    y = lat if lat.dim() == 1 else lat[:, task.primary_position]  # (n,)
    return (y[:, None] == torch.unique(y)[None]).double()  # (n, C) one-hot


def normalised_gram(x: torch.Tensor) -> torch.Tensor:
    """The centred Gram matrix of x (n, F) scaled to unit Frobenius norm: (n, n).

    Linear CKA of two representations of the same n inputs is the Frobenius inner product
    of their normalised Grams, so a stored Gram lets the report compare architectures
    exactly without rerunning either model.
    """
    xc = x.double() - x.double().mean(0)  # (n, F)
    g = xc @ xc.T  # (n, n)
    return g / g.norm().clamp_min(1e-30)


def pack_gram(g: torch.Tensor) -> list[float]:
    """Upper triangle (diagonal included) of a symmetric (n, n) matrix, row-major."""
    i, j = torch.triu_indices(len(g), len(g))
    return [round(v, 6) for v in g[i, j].tolist()]


def cka_from_packed(a: list[float], b: list[float], n: int) -> float:
    """Linear CKA of two normalised Grams stored by `pack_gram` (same n inputs)."""
    a_, b_ = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    i, j = torch.triu_indices(n, n)
    weight = torch.where(i == j, 1.0, 2.0).double()  # off-diagonal entries appear twice
    return float((weight * a_ * b_).sum())


class CKA(Technique):
    name = "cka"
    representation = True
    roles = frozenset(SITE_ROLES)
    # n_gram: the first n_gram test examples' normalised Gram of the best site is stored
    # (about n_gram^2 / 2 numbers) for the report's architecture x architecture table
    default_config = {"n_test": 512, "n_gram": 64}

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        test = task.sample(self.config["n_test"], seed, "test")
        names = adapter.names(list(SITE_ROLES))
        acts = adapter.run(test.tokens, cache=names).cache  # name -> (n, T, *f)
        y = _primary(test, task)  # (n, C)
        deepest = max(names, key=lambda nm: adapter.specs[nm].layer or 0)
        details, loo = [], {}
        at = adapter.answer_position(task.seq_len)
        for nm in names:
            theta, loo[nm] = linear_cka(acts[nm][:, at].flatten(1), y, loo=True)
            details.append({"site": nm, "role": adapter.specs[nm].role, "layer": adapter.specs[nm].layer,
                            "cka": theta, "scored": nm != deepest or len(names) == 1})
        best = max((d for d in details if d["scored"]), key=lambda d: d["cka"])
        n, theta = len(test), best["cka"]
        pseudo = n * theta - (n - 1) * loo[best["site"]]  # (n,)
        pseudo = pseudo - pseudo.mean() + theta
        return Result.from_per_example(
            pseudo.tolist(), details=details,
            metrics={"best_site": best["site"], "best_layer": best["layer"],
                     "deepest_site_cka": next(d["cka"] for d in details if d["site"] == deepest),
                     "jackknife_se": float(pseudo.std() / n ** 0.5),
                     "gram_n": min(self.config["n_gram"], n),
                     "gram": pack_gram(normalised_gram(acts[best["site"]][:self.config["n_gram"], at].flatten(1)))})


@torch.no_grad()
def cka_matrix(adapters: dict, task, seed: int, n: int = 512, roles=("embed",) + SITE_ROLES) -> pd.DataFrame:
    """Long-form CKA between every site pair of every adapter pair (plus the ground truth)."""
    test = task.sample(n, seed, "test")
    reps = {("task", task.primary): (_primary(test, task), None)}
    for arch, adapter in adapters.items():
        names = adapter.names(list(roles))
        acts = adapter.run(test.tokens, cache=names).cache
        for nm in names:
            at = adapter.answer_position(task.seq_len)
            reps[(arch, nm)] = (acts[nm][:, at].flatten(1), adapter.specs[nm].layer)
    keys = list(reps)
    rows = []
    for i, a in enumerate(keys):
        for b in keys[i:]:
            c = linear_cka(reps[a][0], reps[b][0])
            for (p, q) in ((a, b), (b, a)) if a != b else ((a, b),):
                rows.append({"arch_a": p[0], "site_a": p[1], "layer_a": reps[p][1],
                             "arch_b": q[0], "site_b": q[1], "layer_b": reps[q][1], "cka": c})
    return pd.DataFrame(rows)

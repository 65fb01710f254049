"""CKA: how similar is a site's representation to the task's ground truth, or to another model's?

What it measures. Linear centred kernel alignment (Kornblith et al. 2019, "Similarity of
neural network representations revisited") between a `stream` or `state` site's activation
at the answer position (`adapter.answer_position`) and Y, the one-hot of the primary
variable: how much of the site's linear (Gram) geometry is the variable's. The score is the
*debiased* estimator: CKA = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)) with HSIC_1 the
unbiased HSIC of Song et al. 2012 ("Feature selection via dependence maximization"), as
mentioned by Kornblith et al. 2019 and studied as debiased CKA by Davari et al. 2023
("Reliability of CKA as a similarity measure in deep learning"). The ordinary (biased)
estimator, <HKH, HLH>_F / (||HKH|| ||HLH||), is inflated when features outnumber examples:
two independent random representations of n inputs in F >> n dimensions score near 1
against each other and well above 0 against Y; the debiased one is ~0 for independent
representations whatever the width.

Sites. Only representation sites (`representation_sites`: no raw embedding, no deepest
`stream` site, which feeds the readout, where any model that solves the task represents the
answer). The scored site is the one with the highest debiased CKA on `n_select` train
examples; its value on the `n_test` test examples is the score, so choosing among sites is
not a maximum over test noise. Activations are not projected: the Gram matrix is exact and
costs O(n^2 F) (0.5 GFLOP for a 512 x 2048 Mamba state), so a projection could only lose
accuracy (`metrics["projection"]` says so).

Chance level and per_example. ~0 for a representation independent of the variable (it can
be slightly negative; the score is clipped to [0, 1]). Any representation that carries the
input tokens, e.g. a random-init model's, is correlated with Y wherever Y is close to a
linear function of the inputs: the random-init control cell measures that floor (facts,
whose attribute is a function of 32 input keys: 0.38 on a random-init Mamba's layer-0 state,
0.39 on the trained one; 0.10 against 0.61 on a 2-layer transformer). CKA is not
a mean over examples, so `per_example` holds leave-one-out jackknife pseudo-values
n*theta - (n-1)*theta_(-i), re-centred so that their mean is the score theta; all
leave-one-out values come from the full Grams in O(n^2).

What it cannot detect. CKA is dominated by high-variance directions: a variable held in a
low-variance subspace of a site scores low although a probe decodes it. It is not causal.

Across architectures: every cell also stores, as `metrics["gram"]` (with `gram_n`), the
ordinary normalised centred Gram matrix (the biased estimator's, not the debiased one) of
its scored site on the first `n_gram` test examples (the same inputs for every architecture
of a task and seed), from which the report computes exact ordinary linear CKA between
architectures (`cka_from_packed`) without rerunning a model; `metrics["cka_biased"]` is the
ordinary CKA with Y at that site. `cka_matrix(adapters, task, seed)` returns a long-form
DataFrame of ordinary (`cka`) and debiased (`cka_debiased`) CKA between every pair of sites
of every pair of adapters (and the ground truth, arch "task"), on the same examples.
The report's architecture-similarity table (`CKA.report_tables`) is built in
`techniques/cka_similarity.py`.
"""

from __future__ import annotations

import pandas as pd
import torch

from archbench.technique import Result, Technique
from archbench.technique_helpers import (REPRESENTATION_ROLES, no_representation_site, one_hot, primary_value,
                                         representation_names, representation_sites)


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


def _hsic_unbiased_loo(k: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased HSIC (Song et al. 2012) on all n rows and leaving out each row: (n, n) -> (), (n,).

    HSIC_1 = [tr(AB) + 1'A1 1'B1 / ((n-1)(n-2)) - 2/(n-2) 1'AB1] / (n(n-3)), A and B the
    Grams with zeroed diagonals.
    """
    a = k - torch.diag_embed(k.diagonal())  # (n, n)
    b = l - torch.diag_embed(l.diagonal())  # (n, n)
    n = a.shape[0]
    ra, rb = a.sum(1), b.sum(1)  # (n,)
    ab = a * b  # (n, n)
    t, sa, sb, cross = ab.sum(), ra.sum(), rb.sum(), ra @ rb

    def hsic(t, sa, sb, cross, n):
        return (t + sa * sb / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))

    t_i = t - 2 * ab.sum(1)  # (n,)
    sa_i, sb_i = sa - 2 * ra, sb - 2 * rb  # (n,)
    cross_i = cross - b @ ra - a @ rb + ab.sum(1) - ra * rb  # (n,) sum_{c != i} (ra_c - a_ci)(rb_c - b_ci)
    return hsic(t, sa, sb, cross, n), hsic(t_i, sa_i, sb_i, cross_i, n - 1)


def debiased_cka(x: torch.Tensor, y: torch.Tensor, loo: bool = False):
    """Debiased linear CKA of x (n, F) and y (n, G), n >= 5; with loo=True also (n,) leave-one-out values."""
    # HSIC_1 is invariant to a shift of x or y (leave-one-out values too); centring first
    # keeps huge constant features (RWKV's -1e38 sentinels) from cancelling catastrophically
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    g, l = x @ x.T, y @ y.T  # (n, n), (n, n)
    (xy, xy_i), (xx, xx_i), (yy, yy_i) = (_hsic_unbiased_loo(g, l), _hsic_unbiased_loo(g, g),
                                          _hsic_unbiased_loo(l, l))
    theta = xy / (xx.clamp_min(1e-30) * yy.clamp_min(1e-30)).sqrt()
    if not loo:
        return float(theta)
    return float(theta), xy_i / (xx_i.clamp_min(1e-30) * yy_i.clamp_min(1e-30)).sqrt()


def _primary(ex, task) -> torch.Tensor:
    """The one-hot primary variable of a sample: (n, C), C its distinct values."""
    y = primary_value(ex.latents, task)  # (n,)
    return one_hot(y, torch.unique(y))  # (n, C)


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
    version = 2
    control_floor = ("where the variable is a function of a few input tokens (facts: the attribute of one "
                     "of 32 subject-relation pairs), every example with the same pair has the same state "
                     "in any model, random-init included, so the state's Gram matrix already aligns with "
                     "the variable's: random-init Mamba, Mamba-2 and RWKV controls score 0.35-0.37 on facts.")
    representation = True
    roles = frozenset(REPRESENTATION_ROLES)
    # n_gram: the first n_gram test examples' normalised Gram of the scored site is stored
    # (about n_gram^2 / 2 numbers) for the report's architecture x architecture table;
    # n_select: train examples on which the scored site is chosen
    default_config = {"n_test": 512, "n_gram": 64, "n_select": 512}
    checkpoint_config = {"n_test": 128, "n_select": 128}  # a checkpoint's row
    depth_value = "cka"

    @classmethod
    def report_tables(cls, cells: pd.DataFrame, reference: str) -> list:
        """The architecture-similarity table (`techniques/cka_similarity.py`)."""
        from archbench.techniques.cka_similarity import similarity

        table = similarity(cells, reference)
        return [] if table is None else [table]

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        all_names = representation_names(adapter)
        scored = set(representation_sites(adapter, all_names))
        names = [nm for nm in all_names if adapter.specs[nm].role in REPRESENTATION_ROLES]
        if not scored:
            return Result.not_applicable(no_representation_site(adapter))
        test, select = task.sample(cfg["n_test"], seed, "test"), task.sample(cfg["n_select"], seed, "train")
        at = adapter.answer_position(task.seq_len)
        acts = adapter.run(test.tokens, cache=names).cache  # name -> (n, T, *f)
        acts_sel = adapter.run(select.tokens, cache=sorted(scored)).cache
        y, y_sel = _primary(test, task), _primary(select, task)  # (n, C), (n_sel, C')
        details, loo = [], {}
        for nm in names:
            x = acts[nm][:, at].flatten(1)  # (n, F)
            theta, loo[nm] = debiased_cka(x, y, loo=True)
            row = {"site": nm, "role": adapter.specs[nm].role, "layer": adapter.specs[nm].layer,
                   "cka": theta, "cka_biased": linear_cka(x, y), "scored": nm in scored}
            if nm in scored:
                row["cka_select"] = debiased_cka(acts_sel[nm][:, at].flatten(1), y_sel)
            details.append(row)
        best = max((d for d in details if d["scored"]), key=lambda d: d["cka_select"])
        n, theta = len(test), best["cka"]
        pseudo = n * theta - (n - 1) * loo[best["site"]]  # (n,)
        pseudo = pseudo - pseudo.mean() + theta
        deepest = [d["cka"] for d in details if not d["scored"]]
        return Result.from_per_example(
            pseudo.tolist(), details=details,
            metrics={"best_site": best["site"], "best_layer": best["layer"], "cka_biased": best["cka_biased"],
                     "deepest_site_cka": deepest[0] if deepest else None,
                     "excluded_sites": sorted(set(all_names) - scored),
                     "jackknife_se": float(pseudo.std() / n ** 0.5),
                     "projection": {"method": "none", "reason": "the Gram matrix is exact at full width"},
                     "gram_n": min(cfg["n_gram"], n),
                     "gram": pack_gram(normalised_gram(acts[best["site"]][:cfg["n_gram"], at].flatten(1)))})


@torch.no_grad()
def cka_matrix(adapters: dict, task, seed: int, n: int = 512,
               roles=("embed",) + REPRESENTATION_ROLES) -> pd.DataFrame:
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
            c, d = linear_cka(reps[a][0], reps[b][0]), debiased_cka(reps[a][0], reps[b][0])
            for (p, q) in ((a, b), (b, a)) if a != b else ((a, b),):
                rows.append({"arch_a": p[0], "site_a": p[1], "layer_a": reps[p][1],
                             "arch_b": q[0], "site_b": q[1], "layer_b": reps[q][1], "cka": c,
                             "cka_debiased": d})
    return pd.DataFrame(rows)

"""Component ablation and a faithfulness curve: which components carry the behaviour?

Components. Every hook point with role `mixer` or `mlp` is a component: one token-mixing
and/or one channel-mixing output per block, the same granularity in every family. Roles
nested inside a component (`expert`: one expert's output inside its block's MoE `mlp`
output; `attn_pattern`, `router`, `state`) are not components, so no computation is counted
twice and a family with more sub-modules does not get more components. Each component is
ablated alone three ways (Zero; Mean: the position-wise mean over train examples; Resample:
the activation of another test example, Chan et al. 2022 "Causal scrubbing"), and the drop
in held-out accuracy is recorded per component in `details` (Meyes et al. 2019, "Ablation
studies in artificial neural networks"; Wang et al. 2023, "Interpretability in the wild").

Faithfulness curve (after the Mechanistic Interpretability Benchmark, Mueller et al. 2025,
"MIB"): components are ranked by their single mean-ablation effect on the *train* split
(accuracy drop, then log-prob drop as the tie-break); for k = 1..K the top-k components are
kept and all others mean-ablated, and the test accuracy acc_k is measured (accuracy counts
the answer token with the highest logit among the task's answer tokens). The curve's area
is the mean of acc_k over k = 1..K, the right Riemann sum over the kept fraction k/K in
(0, 1]; its ceiling is 1 for any K (a one-component mechanism ranked first holds accuracy 1
from k = 1). Above `max_points` components, k runs over `max_points` evenly spaced counts
(1 and K included) instead.

Score. The same curve for a *random* order on the same model is the chance level: the
expected area if the ranking carried no information. The top k of a uniformly random order
are a uniformly random size-k subset, so for each k it is the mean accuracy over every
size-k kept subset: exact while there are at most `random_subsets` of them, else estimated
from that many distinct subsets drawn with the cell's seed. The score is the chance-corrected area

    score = (area_ranked - area_random) / (1 - area_random),

the share of what a random order leaves unrecovered that the ranking recovers. The
all-ablated accuracy cancels out of it (normalising both curves by (acc_k - acc_0) /
(1 - acc_0) first gives the same number), and it does not depend on K: a perfect
single-component mechanism scores 1 among 2 or among 4 components, a mechanism that needs
every component scores 0 (every order gives the same curve), and any order as good as the
ranking scores 0. (The earlier score, the raw trapezoid over kept fractions 0, 1/4, ..., 1,
gave a mechanism that needs every component 0.375 with 2 components and 0.125 with 4.) The
denominator is floored at 0.05, so that on a model whose accuracy no ablation moves
(nothing to rank) sampling noise cannot become a large score. `per_example`
holds each test example's (ranked mean correctness - its mean correctness over the random
subsets) / (1 - area_random); their mean is the score. `area_ranked` and `area_random` are
in `metrics`, with both curves and MIB's own normalisation `faithfulness_mib` (trapezoid of
(acc_k - acc_0) / (acc_clean - acc_0) over k/K from 0; None when the clean model does not
beat the all-ablated one by 0.05).

Chance level: 0 (the ranking is no better than a random order); a random-init control at
chance everywhere has area_ranked = area_random and scores about 0. The ceiling 1 assumes a
perfect clean model: a clean accuracy below 1 caps the score below 1.

What it cannot detect: mechanisms below component granularity (one head, one expert, one
neuron, a direction inside a component) or spread over positions (every component is
ablated at every position at once); interactions that single-component ranking misses (two
redundant components each look useless alone and are ranked low, so a backup circuit
lowers the score although the curve could be steep in another order); whether the kept
components compute the task's known variables, as opposed to carrying the answer; and
anything mean ablation hides (a component whose mean is what the model needs looks
unimportant; off-distribution mean activations can break a model that uses a component
only weakly).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from archbench.technique import Result, Technique
from archbench.technique_helpers import answer_prediction

COMPONENT_ROLES = ("mixer", "mlp")
DENOMINATOR_FLOOR = 0.05


def _replacer(rows: torch.Tensor, fill: torch.Tensor, copies: int):
    """Callable intervention: rows (copies*n,) bool take `fill` (n, T, *f), the others run clean."""
    def fn(act, spec):
        new = fill.to(act).repeat(copies, *([1] * (act.dim() - 1)))  # (copies*n, T, *f)
        mask = rows.to(act.device).view(-1, *([1] * (act.dim() - 1)))  # (copies*n, 1, ...)
        return torch.where(mask, new, act)
    return fn


def _evaluate(adapter, task, tokens, answer, ablate, fills, names, max_rows):
    """Config c replaces component k by fills[k] where ablate[c, k]: -> correct, logp, each (C, n)."""
    n = len(tokens)
    chunk = max(1, max_rows // n)
    correct, logp = [], []
    for start in range(0, ablate.shape[0], chunk):
        block = ablate[start:start + chunk]  # (c, K)
        c = block.shape[0]
        ivs = {name: _replacer(block[:, k].repeat_interleave(n), fills[k], c)
               for k, name in enumerate(names) if bool(block[:, k].any())}
        logits = adapter.run(tokens.repeat(c, 1), interventions=ivs).logits[:, -1]  # (c*n, V)
        correct.append((answer_prediction(logits, task) == answer.repeat(c)).float().view(c, n))
        logp.append(logits.log_softmax(-1).gather(1, answer.repeat(c)[:, None]).view(c, n))
    return torch.cat(correct), torch.cat(logp)  # (C, n), (C, n)


def kept_counts(K: int, max_points: int) -> list[int]:
    """The curve's kept counts: 1..K, or `max_points` evenly spaced counts ending at K."""
    if K <= max_points:
        return list(range(1, K + 1))
    return sorted({int(round(x)) for x in np.linspace(1, K, max_points)})


def random_subsets(K: int, k: int, limit: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Every size-k subset of range(K) if there are at most `limit`, else `limit` distinct drawn ones."""
    if math.comb(K, k) <= limit:
        return list(itertools.combinations(range(K), k))
    drawn: set[tuple[int, ...]] = set()
    while len(drawn) < limit:
        drawn.add(tuple(sorted(rng.choice(K, size=k, replace=False).tolist())))
    return sorted(drawn)


class Ablation(Technique):
    name = "ablation"
    version = 2
    roles = frozenset(COMPONENT_ROLES)
    # random_subsets: kept subsets per k for the random-order curve (exact below that);
    # max_points: kept counts on the curve at most
    default_config = {"n_train": 256, "n_test": 512, "max_rows": 8192, "random_subsets": 16,
                      "max_points": 16}
    # a checkpoint's row: every component costs a forward per example and per ablation
    checkpoint_config = {"n_train": 32, "n_test": 32, "random_subsets": 2, "max_points": 8}
    depth_value = "mean_effect"  # accuracy drop when the component alone is mean-ablated

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        names = adapter.names(list(COMPONENT_ROLES))
        K = len(names)
        if K < 2:
            return Result.not_applicable(f"{adapter.family}: {K} component(s), nothing to order")
        train = task.sample(cfg["n_train"], seed, "train")
        test = task.sample(cfg["n_test"], seed, "test")
        acts_train = adapter.run(train.tokens, cache=names).cache  # name -> (N, T, *f)
        acts_test = adapter.run(test.tokens, cache=names).cache  # name -> (M, T, *f)
        other = adapter.run(test.tokens.roll(1, 0), cache=names).cache  # another example's acts
        mean = {nm: acts_train[nm].mean(0, keepdim=True) for nm in names}  # (1, T, *f)
        singles = torch.cat([torch.zeros(1, K, dtype=torch.bool), torch.eye(K, dtype=torch.bool)])
        run = lambda ex, ablate, fills: _evaluate(adapter, task, ex.tokens, ex.answer, ablate, fills,
                                                  names, cfg["max_rows"])

        # Rank on the train split by single-component mean ablation.
        c_tr, lp_tr = run(train, singles, [mean[nm].expand_as(acts_train[nm]) for nm in names])
        acc_drop = c_tr[0].mean() - c_tr[1:].mean(1)  # (K,)
        lp_drop = lp_tr[0].mean() - lp_tr[1:].mean(1)  # (K,)
        order = sorted(range(K), key=lambda k: (-float(acc_drop[k]), -float(lp_drop[k])))

        # Curves on the test split: ranked top-k kept, and every (or a drawn set of) size-k subset.
        ks = kept_counts(K, cfg["max_points"])
        rng = np.random.default_rng([seed, 0xAB1A])
        ranked = torch.ones(len(ks), K, dtype=torch.bool)  # (P, K) True = ablated
        rand_rows, rand_of = [], []  # ablation rows of the random curve, and the point of each
        for p, k in enumerate(ks):
            ranked[p, order[:k]] = False
            if k < K:
                for subset in random_subsets(K, k, cfg["random_subsets"], rng):
                    row = torch.ones(K, dtype=torch.bool)
                    row[list(subset)] = False
                    rand_rows.append(row)
                    rand_of.append(p)
        rand = torch.stack(rand_rows) if rand_rows else torch.zeros(0, K, dtype=torch.bool)
        everything = torch.ones(1, K, dtype=torch.bool)
        mean_fill = [mean[nm].expand_as(acts_test[nm]) for nm in names]
        c_mean, _ = run(test, torch.cat([singles, everything, ranked, rand]), mean_fill)
        c_zero, _ = run(test, singles[1:], [torch.zeros_like(acts_test[nm]) for nm in names])
        c_res, _ = run(test, singles[1:], [other[nm] for nm in names])
        clean, none = c_mean[0], c_mean[1 + K]  # (M,), (M,)
        rank_c = c_mean[2 + K:2 + K + len(ks)]  # (P, M)
        rand_c = c_mean[2 + K + len(ks):]  # (R, M)

        # Random curve per example: the mean over the subsets of each k (k = K is the clean model).
        of = torch.tensor(rand_of, dtype=torch.long)
        rand_curve = torch.stack([rand_c[of == p].mean(0) if ks[p] < K else clean
                                  for p in range(len(ks))])  # (P, M)
        area_rank_ex, area_rand_ex = rank_c.mean(0), rand_curve.mean(0)  # (M,), (M,)
        area_ranked, area_random = float(area_rank_ex.mean()), float(area_rand_ex.mean())
        denom = max(1.0 - area_random, DENOMINATOR_FLOOR)
        per_example = (area_rank_ex - area_rand_ex) / denom  # (M,)

        acc_clean, acc_none = float(clean.mean()), float(none.mean())
        curve_acc, curve_rand = rank_c.mean(1), rand_curve.mean(1)  # (P,), (P,)
        mib = None
        if acc_clean - acc_none > 0.05:
            x = np.array([0.0] + [k / K for k in ks])
            y = np.array([0.0] + ((curve_acc - acc_none) / (acc_clean - acc_none)).tolist())
            mib = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
        details = []
        for k, nm in enumerate(names):
            spec = adapter.specs[nm]
            details.append({"site": nm, "role": spec.role, "layer": spec.layer,
                            "rank": order.index(k), "rank_effect": float(acc_drop[k]),
                            "zero_effect": acc_clean - float(c_zero[k].mean()),
                            "mean_effect": acc_clean - float(c_mean[1 + k].mean()),
                            "resample_effect": acc_clean - float(c_res[k].mean())})
        return Result.from_per_example(
            per_example.tolist(), details=details,
            metrics={"accuracy_clean": acc_clean, "accuracy_all_ablated": acc_none,
                     "area_ranked": area_ranked, "area_random": area_random,
                     "curve_kept": ks, "curve_accuracy": curve_acc.tolist(),
                     "curve_accuracy_random": curve_rand.tolist(),
                     "random_subsets_per_point": [int((of == p).sum()) for p in range(len(ks))],
                     "faithfulness_mib": mib, "order": [names[k] for k in order],
                     "n_components": K})

"""Component ablation and a faithfulness curve: which components carry the behaviour?

Every hook point with role `mixer`, `mlp` or `expert` is a component. Each is ablated alone
three ways (Zero; Mean: the position-wise mean over train examples; Resample: the activation
of another test example, Chan et al. 2022 "Causal scrubbing"), and the drop in held-out
accuracy is recorded per component in `details` (Meyes et al. 2019, "Ablation studies in
artificial neural networks"; Wang et al. 2023, "Interpretability in the wild").

Scoring follows the faithfulness curves of the Mechanistic Interpretability Benchmark
(Mueller et al. 2025, "MIB"): components are ranked by their mean-ablation effect on the
*train* split (accuracy drop, then log-prob drop as the tie-break); for k in
{0, 25, 50, 75, 100}% the top-k% components are kept and all others mean-ablated, and the
test accuracy acc_k is measured. acc_0 (everything ablated) is the floor, typically chance
(1 / #answers) or the majority-class rate. The recovered fraction is
(acc_k - acc_0) / (1 - acc_0): MIB's (acc_k - acc_0) / (acc_clean - acc_0) when the clean
model is perfect, but it stays small, not noisy, when the clean model is at chance (a
random-init control has nothing to recover). The score is the trapezoid area under that
curve over k; `per_example` holds each test example's own trapezoid of
(correct_k - correct_0) / (1 - acc_0), so its mean is the score. A perfect single-component
mechanism among 4 components scores 0.875; a mechanism that needs every component, 0.125.
MIB's own normalisation is reported as `faithfulness_mib`.
"""

from __future__ import annotations

import math

import torch

from archbench.technique import Result, Technique

COMPONENT_ROLES = ("mixer", "mlp", "expert")
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
TRAPEZOID = torch.tensor([0.125, 0.25, 0.25, 0.25, 0.125])  # weights of FRACTIONS, sum 1


def _replacer(rows: torch.Tensor, fill: torch.Tensor, copies: int):
    """Callable intervention: rows (copies*n,) bool take `fill` (n, T, *f), the others run clean."""
    def fn(act, spec):
        new = fill.to(act).repeat(copies, *([1] * (act.dim() - 1)))  # (copies*n, T, *f)
        mask = rows.to(act.device).view(-1, *([1] * (act.dim() - 1)))  # (copies*n, 1, ...)
        return torch.where(mask, new, act)
    return fn


def _evaluate(adapter, tokens, answer, ablate, fills, names, max_rows):
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
        correct.append((logits.argmax(-1) == answer.repeat(c)).float().view(c, n))
        logp.append(logits.log_softmax(-1).gather(1, answer.repeat(c)[:, None]).view(c, n))
    return torch.cat(correct), torch.cat(logp)  # (C, n), (C, n)


class Ablation(Technique):
    name = "ablation"
    roles = frozenset(COMPONENT_ROLES)
    default_config = {"n_train": 256, "n_test": 512, "max_rows": 8192}

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        names = adapter.names(list(COMPONENT_ROLES))
        K = len(names)
        train = task.sample(cfg["n_train"], seed, "train")
        test = task.sample(cfg["n_test"], seed, "test")
        acts_train = adapter.run(train.tokens, cache=names).cache  # name -> (N, T, *f)
        acts_test = adapter.run(test.tokens, cache=names).cache  # name -> (M, T, *f)
        other = adapter.run(test.tokens.roll(1, 0), cache=names).cache  # another example's acts
        mean = {nm: acts_train[nm].mean(0, keepdim=True) for nm in names}  # (1, T, *f)
        singles = torch.cat([torch.zeros(1, K, dtype=torch.bool), torch.eye(K, dtype=torch.bool)])
        run = lambda ex, ablate, fills: _evaluate(adapter, ex.tokens, ex.answer, ablate, fills,
                                                  names, cfg["max_rows"])

        # Rank on the train split by single-component mean ablation.
        c_tr, lp_tr = run(train, singles, [mean[nm].expand_as(acts_train[nm]) for nm in names])
        acc_drop = c_tr[0].mean() - c_tr[1:].mean(1)  # (K,)
        lp_drop = lp_tr[0].mean() - lp_tr[1:].mean(1)  # (K,)
        order = sorted(range(K), key=lambda k: (-float(acc_drop[k]), -float(lp_drop[k])))

        # Test split: singles under zero / mean / resample, then the faithfulness curve.
        keeps = [math.floor(f * K + 0.5) for f in FRACTIONS]
        curve = torch.ones(len(FRACTIONS), K, dtype=torch.bool)  # (5, K) ablated
        for row, keep in enumerate(keeps):
            curve[row, order[:keep]] = False
        mean_fill = [mean[nm].expand_as(acts_test[nm]) for nm in names]
        c_mean, _ = run(test, torch.cat([singles, curve]), mean_fill)  # (1+K+5, M)
        c_zero, _ = run(test, singles[1:], [torch.zeros_like(acts_test[nm]) for nm in names])
        c_res, _ = run(test, singles[1:], [other[nm] for nm in names])
        clean, curve_c = c_mean[0], c_mean[1 + K:]  # (M,), (5, M)

        acc_clean, acc_none = float(clean.mean()), float(curve_c[0].mean())
        denom = max(1.0 - acc_none, 1e-6)
        per_example = (TRAPEZOID[:, None] * (curve_c - curve_c[0])).sum(0) / denom  # (M,)
        curve_acc = curve_c.mean(1)  # (5,)
        mib = None
        if acc_clean - acc_none > 0.05:
            f = (curve_acc - acc_none) / (acc_clean - acc_none)  # (5,)
            mib = float((TRAPEZOID * f).sum())
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
                     "curve_fractions": list(FRACTIONS), "curve_kept": keeps,
                     "curve_accuracy": curve_acc.tolist(), "faithfulness_mib": mib,
                     "order": [names[k] for k in order], "n_components": K})

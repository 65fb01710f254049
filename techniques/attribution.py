"""Input attribution: do attribution maps point at the input positions the answer depends on?

The input representation (the `embed` hook point) of each test example is replaced, through
a callable intervention, by a tensor that captum perturbs or differentiates; the attributed
output is the logit of the model's own prediction at the last position.
- With capability `gradients`: Integrated Gradients (Sundararajan et al. 2017, "Axiomatic
  attribution for deep networks"; 16 steps, Gauss-Legendre), batched over examples, with
  gradient x input (Shrikumar et al. 2017; Simonyan et al. 2014) as a secondary map.
- Without it: feature ablation over input positions (Zeiler & Fergus 2014, occlusion): each
  position's input representation in turn is replaced by the baseline.
Both use the all-zero input representation as the baseline (the usual IG baseline for
embeddings).
All through captum (Kokhlikyan et al. 2020).

Positions whose token never varies in the sample (the `=` of modadd, the query of count) are
left out of the score: they carry no information about the answer, and their attribution
reflects only the baseline (zeroing the last position's input is a large perturbation on any
model, so on a random-init control it dominates every map). A task with no varying
irrelevant position (modadd: only a and b vary, both relevant) is not applicable.

A position's attribution magnitude is |sum over features|. Scoring: AUROC of that magnitude
for separating the task's relevant positions (`Examples.relevant`) from the others, per
example; examples whose mask is all-true or all-false are excluded. The score is the mean
per-example AUROC (chance 0.5, ties count half; a model that ignores its input scores
exactly 0.5); the AUROC pooled over all (example, position) pairs is in `metrics`.
"""

from __future__ import annotations

import torch
from captum.attr import FeatureAblation, InputXGradient, IntegratedGradients

from archbench.technique import Result, Technique


def auroc_rows(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row AUROC (Mann-Whitney, ties 1/2): (n, T), (n, T) bool -> (n,), nan without both classes."""
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (n, T, T): s[a] - s[b]
    pair = labels.unsqueeze(2) & ~labels.unsqueeze(1)  # (n, T, T): a relevant, b not
    win = (diff > 0).double() + 0.5 * (diff == 0).double()  # (n, T, T)
    return (win * pair).sum((1, 2)) / pair.sum((1, 2)).double()  # (n,) nan where no pairs


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Pooled AUROC from average ranks: scores (N,), labels (N,) bool."""
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2).double()[inverse]  # (N,) 1-based average ranks
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


class Attribution(Technique):
    name = "attribution"
    roles = frozenset({"embed"})
    # internal_batch_size: rows per IG forward; it bounds the memory of backward passes
    # through per-step recurrent scans (4,096 took 3 GB on Mamba)
    default_config = {"n_examples": 128, "n_steps": 16, "internal_batch_size": 512}

    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        ex = task.sample(cfg["n_examples"], seed, "test")
        site = adapter.names("embed")[0]
        with torch.no_grad():
            clean = adapter.run(ex.tokens, cache=[site])
        emb = clean.cache[site]  # (n, T, *f)
        target = clean.logits[:, -1].argmax(-1)  # (n,) the model's own prediction

        def forward(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            out = adapter.run(tokens, interventions={site: lambda act, spec: x},
                              grad=torch.is_grad_enabled())
            return out.logits[:, -1]  # (rows, V)

        baseline = torch.zeros_like(emb)  # (n, T, *f)
        maps = {}
        if "gradients" in adapter.capabilities:
            method = "integrated_gradients"
            maps[method] = IntegratedGradients(forward).attribute(
                emb, baselines=baseline, target=target, additional_forward_args=(ex.tokens,),
                n_steps=cfg["n_steps"], internal_batch_size=cfg["internal_batch_size"])
            maps["gradient_x_input"] = InputXGradient(forward).attribute(
                emb.clone().requires_grad_(True), target=target, additional_forward_args=(ex.tokens,))
        else:
            method = "feature_ablation"
            P = emb.shape[1]
            groups = torch.arange(P).view(1, P, *([1] * (emb.dim() - 2))).expand(1, *emb.shape[1:])
            with torch.no_grad():
                maps[method] = FeatureAblation(forward).attribute(
                    emb, baselines=0.0, target=target, additional_forward_args=(ex.tokens,),
                    feature_mask=groups, perturbations_per_eval=P)

        T = ex.tokens.shape[1]  # positions an adapter appends after the input (an answer slot) are not scored
        if emb.shape[1] < T:
            return Result.not_applicable(f"{adapter.family}: the embed site has fewer positions than the input")
        varying = (ex.tokens != ex.tokens[:1]).any(0)  # (T,) positions whose token ever changes
        rel = ex.relevant[:, varying]  # (n, T')
        mixed = rel.any(1) & ~rel.all(1)  # (n,) both classes present
        if not bool(mixed.any()):
            return Result.not_applicable(f"{task.name}: no example has both relevant and irrelevant "
                                         "positions among the positions whose token varies")
        metrics, per_ex = {"method": method, "constant_positions": (~varying).nonzero().flatten().tolist()}, None
        for key, attr in maps.items():
            mag = attr.detach().flatten(2).sum(-1).abs()[:, :T][:, varying]  # (n, T') per position
            rows = auroc_rows(mag[mixed], rel[mixed])  # (n_mixed,)
            metrics[f"{key}_auroc"] = float(rows.mean())
            metrics[f"{key}_auroc_pooled"] = auroc(mag[mixed].flatten(), rel[mixed].flatten())
            metrics[f"{key}_mass_on_relevant"] = float(
                (mag[mixed] * rel[mixed]).sum() / mag[mixed].sum().clamp_min(1e-12))
            if key == method:
                per_ex = rows
        metrics["n_examples_used"] = int(mixed.sum())
        metrics["n_examples_excluded"] = int((~mixed).sum())
        return Result.from_per_example(per_ex.tolist(), metrics=metrics)

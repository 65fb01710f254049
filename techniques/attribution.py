"""Input attribution: do attribution maps point at the input positions the answer depends on?

The input representation (the `embed` hook point) of each test example is replaced, through
a callable intervention, by a tensor that captum perturbs or differentiates; the attributed
output is the logit of the model's own prediction at the last position (the answer token
with the highest logit among the task's answer tokens).
- With capability `gradients`: Integrated Gradients (Sundararajan et al. 2017, "Axiomatic
  attribution for deep networks"; 16 steps, Gauss-Legendre), batched over examples, with
  gradient x input (Shrikumar et al. 2017; Simonyan et al. 2014) as a secondary map.
- Without it: feature ablation over input positions (Zeiler & Fergus 2014, occlusion): each
  position's input representation in turn is replaced by the baseline.
Both use the all-zero input representation as the baseline (the usual IG baseline for
embeddings).
All through captum (Kokhlikyan et al. 2020).

What it measures. A position's attribution magnitude is |sum over features|. Per example,
the AUROC of that magnitude for separating the task's relevant positions
(`Examples.relevant`: the positions the answer depends on, e.g. recall's matching key, its
value and the query) from the others (Mann-Whitney, ties count half). Examples whose mask
is all-true or all-false among the scored positions are excluded.

Score and chance level. AUROC's chance level is 0.5 (a map unrelated to relevance; a model
that ignores its input has all-zero maps, all ties, exactly 0.5), so each example's value is
chance-corrected, (AUROC - 0.5) / 0.5: 0 at chance, 1 when every relevant position outranks
every irrelevant one, -1 when every irrelevant one outranks the relevant ones. `per_example`
holds these values, their mean is the score (clipped to [0, 1]); the raw mean AUROC, the
AUROC pooled over all (example, position) pairs and the share of attribution mass on the
relevant positions are in `metrics`, for each map. `details` holds one row per scored
position of the scored map (`position_importance`): its magnitude normalised per example to
sum 1 over the scored positions, averaged over examples (`mean_abs_attribution`; the same
over the examples where the position is irrelevant, `mean_abs_attribution_irrelevant`),
and its `relevant_share`; the glitch technique's report table ranks positions by it.

Positions whose token never varies in the sample (the `=` of modadd, the query of count and
parity) are left out of the score: they carry no information about the answer, and their
attribution reflects only the baseline (zeroing a constant query token at the last
position is a large perturbation, which can dominate a random-init control's map). A position
that varies is scored whatever its place: recall's query varies and is relevant, facts'
relation too. A task with no varying irrelevant position (modadd: only a and b vary, both
relevant) is not applicable.

What it cannot detect. Only *which positions* matter, not how they are combined or whether
the model computes the task's intermediate variables; a relevant position can rank high for
a reason unrelated to the mechanism, so a random-init control can score well above 0 and
only the trained - control effect says anything: where relevance follows token identity
(count: the `a` tokens) any map that depends on the token's embedding separates the
classes (raw AUROC 0.64 on the random-init transformer, count seed 0); the last position
feeds the readout directly, so where it is relevant (recall's query, facts' relation) a
control could favour it too (on recall seed 0 it did not: the random-init transformer's
and MoE's raw AUROC were 0.46). Zero-baseline maps miss features whose zero is not
"absent" (a position whose zeroed embedding is as informative as the real one gets no
attribution), and |sum over features| cancels opposite-signed features within a position.
Feature ablation ablates one position at a time and misses redundancy (two positions that
each suffice both look unimportant).
"""

from __future__ import annotations

import torch
from captum.attr import FeatureAblation, InputXGradient, IntegratedGradients

from archbench.technique import Result, Technique
from archbench.technique_helpers import answer_prediction, chance_corrected


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


def position_importance(mag: torch.Tensor, rel: torch.Tensor, positions: list[int]) -> list[dict]:
    """One row per scored position: the mean over examples of its attribution magnitude
    normalised per example to sum 1 over the scored positions (all n examples; an all-zero
    map counts 0), the same mean over only the examples where it is irrelevant (None where
    it never is), and the share of examples where it is relevant. mag (n, T'), rel (n, T')."""
    share = mag / mag.sum(1, keepdim=True).clamp_min(1e-12)  # (n, T') each row sums to 1 (or 0)
    rows = []
    for j, p in enumerate(positions):
        off = ~rel[:, j]  # (n,) examples where position p is irrelevant
        rows.append({"position": p, "mean_abs_attribution": float(share[:, j].mean()),
                     "mean_abs_attribution_irrelevant": float(share[off, j].mean()) if bool(off.any()) else None,
                     "relevant_share": float(rel[:, j].float().mean())})
    return rows


class Attribution(Technique):
    name = "attribution"
    version = 2
    control_floor = ("a random-init model's attribution magnitude follows each token's embedding and its "
                     "position, so where the relevant positions hold one token (count: the counted token) "
                     "or sit at fixed places (facts: the last three of four, which a reservoir's fading "
                     "memory weights most), AUROC separates them without the answer being computed.")
    roles = frozenset({"embed"})
    # internal_batch_size: rows per IG forward; it bounds the memory of backward passes
    # through per-step recurrent scans (4,096 took 3 GB on Mamba)
    default_config = {"n_examples": 128, "n_steps": 16, "internal_batch_size": 512}
    # a checkpoint's row: each step is a forward and a backward of the whole model
    checkpoint_config = {"n_examples": 32, "n_steps": 8, "internal_batch_size": 64}

    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        ex = task.sample(cfg["n_examples"], seed, "test")
        site = adapter.names("embed")[0]
        with torch.no_grad():
            clean = adapter.run(ex.tokens, cache=[site])
        emb = clean.cache[site]  # (n, T, *f)
        target = answer_prediction(clean.logits[:, -1], task)  # (n,) the model's own prediction

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
            rows = auroc_rows(mag[mixed], rel[mixed])  # (n_mixed,) raw AUROC, chance 0.5
            metrics[f"{key}_auroc"] = float(rows.mean())
            metrics[f"{key}_auroc_pooled"] = auroc(mag[mixed].flatten(), rel[mixed].flatten())
            metrics[f"{key}_mass_on_relevant"] = float(
                (mag[mixed] * rel[mixed]).sum() / mag[mixed].sum().clamp_min(1e-12))
            if key == method:
                per_ex = chance_corrected(rows, 0.5)  # (n_mixed,) 0 at chance, 1 perfect
                metrics["auroc"] = float(rows.mean())  # the scored map's raw AUROC
                details = position_importance(mag, rel, varying.nonzero()[:, 0].tolist())
        metrics["n_examples_used"] = int(mixed.sum())
        metrics["n_examples_excluded"] = int((~mixed).sum())
        return Result.from_per_example(per_ex.tolist(), metrics=metrics, details=details)

"""Tuned lens: decode intermediate states through a learned affine translator per site.

Belrose et al. 2023 ("Eliciting latent predictions from transformers with the tuned lens")
train one affine translator per layer that maps the layer's residual into the final
layer's, then apply the model's readout. Here each translator is fitted in closed form by
ridge least squares (MSE in activation space, a stand-in for their KL objective) on
train-split activations at the answer position (the last one), from every `stream` site
and every `state` site (any shape, flattened) to the deepest stream site.
- With capability `readout`: decode(translator(activation)), as in the paper.
- Without it: the translator maps straight to the final logits (an affine map fitted to
  the model's own logits), so the lens runs on any family that exposes a stream.
Either way the lens is fitted to the model's own final state, never to the answer, so it
cannot recover an answer the model does not compute.

Scoring is shared with the logit lens (`score_lens`): the lens predicts among the task's
answer tokens only (`answer_prediction`), and the score is the mean over sites (the
deepest stream site excluded: its translator is the identity) of the chance-corrected lens
accuracy (a - c) / (1 - c); `per_example` holds each example's corrected fraction of
scored sites naming its answer, so its mean is the score before clipping.

What the score measures: how much of the model's answer an affine read-out of each
intermediate state already predicts, on held-out examples. Chance level: c = the
majority-class rate of the scored test answers (a constant guess), so a model that
answers with a constant scores <= 0. What it cannot detect: an answer held nonlinearly
(the translator is affine); the difference between a site that computes the answer and
one that merely carries inputs from which an affine map to the final state happens to
exist (early sites of a model whose answer is an affine function of the input score high:
compare the control); whether the model uses what the lens reads. `agreement_with_final`,
`first_decodable_layer`, `accuracy` (raw) and `chance` are secondary.
"""

from __future__ import annotations

import torch

from archbench.technique import Result, Technique
from archbench.technique_helpers import REPRESENTATION_ROLES
from archbench.techniques.logit_lens import lens_sites, score_lens


def fit_affine(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares with bias: x (N, F), y (N, D) -> W (F+1, D), y ~ [x, 1] @ W."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, F+1)
    gram = x1.T @ x1  # (F+1, F+1)
    reg = ridge * gram.diagonal()[:-1].mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=x.dtype)
    reg[-1, -1] = 0.0  # the bias is not penalised
    return torch.linalg.solve(gram + reg, x1.T @ y)  # (F+1, D)


def apply_affine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w[:-1] + w[-1]  # (N, D)


class TunedLens(Technique):
    name = "tuned_lens"
    version = 2  # answer tokens only, chance-corrected
    roles = frozenset({"stream"})
    default_config = {"n_train": 2048, "n_test": 512, "ridge": 1e-3, "decodable": 0.5}
    checkpoint_config = {"n_train": 256, "n_test": 128}  # a checkpoint's row
    depth_value = "normalised"

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        train = task.sample(cfg["n_train"], seed, "train")
        test = task.sample(cfg["n_test"], seed, "test")
        tr = adapter.run(train.tokens, cache=list(REPRESENTATION_ROLES))
        te = adapter.run(test.tokens, cache=list(REPRESENTATION_ROLES))
        _, deepest = lens_sites(adapter, tr.cache)
        names = sorted(tr.cache, key=lambda n: adapter.specs[n].layer or 0)  # every stream and state
        readout = "readout" in adapter.capabilities
        if readout:
            target = tr.cache[deepest][:, -1].flatten(1).double()  # (N, D) final stream
            shape = tr.cache[deepest].shape[2:]
        else:
            target = tr.logits[:, -1].double()  # (N, V) final logits
        decoded = {}
        for name in names:
            w = fit_affine(tr.cache[name][:, -1].flatten(1).double(), target, cfg["ridge"])  # (F+1, D)
            y = apply_affine(te.cache[name][:, -1].flatten(1).double(), w)  # (M, D)
            if readout:
                y = adapter.decode(y.to(te.logits.dtype).view(len(y), 1, *shape))[:, 0]  # (M, V)
            decoded[name] = y  # (M, V)
        return score_lens(adapter, task, names, deepest, decoded, te.logits[:, -1],
                          test.answer, cfg["decodable"],
                          translator_target="final stream" if readout else "final logits")

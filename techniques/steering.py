"""Activation steering with difference-of-means vectors on the task's primary variable.

Contrastive activation addition (Rimsky et al. 2024, "Steering Llama 2 via contrastive
activation addition"; Turner et al. 2023, "Activation addition"): the steering vector from
value u to value v of the primary variable at a site is mean(act | latent = v) -
mean(act | latent = u), computed on train examples at the answer position. For each
counterfactual pair (base, source) of `task.counterfactuals`, with u = base's value and
v = source's value, the vector times a scale is added to base's activation at that
position, and the steer succeeds when the answer at the last position, decided among the
task's answer tokens (`answer_prediction`), becomes `expected` (the answer base would have
with value v). Every `stream` and `state` site is tried at scales {0.5, 1}: at scale 1 the
vector moves the class mean of u exactly onto that of v; larger scales push activations
outside the range the model produces, where almost any push changes the answer.

Pairs used: those whose expected answer differs from the base answer, whose values the
train split shows, and whose base the model being scored answers correctly. A base the
model gets wrong has no computation to steer, and counting it let a constant-guess model
"succeed" whenever `expected` happened to be its guess (~0.5 on a binary task).

What the score measures: how much better the difference-of-means direction steers than an
uninformed push of the same size. Per pair and (site, scale) the random baseline adds a
fixed-seed random direction with the norm of that pair's steering vector, at the same site
and scale; `per_example` is success - random success (-1, 0 or 1) of the best scored
(site, scale) cell, and the score is its mean (clipped to [0, 1]). Each `details` row
holds `success`, `random_success` and their difference `normalised`.

Chance level: the random-direction success of the same cell (metric `chance`; the raw
steering success is `success`). It is the right chance here, not a majority rate: on the
used pairs a constant guess never succeeds (its guess is the base answer, which `expected`
differs from), while on a binary task *any* push that changes the answer "succeeds", so
raw success credits disruption. The score is success - chance, not divided by
1 - chance: its ceiling is 1 - chance, so a cell where any push already flips the answer
cannot score high (it cannot show that the direction matters), and the maximum over cells
is not inflated by small denominators.

No base answered correctly (a control at or below chance on every base): there is nothing
to steer, and the score is 0, with `per_example` a 0 for every candidate pair and metric
`nothing_to_steer` True. n/a would drop such controls from the verdict and inflate the
effect; 0 is what a model with no steerable computation should score.

What it cannot detect: a variable coded nonlinearly or along different directions per
example (the mean difference is one direction per value pair); a variable at any position
but the answer position; variables other than the primary one. As in patching, the deepest
site is not scored when the primary position is the last one: adding the class-mean
difference to the readout's own input steers any model that solves the task, whatever its
internals.
"""

from __future__ import annotations

import torch

from archbench.technique import Result, Technique
from archbench.technique_helpers import (REPRESENTATION_ROLES, answer_prediction, class_index, deepest_site,
                                         primary_value)


def steering_and_random(x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                        gen: torch.Generator) -> torch.Tensor:
    """Per pair, the difference-of-means vector from class u to class v of the activations x
    (N, F) labelled y (N,) (class sizes `counts` (C, 1)), then a random direction of the same
    norm drawn from `gen`: (2n, F), steering vectors first."""
    mu = torch.zeros(len(counts), x.shape[1]).index_add_(0, y, x) / counts  # (C, F)
    vec = mu[v] - mu[u]  # (n, F) steering vector per pair
    rand = torch.randn(vec.shape, generator=gen)  # (n, F)
    rand = rand / rand.norm(dim=1, keepdim=True).clamp_min(1e-12) * vec.norm(dim=1, keepdim=True)
    return torch.cat([vec, rand])  # (2n, F)


class Steering(Technique):
    name = "steering"
    version = 2  # correct bases only, minus a random direction, answer tokens, scales 0.5 and 1
    roles = frozenset(REPRESENTATION_ROLES)
    default_config = {"n_train": 1024, "n_pairs": 256, "scales": (0.5, 1.0)}
    checkpoint_config = {"n_train": 128, "n_pairs": 32}  # a checkpoint's row
    depth_value = "normalised"

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        at = adapter.answer_position(task.seq_len)  # activation position of the answer

        def value(tokens):  # the primary variable at the primary position: (n,)
            return primary_value(task.latents(tokens), task).contiguous()

        train = task.sample(cfg["n_train"], seed, "train")
        classes = torch.unique(value(train.tokens))  # (C,) sorted
        y = class_index(value(train.tokens), classes)  # (N,) in [0, C)
        cf = task.counterfactuals(cfg["n_pairs"], seed, "test")
        u, v = class_index(value(cf.base), classes), class_index(value(cf.source), classes)  # (n,), (n,); -1: unseen
        candidate = (cf.expected != cf.base_answer) & (u >= 0) & (v >= 0)
        if not bool(candidate.any()):
            return Result.not_applicable("no counterfactual pair changes the answer")
        names = adapter.names(list(REPRESENTATION_ROLES))
        deepest = deepest_site(adapter, names)
        if names == [deepest]:
            return Result.not_applicable(f"{adapter.family} has no intermediate site to steer")
        correct = answer_prediction(adapter.run(cf.base).logits[:, -1], task) == cf.base_answer  # (n_pairs,)
        keep = candidate & correct
        counts = {"n_pairs_used": int(keep.sum()), "n_pairs_dropped": int((~candidate).sum()),
                  "n_bases_wrong": int((candidate & ~correct).sum())}
        if not bool(keep.any()):
            return Result.from_per_example(
                [0.0] * int(candidate.sum()),
                metrics={**counts, "nothing_to_steer": True, "best_site": None, "best_layer": None,
                         "best_scale": None, "success": None, "chance": None})
        base, expected, u, v = cf.base[keep], cf.expected[keep], u[keep], v[keep]
        n = base.shape[0]
        scales = torch.tensor(cfg["scales"], dtype=torch.float)  # (S,)
        acts = adapter.run(train.tokens, cache=names).cache  # name -> (N, T, *f)
        counts_y = torch.bincount(y, minlength=len(classes)).clamp_min(1)[:, None].float()  # (C, 1)
        gen = torch.Generator().manual_seed(seed)

        hits, rand_hits = {}, {}  # name -> (S, n) 0/1, steered and random direction
        for name in names:
            x = acts[name][:, at].flatten(1).float()  # (N, F)
            both = steering_and_random(x, y, counts_y, u, v, gen)  # (2n, F): steering vectors, then random ones
            delta = (scales[:, None, None] * both).flatten(0, 1)  # (S*2n, F)

            def add(act, spec, delta=delta):
                act = act.clone()
                act[:, at] += delta.view(-1, *act.shape[2:]).to(act)  # (S*2n, *f)
                return act

            out = adapter.run(base.repeat(2 * len(scales), 1), interventions={name: add})
            pred = answer_prediction(out.logits[:, -1], task).view(len(scales), 2, n)  # (S, 2, n)
            hit = (pred == expected).float()  # (S, 2, n)
            hits[name], rand_hits[name] = hit[:, 0], hit[:, 1]

        details = []
        for name in names:
            spec = adapter.specs[name]
            for s, scale in enumerate(cfg["scales"]):
                success, chance = float(hits[name][s].mean()), float(rand_hits[name][s].mean())
                details.append({"site": name, "role": spec.role, "layer": spec.layer, "scale": scale,
                                "success": success, "random_success": chance, "normalised": success - chance,
                                "trivial": name == deepest})
        scored = [d for d in details if not d["trivial"]]
        best = max(scored, key=lambda d: d["normalised"])  # first of ties: shallowest, smallest scale
        s = list(cfg["scales"]).index(best["scale"])
        trivial = [d["normalised"] for d in details if d["trivial"]]
        return Result.from_per_example(
            (hits[best["site"]][s] - rand_hits[best["site"]][s]).tolist(), details=details,
            metrics={"best_site": best["site"], "best_layer": best["layer"], "best_scale": best["scale"],
                     "success": best["success"], "chance": best["random_success"], **counts,
                     "nothing_to_steer": False, "deepest_site_effect": max(trivial) if trivial else None})

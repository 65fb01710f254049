"""Activation steering with difference-of-means vectors on the task's primary variable.

Contrastive activation addition (Rimsky et al. 2024, "Steering Llama 2 via contrastive
activation addition"; Turner et al. 2023, "Activation addition"): the steering vector from
value u to value v of the primary variable at a site is mean(act | latent = v) -
mean(act | latent = u), computed on train examples at the answer position. For each
counterfactual pair (base, source) of `task.counterfactuals`, with u = base's value and
v = source's value, the vector times a scale is added to base's activation at that
position, and the steer succeeds when the answer at the last position becomes `expected`
(the answer base would have with value v). Every `stream` and `state` site is tried at
scales {0.5, 1, 2}; pairs whose expected answer equals the base answer, or whose values
the train split never shows, are dropped. At scale 1 the vector moves the class mean of u
exactly onto that of v; much larger scales push activations far outside the range the
model ever produces, where a big enough push of almost any direction correlated with the
answer overrides the computation, so they are not tried.

Scoring: success rate per (site, scale); the score is the best cell's, and `per_example`
holds that cell's 0/1 successes. As in patching, the deepest site is not scored when the
primary position is the last one: adding the class-mean difference to the readout's own
input steers any model that solves the task, whatever its internals.
"""

from __future__ import annotations

import torch

from archbench.technique import Result, Technique

SITE_ROLES = ("stream", "state")


class Steering(Technique):
    name = "steering"
    roles = frozenset(SITE_ROLES)
    default_config = {"n_train": 1024, "n_pairs": 256, "scales": (0.5, 1.0, 2.0)}

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg, pos = self.config, task.primary_position
        at = adapter.answer_position(task.seq_len)  # activation position of the answer

        def value(tokens):  # the primary variable at the primary position: (n,)
            lat = task.latents(tokens)[task.primary]
            return (lat if lat.dim() == 1 else lat[:, pos]).contiguous()

        train = task.sample(cfg["n_train"], seed, "train")
        classes = torch.unique(value(train.tokens))  # (C,) sorted
        y = torch.searchsorted(classes, value(train.tokens))  # (N,) in [0, C)
        cf = task.counterfactuals(cfg["n_pairs"], seed, "test")
        u_raw, v_raw = value(cf.base), value(cf.source)  # (n,), (n,)
        u = torch.searchsorted(classes, u_raw).clamp_max(len(classes) - 1)  # (n,)
        v = torch.searchsorted(classes, v_raw).clamp_max(len(classes) - 1)  # (n,)
        keep = (cf.expected != cf.base_answer) & (classes[u] == u_raw) & (classes[v] == v_raw)
        if not bool(keep.any()):
            return Result.not_applicable("no counterfactual pair changes the answer")
        base, expected, u, v = cf.base[keep], cf.expected[keep], u[keep], v[keep]
        n, T = base.shape
        scales = torch.tensor(cfg["scales"], dtype=torch.float)  # (S,)
        names = adapter.names(list(SITE_ROLES))
        acts = adapter.run(train.tokens, cache=names).cache  # name -> (N, T, *f)
        counts = torch.bincount(y, minlength=len(classes)).clamp_min(1)[:, None].float()  # (C, 1)

        hits = {}  # name -> (S, n) 0/1
        for name in names:
            x = acts[name][:, at].flatten(1).float()  # (N, F)
            mu = torch.zeros(len(classes), x.shape[1]).index_add_(0, y, x) / counts  # (C, F)
            delta = (scales[:, None, None] * (mu[v] - mu[u])).flatten(0, 1)  # (S*n, F)

            def add(act, spec, delta=delta):
                act = act.clone()
                act[:, at] += delta.view(-1, *act.shape[2:]).to(act)  # (S*n, *f)
                return act

            out = adapter.run(base.repeat(len(scales), 1), interventions={name: add})
            pred = out.logits[:, -1].argmax(-1).view(len(scales), n)  # (S, n)
            hits[name] = (pred == expected).float()

        deepest = max(names, key=lambda nm: adapter.specs[nm].layer or 0)
        details = []
        for name in names:
            spec = adapter.specs[name]
            for s, scale in enumerate(cfg["scales"]):
                details.append({"site": name, "role": spec.role, "layer": spec.layer, "scale": scale,
                                "success": float(hits[name][s].mean()),
                                "trivial": name == deepest})
        scored = [d for d in details if not d["trivial"]]
        if not scored:
            return Result.not_applicable(f"{adapter.family} has no intermediate site to steer")
        best = max(scored, key=lambda d: d["success"])  # first of ties: shallowest, smallest scale
        trivial = [d["success"] for d in details if d["trivial"]]
        return Result.from_per_example(
            hits[best["site"]][list(cfg["scales"]).index(best["scale"])].tolist(), details=details,
            metrics={"best_site": best["site"], "best_layer": best["layer"], "best_scale": best["scale"],
                     "n_pairs_used": n, "n_pairs_dropped": int((~keep).sum()),
                     "deepest_site_success": max(trivial) if trivial else None})

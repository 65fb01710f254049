"""Activation patching: where does the model carry the task's primary variable?

Interchange interventions (Geiger et al. 2021, "Causal abstractions of neural networks";
Vig et al. 2020, "Investigating gender bias in language models using causal mediation
analysis"; Meng et al. 2022, "Locating and editing factual associations in GPT"): for each
counterfactual pair (base, source) from `task.counterfactuals`, run the base while one
`embed`, `stream` or `state` hook point at one position holds the source run's activation,
and check whether the answer at the last position becomes `expected` (the answer base would
have with source's value of the primary variable).

Scoring: the interchange-intervention accuracy IIA(site, position) is the fraction of pairs
whose patched answer is `expected`. Pairs with expected == base answer are dropped (they
cannot show an effect). Two kinds of cell are reported but never scored, because they are
trivially causal on any model that solves the task: the input embedding (patching it
hands the model the source's input) and the last position of the deepest site (patching it
hands the readout the source's final state). The score is the best IIA over the remaining
(site, position) cells, which asks whether the variable is carried by an intermediate
state; `per_example` holds that cell's 0/1 indicators. Each site costs one batched forward: all positions are
stacked into one batch with a per-row patch position.
"""

from __future__ import annotations

import torch

from archbench.hooks import Patch
from archbench.technique import Result, Technique

SITE_ROLES = ("embed", "stream", "state")


class Patching(Technique):
    name = "patching"
    roles = frozenset({"stream", "state"})
    default_config = {"n_pairs": 256, "max_rows": 1024}

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cf = task.counterfactuals(self.config["n_pairs"], seed, "test")
        keep = cf.expected != cf.base_answer  # (n_pairs,)
        if not bool(keep.any()):
            return Result.not_applicable("no counterfactual pair changes the answer")
        base, source, expected = cf.base[keep], cf.source[keep], cf.expected[keep]  # (n, T), (n, T), (n,)
        n = base.shape[0]
        T = adapter.answer_position(base.shape[1]) + 1  # activation positions up to the answer's
        names = adapter.names(list(SITE_ROLES))
        src = adapter.run(source, cache=names).cache  # name -> (n, T, *features)

        # Rows are (position, pair), position-major; chunks of positions keep batches bounded.
        chunk = max(1, self.config["max_rows"] // n)
        iia = {}  # name -> (T, n) 0/1 hits
        for name in names:
            hits = []
            for start in range(0, T, chunk):
                ps = torch.arange(start, min(T, start + chunk))  # (P,)
                position = ps.repeat_interleave(n)  # (P*n,) patch position of each row
                src_rows = src[name].repeat(len(ps), *([1] * (src[name].dim() - 1)))  # (P*n, T, *f)
                out = adapter.run(base.repeat(len(ps), 1),  # (P*n, T)
                                  interventions={name: Patch(src_rows, positions=position)})
                pred = out.logits[:, -1].argmax(-1)  # (P*n,)
                hits.append((pred == expected.repeat(len(ps))).float().view(len(ps), n))  # (P, n)
            iia[name] = torch.cat(hits)  # (T, n)

        deepest = max(names, key=lambda nm: adapter.specs[nm].layer or 0)
        details = []
        for name in names:
            spec = adapter.specs[name]
            for p in range(T):
                trivial = spec.role == "embed" or (name == deepest and p == T - 1)
                details.append({"site": name, "role": spec.role, "layer": spec.layer, "position": p,
                                "iia": float(iia[name][p].mean()), "trivial": trivial})
        scored = [d for d in details if not d["trivial"]]
        if not scored:
            return Result.not_applicable(f"{adapter.family} has no intermediate site to patch")
        best = max(scored, key=lambda d: d["iia"])  # first of ties: the shallowest, earliest
        streams = [nm for nm in names if adapter.specs[nm].role == "stream"]
        last_stream = float(iia[streams[-1]][T - 1].mean()) if streams else None
        return Result.from_per_example(
            iia[best["site"]][best["position"]].tolist(), details=details,
            metrics={"best_site": best["site"], "best_position": best["position"],
                     "best_layer": best["layer"], "n_pairs_used": n,
                     "n_pairs_dropped": int((~keep).sum()), "last_stream_last_position_iia": last_stream})

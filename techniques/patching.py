"""Activation patching: where does the model carry the task's primary variable?

Interchange interventions (Geiger et al. 2021, "Causal abstractions of neural networks";
Vig et al. 2020, "Investigating gender bias in language models using causal mediation
analysis"; Meng et al. 2022, "Locating and editing factual associations in GPT"): for each
counterfactual pair (base, source) from `task.counterfactuals`, run the base while one
`embed`, `stream` or `state` hook point at one position holds the source run's activation,
and check whether the answer at the last position, decided among the task's answer tokens
(`answer_prediction`), becomes `expected` (the answer base would have with source's value
of the primary variable). Pairs with expected == base answer are dropped (they cannot show
an effect).

Positions: every fixed activation position up to the answer's (`positions="all"`; with
`positions="answer"` only the answer position, as on a checkpoint's row, where every position
of a 30-block model costs an hour a cell on a CPU), and `"aligned"`: per pair,
the last input position the counterfactual changed (`changed_positions`; the last subject
token when facts rewrites both name tokens, as in ROME). A fixed position p can only reach
the share of pairs whose source differs at p or whose variable has already moved to p
(recall: one of four value positions; parity: one of two secret bits); the aligned
position follows each pair's change, so it is not capped that way.

Scoring: IIA(site, position) is the fraction of pairs whose patched answer is `expected`.
Three kinds of cell are reported but never scored, because they only hand the model the
source's input or output:
- the input embedding (patching it hands the model the source's input);
- the deepest site at the answer position (it hands the readout the source's final state);
- any cell whose IIA is no better (within `min_gain`, 0.05) than patching the embedding at
  the same position (aligned against aligned, fixed against fixed): such a cell does no
  more than the source's input token does (the layer-0 stream at the changed token).
The score is the chance-corrected IIA (iia - c) / (1 - c) of the best remaining cell (metrics
`best_site`, `best_position`: an int or "aligned"), and `per_example` holds that cell's
(hit_i - c) / (1 - c), so its mean is the score before clipping. If every cell is trivial
(nothing beyond the input token carries the variable, as on a model that ignores its input)
the score is 0 with `per_example` all 0 and `best_site` None.

Chance level: c = max(majority rate of `expected` among the scored pairs, unpatched IIA)
(metric `chance`, with both parts; the raw IIA is `iia`): the better of two patches that
carry nothing from the source. The majority rate is the IIA of the best constant guess on
exactly these pairs and, in expectation, an upper bound on any patched answer independent
of `expected`, so a patch that merely disrupts a binary task's computation (any changed
answer is `expected` there) scores ~0, not 0.5. The unpatched IIA is the rate at which the
model already answers `expected` without any patch: on a binary task `expected` is the
base answer's complement, so a random-init control that gets a third of the bases right
already "hits" two thirds of the pairs with every inert cell; measured, that put a random
transformer's best cell at 0.33 over the majority rate alone.

What it cannot detect: a variable spread over several sites or positions (one cell is
patched at a time), or carried at a position that differs per pair other than the changed
one; whether a cell carries the variable or only something the variable is computed from
later (an intermediate input the next layer turns into it scores alike); a perfectly
solved single-change task makes every aligned cell trivial (patching the changed token's
embedding is the whole counterfactual), so only cells where the variable has moved (later
positions) score there. A trained model whose every cell is inert scores below 0 (clipped):
its unpatched answer is the base answer, which `expected` never is. Each site costs one
batched forward per chunk of positions: positions are stacked with a per-row patch mask.
"""

from __future__ import annotations

import torch

from archbench.hooks import Patch
from archbench.technique import Result, Technique
from archbench.technique_helpers import answer_prediction, chance_corrected, deepest_site, majority_rate

SITE_ROLES = ("embed", "stream", "state")
ALIGNED = "aligned"


class Patching(Technique):
    name = "patching"
    version = 2  # aligned positions, embedding-equivalent cells trivial, answer tokens, chance-corrected
    roles = frozenset({"stream", "state"})
    # `positions` ("all" or "answer") is not among the defaults, so the synthetic cells keep
    # the identity they were stored under; absent, it is "all"
    default_config = {"n_pairs": 256, "max_rows": 1024, "min_gain": 0.05}
    # a checkpoint's row: the answer position and the aligned one (where the variable enters
    # and where it must arrive), 64 pairs
    checkpoint_config = {"n_pairs": 64, "positions": "answer"}
    depth_value = "normalised"

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cf = task.counterfactuals(self.config["n_pairs"], seed, "test")
        keep = cf.expected != cf.base_answer  # (n_pairs,)
        if not bool(keep.any()):
            return Result.not_applicable("no counterfactual pair changes the answer")
        base, source, expected = cf.base[keep], cf.source[keep], cf.expected[keep]  # (n, T), (n, T), (n,)
        changed = cf.changed_positions[keep]  # (n, T_in) bool
        n, t_in = changed.shape
        T = adapter.answer_position(base.shape[1]) + 1  # activation positions up to the answer's
        last_changed = torch.where(changed, torch.arange(t_in), -1).max(1).values  # (n,) -1: none
        has = (last_changed >= 0).nonzero()[:, 0]  # (n',) pairs with a changed input
        positions = self.config.get("positions", "all")
        if positions not in ("all", "answer"):
            raise ValueError(f"patching: positions={positions!r} (all or answer)")
        fixed = list(range(T)) if positions == "all" else [T - 1]
        labels = [*fixed, ALIGNED]  # one block of rows per label
        names = adapter.names(list(SITE_ROLES))
        src = adapter.run(source, cache=names).cache  # name -> (n, L, *features)

        chunk = max(1, self.config["max_rows"] // n)  # blocks per forward
        iia = {}  # name -> (len(labels), n) 0/1 hits, blocks in `labels` order
        for name in names:
            L = src[name].shape[1]
            masks = torch.zeros(len(labels), n, L, dtype=torch.bool)  # (len(labels), n, L) patch mask per row
            masks[torch.arange(len(fixed)), :, torch.tensor(fixed)] = True  # fixed positions
            masks[len(fixed), has, last_changed[has]] = True  # aligned: the last changed input
            hits = []
            for start in range(0, len(labels), chunk):
                m = masks[start:start + chunk]  # (P, n, L)
                P = m.shape[0]
                src_rows = src[name].repeat(P, *([1] * (src[name].dim() - 1)))  # (P*n, L, *f)
                out = adapter.run(base.repeat(P, 1),  # (P*n, T)
                                  interventions={name: Patch(src_rows, positions=m.flatten(0, 1))})
                pred = answer_prediction(out.logits[:, -1], task)  # (P*n,)
                hits.append((pred == expected.repeat(P)).float().view(P, n))  # (P, n)
            iia[name] = torch.cat(hits)  # (len(labels), n)

        unpatched = float((answer_prediction(adapter.run(base).logits[:, -1], task) == expected).float().mean())
        chance = max(majority_rate(expected), unpatched)
        deepest = deepest_site(adapter, names)
        embeds = [nm for nm in names if adapter.specs[nm].role == "embed"]
        floor = iia[embeds[0]].mean(1) if embeds else None  # (len(labels),) embedding IIA per block
        reaches_answer = [label == T - 1 or (label == ALIGNED and bool((last_changed == T - 1).any()))
                          for label in labels]
        details = []
        for name in names:
            spec = adapter.specs[name]
            for b, label in enumerate(labels):
                value = float(iia[name][b].mean())
                why = ("input embedding" if spec.role == "embed"
                       else "readout input" if name == deepest and reaches_answer[b]
                       else "no better than the embedding"
                       if floor is not None and value <= float(floor[b]) + self.config["min_gain"]
                       else "")
                details.append({"site": name, "role": spec.role, "layer": spec.layer, "position": label,
                                "iia": value, "normalised": float(chance_corrected(value, chance)),
                                "trivial": bool(why), "trivial_reason": why})
        structural = ("input embedding", "readout input")
        if all(d["trivial_reason"] in structural for d in details):
            return Result.not_applicable(f"{adapter.family} has no intermediate site to patch")
        streams = [nm for nm in names if adapter.specs[nm].role == "stream"]
        metrics = {"chance": chance, "majority_rate": majority_rate(expected), "unpatched_iia": unpatched,
                   "n_pairs_used": n, "n_pairs_dropped": int((~keep).sum()),
                   "last_stream_last_position_iia": float(iia[streams[-1]][labels.index(T - 1)].mean())
                   if streams else None,
                   "embed_iia_aligned": float(floor[-1]) if floor is not None else None,
                   "n_cells_scored": sum(not d["trivial"] for d in details)}
        scored = [d for d in details if not d["trivial"]]
        if not scored:  # nothing beyond the input token carries the variable
            return Result.from_per_example(
                [0.0] * n, details=details,
                metrics={**metrics, "best_site": None, "best_position": None, "best_layer": None, "iia": None})
        best = max(scored, key=lambda d: d["iia"])  # first of ties: shallowest, earliest, fixed before aligned
        hits = iia[best["site"]][labels.index(best["position"])]  # (n,)
        return Result.from_per_example(
            chance_corrected(hits.numpy(), chance), details=details,
            metrics={**metrics, "best_site": best["site"], "best_position": best["position"],
                     "best_layer": best["layer"], "iia": best["iia"]})

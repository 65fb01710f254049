"""Logit lens: decode intermediate states with the model's own readout.

nostalgebraist 2020 ("interpreting GPT: the logit lens"): apply the final readout
(`adapter.decode`, capability `readout`) to every `stream` hook point (and every `state`
hook point whose feature shape matches the stream's) at the answer position (the last one)
and read the top-1 token. The deepest stream site is the readout's own input, so its lens
is the model's prediction by construction: it is reported, never scored.

Scoring: the lens is judged against ground truth, the task's answer (the primary variable's
token), not against the model's final prediction: on a random-init control the residual
stream changes little with depth, so every layer "agrees" with the final prediction while
none knows the answer (agreement with the final prediction is the metric
`agreement_with_final`). `per_example` is each test example's fraction of scored sites
whose decoded token is the answer, so the score is the mean lens accuracy over depth.
Secondary: `first_decodable_layer`, the shallowest site (the deepest included) whose lens
accuracy reaches `decodable` (default 0.5). `score_lens` is shared with the tuned lens.
"""

from __future__ import annotations

import torch

from archbench.technique import Result, Technique

SITE_ROLES = ("stream", "state")


def lens_sites(adapter, acts: dict[str, torch.Tensor]) -> tuple[list[str], str]:
    """(sites to decode in depth order, the deepest stream site): states only if shaped like the stream."""
    streams = [n for n in acts if adapter.specs[n].role == "stream"]
    deepest = max(streams, key=lambda n: adapter.specs[n].layer or 0)
    shape = acts[deepest].shape[2:]
    names = [n for n in acts if adapter.specs[n].role == "stream" or acts[n].shape[2:] == shape]
    return sorted(names, key=lambda n: adapter.specs[n].layer or 0), deepest


def score_lens(adapter, names, deepest, decoded: dict[str, torch.Tensor], final_pred, answer,
               decodable: float, **extra) -> Result:
    """decoded: name -> (n,) top-1 tokens of the lens; final_pred, answer (n,)."""
    details, hits = [], []
    for name in names:
        spec = adapter.specs[name]
        hit = (decoded[name] == answer).float()  # (n,)
        details.append({"site": name, "role": spec.role, "layer": spec.layer,
                        "accuracy": float(hit.mean()), "scored": name != deepest,
                        "agreement": float((decoded[name] == final_pred).float().mean())})
        if name != deepest:
            hits.append(hit)
    if not hits:
        return Result.not_applicable(f"{adapter.family} has no stream site before the readout")
    first = next((d["layer"] for d in details if d["accuracy"] >= decodable), None)
    scored = [d for d in details if d["scored"]]
    return Result.from_per_example(
        torch.stack(hits).mean(0).tolist(), details=details,
        metrics={"agreement_with_final": sum(d["agreement"] for d in scored) / len(scored),
                 "first_decodable_layer": first, "model_accuracy": float((final_pred == answer).float().mean()),
                 "n_sites_scored": len(scored), **extra})


class LogitLens(Technique):
    name = "logit_lens"
    roles = frozenset({"stream"})
    capabilities = frozenset({"readout"})
    default_config = {"n_test": 512, "decodable": 0.5}

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        test = task.sample(self.config["n_test"], seed, "test")
        out = adapter.run(test.tokens, cache=list(SITE_ROLES))
        names, deepest = lens_sites(adapter, out.cache)
        decoded = {n: adapter.decode(out.cache[n][:, -1:])[:, 0].argmax(-1) for n in names}  # (n,) each
        return score_lens(adapter, names, deepest, decoded, out.logits[:, -1].argmax(-1),
                          test.answer, self.config["decodable"])

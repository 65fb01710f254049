"""Logit lens: decode intermediate states with the model's own readout.

nostalgebraist 2020 ("interpreting GPT: the logit lens"): apply the final readout
(`adapter.decode`, capability `readout`) to every `stream` hook point (and every `state`
hook point whose feature shape matches the stream's) at the answer position (the last one)
and read the prediction among the task's answer tokens (`answer_prediction`: the answer
token with the highest decoded logit, never the whole vocabulary). The deepest stream site
is the readout's own input, so its lens is the model's prediction by construction: it is
reported, never scored.

What the score measures: how often an intermediate state, read through the final readout
alone, already names the task's answer (ground truth, not the model's final prediction: on
a random-init control the stream changes little with depth, so every layer "agrees" with
the final prediction while none knows the answer; that agreement is the metric
`agreement_with_final`). Per site, lens accuracy a is chance-corrected,
(a - c) / (1 - c), and `per_example` holds each test example's (fraction of scored sites
whose lens names its answer - c) / (1 - c), so their mean is the mean corrected accuracy
over depth, which is the score before clipping.

Chance level: c = the majority-class rate of the scored test answers (`majority_rate`), the
accuracy of the best constant guess on exactly these examples, and in expectation an upper
bound on any lens whose prediction is independent of the answer. A constant-guess model,
or a lens that decodes noise, scores <= 0 (not 0.5 on a binary task, as raw top-1 did).

What it cannot detect: an answer held in a basis the readout does not read (a rotated or
nonlinearly coded stream scores ~0 although the answer is there: the tuned lens and the
probe exist for that); whether the decoded answer is used downstream (it is read, not
intervened on); anything but the answer at the last position (intermediate variables such
as parity's partial XOR are not answer tokens). Secondary: `first_decodable_layer`, the
shallowest site (the deepest included) whose corrected accuracy reaches `decodable`
(default 0.5); `accuracy` and `chance` (raw rate and c); `model_accuracy`. `score_lens` is
shared with the tuned lens.
"""

from __future__ import annotations

import torch

from archbench.technique import Result, Technique
from archbench.technique_helpers import (REPRESENTATION_ROLES, answer_prediction, chance_corrected, deepest_site,
                                         majority_rate)


def lens_sites(adapter, acts: dict[str, torch.Tensor]) -> tuple[list[str], str]:
    """(sites to decode in depth order, the deepest stream site): states only if shaped like the stream."""
    streams = [n for n in acts if adapter.specs[n].role == "stream"]
    deepest = deepest_site(adapter, streams)
    shape = acts[deepest].shape[2:]
    names = [n for n in acts if adapter.specs[n].role == "stream" or acts[n].shape[2:] == shape]
    return sorted(names, key=lambda n: adapter.specs[n].layer or 0), deepest


def score_lens(adapter, task, names, deepest, decoded: dict[str, torch.Tensor], final_logits,
               answer, decodable: float, **extra) -> Result:
    """decoded: name -> (n, V) lens logits; final_logits (n, V) the model's; answer (n,)."""
    chance = majority_rate(answer)
    final_pred = answer_prediction(final_logits, task)  # (n,)
    details, hits = [], []
    for name in names:
        spec = adapter.specs[name]
        pred = answer_prediction(decoded[name], task)  # (n,)
        hit = (pred == answer).float()  # (n,)
        acc = float(hit.mean())
        details.append({"site": name, "role": spec.role, "layer": spec.layer, "accuracy": acc,
                        "normalised": float(chance_corrected(acc, chance)), "scored": name != deepest,
                        "agreement": float((pred == final_pred).float().mean())})
        if name != deepest:
            hits.append(hit)
    if not hits:
        return Result.not_applicable(f"{adapter.family} has no stream site before the readout")
    first = next((d["layer"] for d in details if d["normalised"] >= decodable), None)
    scored = [d for d in details if d["scored"]]
    per_example = chance_corrected(torch.stack(hits).mean(0).numpy(), chance)  # (n,)
    return Result.from_per_example(
        per_example, details=details,
        metrics={"agreement_with_final": sum(d["agreement"] for d in scored) / len(scored),
                 "accuracy": sum(d["accuracy"] for d in scored) / len(scored), "chance": chance,
                 "first_decodable_layer": first,
                 "model_accuracy": float((final_pred == answer).float().mean()),
                 "n_sites_scored": len(scored), **extra})


class LogitLens(Technique):
    name = "logit_lens"
    version = 2  # answer tokens only, chance-corrected
    roles = frozenset({"stream"})
    capabilities = frozenset({"readout"})
    default_config = {"n_test": 512, "decodable": 0.5}
    checkpoint_config = {"n_test": 128}  # a checkpoint's row
    depth_value = "normalised"

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        test = task.sample(self.config["n_test"], seed, "test")
        out = adapter.run(test.tokens, cache=list(REPRESENTATION_ROLES))
        names, deepest = lens_sites(adapter, out.cache)
        decoded = {n: adapter.decode(out.cache[n][:, -1:])[:, 0] for n in names}  # name -> (n, V)
        return score_lens(adapter, task, names, deepest, decoded, out.logits[:, -1],
                          test.answer, self.config["decodable"])

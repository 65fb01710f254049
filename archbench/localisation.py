"""Localisation scores: does a technique that ranks components find the designated one?

On a known-answer organism (`archbench.known_answer`) the primary variable lives, by
training, in one designated component at the answer position, and strict IIT has made every
other candidate there causally inert (Geiger et al. 2022; Gupta et al. 2024, whose
InterpBench asks the same of circuit-discovery techniques). A technique that scores sites
can then be graded by where it puts the designated component:

- `rank`: the designated component's rank among the candidates by score, 1 = first. Ties
  count against it (rank = 1 + the number of other candidates scoring at least as high),
  so a technique that scores every site alike ranks it last, not first.
- `precision` / `recall` of the sites it calls relevant (score >= a threshold) against
  the one truly relevant site.

Two rankers are built here: component-level patching (patch each candidate alone from the
source; score = the fraction of pairs moved to `expected`, the IIA of `archbench.iit`) and a
probe (ridge classifier accuracy on the primary variable from each candidate's activation
at the answer position, train split to test split). The probe is correlational: a
component downstream of the designated one, or one that reads the variable without being
used, decodes it as well, and the probe ranks the designated one poorly there.
`scores_from_details` turns a technique's per-site `Result.details` rows into scores.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from archbench.iit import Alignment, interchange_effects
from archbench.technique_helpers import class_index, primary_value


def rank(designated: str, scores: dict[str, float]) -> int:
    """1 + the number of other sites scoring at least as high as the designated one."""
    mine = scores[designated]
    return 1 + sum(1 for name, s in scores.items() if name != designated and s >= mine)


def precision_recall(designated: str, scores: dict[str, float], threshold: float) -> dict[str, Any]:
    """Precision and recall of the sites called relevant (score >= threshold); precision is
    0 when no site is called relevant."""
    called = [name for name, s in scores.items() if s >= threshold]
    hit = designated in called
    return {"called": called, "precision": (1.0 / len(called)) if hit else 0.0, "recall": float(hit)}


def localisation(designated: str, scores: dict[str, float], threshold: float) -> dict[str, Any]:
    """Rank, precision and recall of one technique's scores, with the scores themselves."""
    return {"rank": rank(designated, scores), "n_candidates": len(scores),
            **precision_recall(designated, scores, threshold), "scores": dict(scores)}


def scores_from_details(details: Iterable[dict], sites: Iterable[str], key: str,
                        position: Any = None) -> dict[str, float]:
    """site -> the best `key` value among a technique's detail rows for that site (rows of
    another position skipped when `position` is given)."""
    wanted = set(sites)
    out: dict[str, float] = {}
    for row in details:
        if row.get("site") in wanted and (position is None or row.get("position") == position):
            out[row["site"]] = max(out.get(row["site"], float("-inf")), float(row[key]))
    return out


def patching_scores(adapter, task, seed: int, alignment: Alignment, n_pairs: int = 256) -> dict[str, float]:
    """Component-level patching: per candidate, the fraction of held-out pairs whose answer
    becomes `expected` when that component alone holds the source's value."""
    pairs = task.counterfactuals(n_pairs, seed, "test")
    return {name: e["iia"] for name, e in interchange_effects(adapter, task, pairs, alignment).items()}


@torch.no_grad()
def probe_scores(adapter, task, seed: int, alignment: Alignment, n_train: int = 2048, n_test: int = 512,
                 ridge: float = 1e-2) -> dict[str, float]:
    """Per candidate: test accuracy of a ridge classifier (one-hot targets, closed form) of
    the primary variable from the component's activation at the alignment's position."""
    train, test = task.sample(n_train, seed, "train"), task.sample(n_test, seed, "test")
    y_train, y_test = primary_value(train.latents, task), primary_value(test.latents, task)  # (n,), (n,)
    classes = torch.unique(torch.cat([y_train, y_test]))  # (C,)
    at = alignment.position
    names = list(alignment.candidates)
    a_train = adapter.run(train.tokens, cache=names).cache
    a_test = adapter.run(test.tokens, cache=names).cache
    scores = {}
    for name in names:
        x, xt = a_train[name][:, at].flatten(1).double(), a_test[name][:, at].flatten(1).double()  # (n, d)
        mu, sd = x.mean(0), x.std(0) + 1e-6
        x, xt = (x - mu) / sd, (xt - mu) / sd
        x, xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), torch.cat(
            [xt, torch.ones(len(xt), 1, dtype=xt.dtype)], 1)  # (n, d + 1) with a bias column
        target = torch.nn.functional.one_hot(class_index(y_train, classes), len(classes)).double()  # (n, C)
        w = torch.linalg.solve(x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype), x.T @ target)
        pred = classes[(xt @ w).argmax(1)]  # (n_test,)
        scores[name] = float((pred == y_test).float().mean())
    return scores

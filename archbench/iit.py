"""Interchange intervention training: make one component hold a task's primary variable.

Interchange intervention training (IIT; Geiger et al. 2022, "Inducing causal structure for
interpretable neural networks") adds to the task loss a loss on counterfactual pairs: run
the source, run the base with one designated *component* (a hook point of role `mixer`,
`mlp`, `expert` or `state`, never the residual stream) at one position replaced by the
source's value, and train the patched answer towards `expected`, the answer the base would
have with the source's value of the primary variable. Strict IIT (InterpBench, Gupta et al.
2024) also patches one randomly chosen *non-designated* component of the candidate set from
the source and trains the answer to stay the base answer, so that nothing but the
designated component carries the variable there. Per batch:

    loss = task loss + w_iit * CE(base with designated <- source, expected)
                     + w_strict * CE(base with one other candidate <- source, base answer)

The source run is not differentiated (its activations are constants of the patch, as in
the `iit` library InterpBench builds on); the patched runs are. Any adapter that trains by
gradient descent gets this through `fit_iit`, which reuses `Adapter.fit`'s loop, schedule
and early stopping (`extra_loss`, `val_metric`): early stopping reads the worst of held-out
behaviour, interchange accuracy at the designated component and 1 - the largest answer
change a non-designated candidate causes, on validation-split pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from archbench import feature_groups
from archbench.adapter import Adapter
from archbench.hooks import Patch
from archbench.technique_helpers import answer_prediction

COMPONENT_ROLES = ("mixer", "mlp", "expert", "state")

# loss weights and knobs of fit_iit (part of a known-answer organism's identity)
DEFAULT_IIT = {"w_iit": 1.0, "w_strict": 1.0, "n_pairs": 4096, "n_val_pairs": 256}


@dataclass(frozen=True)
class Alignment:
    """Where the primary variable must live: one designated component at one position,
    among candidates (every component of the same roles at that position, designated included).
    A component is a hook point or a feature group of one (`name[a:b]`, archbench.feature_groups)."""

    designated: str
    candidates: tuple[str, ...]
    position: int

    @property
    def others(self) -> tuple[str, ...]:
        return tuple(c for c in self.candidates if c != self.designated)

    def check(self, adapter) -> None:
        """Raise ValueError unless every candidate is a component hook point of the adapter."""
        if self.designated not in self.candidates:
            raise ValueError(f"designated site {self.designated} is not among the candidates")
        for name in self.candidates:
            spec = feature_groups.spec(adapter.specs, name)  # a hook point or a feature group of one
            if spec is None:
                raise ValueError(f"{adapter.family} has no hook point {name}")
            if spec.role not in COMPONENT_ROLES:
                raise ValueError(f"{name} has role {spec.role!r}; IIT aligns components "
                                 f"({', '.join(COMPONENT_ROLES)}), never the residual stream")


def patched_logits(adapter, base: torch.Tensor, source_value: torch.Tensor, site: str, position: int,
                   grad: bool = False) -> torch.Tensor:
    """Answer logits of `base` with `site` at `position` holding the source's value: (n, vocab)."""
    out = adapter.run(base, interventions={site: Patch(source_value, positions=position)}, grad=grad)
    return out.logits[:, -1]  # (n, vocab)


def iit_losses(adapter, pairs, alignment: Alignment, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(IIT loss, strict loss) of one batch of counterfactual pairs.

    The IIT loss is the cross-entropy of the base run with the designated component patched
    from the source towards `expected`; the strict loss that of the base run with one
    non-designated candidate (drawn from `gen`) patched from the source towards the base
    answer (0 when there is no other candidate).
    """
    with torch.no_grad():
        src = adapter.run(pairs.source, cache=list(alignment.candidates)).cache  # name -> (n, T, *f)
    at = alignment.position
    iit = nn.functional.cross_entropy(
        patched_logits(adapter, pairs.base, src[alignment.designated], alignment.designated, at, grad=True),
        pairs.expected)
    others = alignment.others
    if not others:
        return iit, torch.zeros(())
    other = others[int(torch.randint(len(others), (1,), generator=gen))]
    strict = nn.functional.cross_entropy(
        patched_logits(adapter, pairs.base, src[other], other, at, grad=True), pairs.base_answer)
    return iit, strict


@torch.no_grad()
def interchange_effects(adapter, task, pairs, alignment: Alignment) -> dict[str, dict[str, float]]:
    """Per candidate: `iia`, the fraction of pairs whose answer (among the task's answer
    tokens) becomes `expected` when that component alone is patched from the source, and
    `changed`, the fraction whose answer differs from the unpatched model's."""
    src = adapter.run(pairs.source, cache=list(alignment.candidates)).cache
    unpatched = answer_prediction(adapter.run(pairs.base).logits[:, -1], task)  # (n,)
    effects = {}
    for name in alignment.candidates:
        pred = answer_prediction(patched_logits(adapter, pairs.base, src[name], name, alignment.position), task)
        effects[name] = {"iia": float((pred == pairs.expected).float().mean()),
                         "changed": float((pred != unpatched).float().mean())}
    return effects


def summary(effects: dict[str, dict[str, float]], alignment: Alignment) -> dict[str, Any]:
    """IIA at the designated component and the largest answer change of any other candidate."""
    changes = {n: effects[n]["changed"] for n in alignment.others}
    worst = max(changes, key=changes.get) if changes else None
    return {"iia": effects[alignment.designated]["iia"],
            "max_other_change": changes[worst] if worst else 0.0, "max_other_site": worst}


def pair_batch(pairs, idx: torch.Tensor):
    """The pairs at `idx` (a (batch,) long tensor) as a `Counterfactuals`-like batch."""
    return type(pairs)(base=pairs.base[idx], source=pairs.source[idx], base_answer=pairs.base_answer[idx],
                       expected=pairs.expected[idx], variable=pairs.variable,
                       changed_positions=pairs.changed_positions[idx])


def fit_iit(adapter, task, seed: int, alignment: Alignment, **cfg: Any):
    """Train `adapter` on `task` with the task loss plus the weighted IIT and strict losses.

    `cfg` takes the keys of `DEFAULT_IIT` (weights, pool sizes) and any `Adapter.fit`
    override. Returns `Adapter.fit`'s TrainReport; its `history` `val_accuracy` holds the
    early-stopping metric (the worst of behaviour, IIA and 1 - max other change).
    """
    alignment.check(adapter)
    knobs = {k: cfg.pop(k, v) for k, v in DEFAULT_IIT.items()}
    pool = task.counterfactuals(knobs["n_pairs"], seed, "train")
    val_pairs = task.counterfactuals(knobs["n_val_pairs"], seed, "val")
    val = task.sample(512, seed, "val")
    train = {**Adapter.train_config, **adapter.train_config, **adapter.task_train_config.get(task.name, {})}
    batch = cfg.get("batch", train["batch"])  # the batch fit uses, so both losses see as many examples
    gen = torch.Generator().manual_seed(10_000 + seed)  # its own stream: fit's batches stay fit's

    def extra_loss(step: int) -> torch.Tensor:
        idx = torch.randint(len(pool), (batch,), generator=gen)  # (batch,)
        iit, strict = iit_losses(adapter, pair_batch(pool, idx), alignment, gen)
        return knobs["w_iit"] * iit + knobs["w_strict"] * strict

    def val_metric() -> float:
        adapter.model.eval()
        s = summary(interchange_effects(adapter, task, val_pairs, alignment), alignment)
        return min(adapter.accuracy(val), s["iia"], 1.0 - s["max_other_change"])

    return adapter.fit(task, seed, extra_loss=extra_loss, val_metric=val_metric, **cfg)

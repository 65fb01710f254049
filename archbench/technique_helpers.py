"""The helpers every technique shares: which sites it may score, the primary variable's value,
label encoding, and the chance level of a behavioural score.

They live here, not in `archbench/technique.py`, because that file is the contract a
technique fulfils (`Technique`, `Result`, `SCORING_VERSION`) and these are tools for
computing a score, used by the built-ins and by plugins alike: one idea per file.
`archbench.technique` still exports the four helpers it used to define
(`chance_corrected`, `answer_prediction`, `majority_rate`, `representation_sites`).
"""

from __future__ import annotations

import numpy as np
import torch

# The roles a representation score reads (probe, SAE, CKA, steering, the lenses).
REPRESENTATION_ROLES = ("stream", "state")


# ---- sites ----------------------------------------------------------------------------------

def deepest_site(adapter, names: list[str]) -> str:
    """The deepest of `names` by `HookSpec.layer` (the first of ties, in `names` order)."""
    return max(names, key=lambda n: adapter.specs[n].layer or 0)


def representation_names(adapter) -> list[str]:
    """Every `stream` and `state` hook point and the embedding: what a representation score
    fits and reports (`representation_sites` says which of them it may score)."""
    return adapter.names(list(REPRESENTATION_ROLES) + ["embed"])


def representation_sites(adapter, names: list[str]) -> list[str]:
    """The sites a representation score may use: no raw embedding, no readout input.

    The input embedding holds the input tokens, and the deepest `stream` site feeds the
    readout directly, where any model that solves the task holds the answer; scoring either
    would credit a probe for reading the input or the output instead of the mechanism.
    """
    streams = [n for n in names if adapter.specs[n].role == "stream"]
    deepest = deepest_site(adapter, streams) if streams else None
    return [n for n in names if adapter.specs[n].role != "embed" and n != deepest]


def no_representation_site(adapter) -> str:
    """The not-applicable reason of a representation score with no site to score."""
    return f"{adapter.family} has no representation site besides the embedding and the readout's input"


# ---- the primary variable and its labels ------------------------------------------------------

def latent_at(latent: torch.Tensor, position: int) -> torch.Tensor:
    """A per-example latent (n,) as it is; a per-position latent (n, T) read at `position`: (n,)."""
    return latent if latent.dim() == 1 else latent[:, position]


def primary_value(latents: dict[str, torch.Tensor], task) -> torch.Tensor:
    """The task's primary variable per example, read at its position: (n,)."""
    return latent_at(latents[task.primary], task.primary_position)


def class_index(values: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Labels -> class indices in [0, C) of the sorted `classes` (C,); -1 for a label not among them."""
    slot = torch.searchsorted(classes, values.contiguous()).clamp_max(len(classes) - 1)  # (n,)
    return torch.where(classes[slot] == values, slot, -1)


def one_hot(values: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(n,) labels -> (n, C) float64 indicators of the classes (C,); all 0 for another label."""
    return (values[:, None] == classes[None]).double()


# ---- behavioural scores -------------------------------------------------------------------

def chance_corrected(values, chance: float) -> np.ndarray:
    """(x - chance) / (1 - chance): 0 at chance, 1 at perfect, negative below chance."""
    return (np.asarray(values, dtype=float) - chance) / max(1.0 - chance, 1e-9)


def answer_prediction(logits: torch.Tensor, task) -> torch.Tensor:
    """The task's answer token with the highest logit: (n, V) -> (n,) token ids.

    Behavioural scores decide among `task.answer_tokens()` only, so a decoder that puts
    mass on tokens the task never answers with is not penalised for the vocabulary's size.
    """
    answers = task.answer_tokens().to(logits.device)  # (C,)
    return answers[logits[:, answers].argmax(-1)]  # (n,)


def majority_rate(answer: torch.Tensor) -> float:
    """The chance level of a cell's answers: the share of its most frequent answer."""
    return float(torch.unique(answer, return_counts=True)[1].max()) / max(len(answer), 1)

"""The technique contract: what an interpretability method must return to enter the matrix.

A technique asks for roles (e.g. `stream`) and capabilities (e.g. `gradients`), gets an
adapter (a trained organism or its random-init control) and a task, and returns a `Result`:
one primary `score` in [0, 1] (higher = the known mechanism was recovered better),
`per_example` values whose mean is the score before clipping (the verdict bootstraps over
them), secondary metrics, per-site details, or `applicable=False` with a reason.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class Result:
    score: float | None
    per_example: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)  # one row per site (or site, pos)
    applicable: bool = True
    reason: str = ""

    @classmethod
    def not_applicable(cls, reason: str) -> "Result":
        return cls(score=None, applicable=False, reason=reason)

    @classmethod
    def from_per_example(cls, per_example, **kw) -> "Result":
        values = np.asarray(per_example, dtype=float)
        return cls(score=float(np.clip(values.mean(), 0.0, 1.0)), per_example=values.tolist(), **kw)


class Technique(abc.ABC):
    """Subclasses set `name`, `roles` (any one suffices unless `all_roles`), `capabilities`,
    and implement `run`. Knobs live in `default_config`, overridable per run."""

    name: ClassVar[str]
    roles: ClassVar[frozenset[str]] = frozenset()
    capabilities: ClassVar[frozenset[str]] = frozenset()
    default_config: ClassVar[dict[str, Any]] = {}

    def __init__(self, **config: Any):
        self.config = {**self.default_config, **config}

    def why_not(self, adapter, task) -> str | None:
        """The reason this technique cannot run on `adapter`, or None."""
        missing_caps = self.capabilities - adapter.capabilities
        if missing_caps:
            return f"{adapter.family} lacks {', '.join(sorted(missing_caps))}"
        have = {s.role for s in adapter.hook_points()}
        if self.roles and not (self.roles & have):
            return f"{adapter.family} exposes no hook point with role {' or '.join(sorted(self.roles))}"
        return None

    def __call__(self, adapter, task, seed: int) -> Result:
        reason = self.why_not(adapter, task)
        if reason:
            return Result.not_applicable(reason)
        return self.run(adapter, task, seed)

    @abc.abstractmethod
    def run(self, adapter, task, seed: int) -> Result:
        """Score the technique on one adapter and task with data drawn from `seed`."""

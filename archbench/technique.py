"""The technique contract: what an interpretability method must return to enter the matrix.

A technique asks for roles (e.g. `stream`) and capabilities (e.g. `gradients`), gets an
adapter (a trained organism or its random-init control) and a task, and returns a `Result`:
one primary `score` in [0, 1] (higher = the known mechanism was recovered better),
`per_example` values whose mean is the score before clipping (the verdict bootstraps over
them), secondary metrics, per-site details, or `applicable=False` with a reason. The helpers
techniques share to compute a score are in `archbench/technique_helpers.py`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

# the helpers this module used to define, for plugins that import them from here
from archbench.technique_helpers import (answer_prediction, chance_corrected, majority_rate,  # noqa: F401
                                         representation_sites)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SCORING_VERSION", "Result", "Technique", "answer_prediction", "chance_corrected", "majority_rate",
           "representation_sites"]

# Bumped whenever the meaning of any score changes (chance correction, scored sites, the
# verdict's interval). It is part of every cell's key, and `archbench report` refuses to put
# cells of different scoring versions in one table.
SCORING_VERSION = 2


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
    """Subclasses set `name`, `roles` (any one of them suffices), `capabilities`,
    and implement `run`. Knobs live in `default_config`, overridable per run."""

    name: ClassVar[str]
    # Bumped when this technique's score changes meaning; part of the cell key with `config`.
    version: ClassVar[int] = 1
    # True for techniques that score a representation (probe, SAE, CKA): they are n/a on
    # families whose random-init control shares the trained model's representation by
    # construction (reservoirs: only the readout is trained), where they can only score 0.
    representation: ClassVar[bool] = False
    roles: ClassVar[frozenset[str]] = frozenset()
    capabilities: ClassVar[frozenset[str]] = frozenset()
    default_config: ClassVar[dict[str, Any]] = {}
    # The sizes this technique runs at on a researcher's checkpoint (a `--model hf` row),
    # merged over `default_config`. Per example a 10^8-parameter model costs about 10^4
    # times a synthetic organism, so the synthetic sizes cost hours per cell on a CPU; the
    # checkpoint sizes say what they trade (fewer examples: wider intervals). Empty: the
    # default sizes everywhere.
    checkpoint_config: ClassVar[dict[str, Any]] = {}
    # Why this technique's random-init control can score well above 0 although its score is
    # chance-corrected (a capability present at init, a floor of the estimator); the report
    # prints it beside every control mean above `report_tables.HIGH_CONTROL`.
    control_floor: ClassVar[str] = ""
    # What the report draws by depth: the `details` key that holds this technique's per-site
    # value (rows with a `layer`; rows marked `trivial` or `scored=False` are left out).
    # None: no depth figure.
    depth_value: ClassVar[str | None] = None

    @classmethod
    def report_tables(cls, cells: pd.DataFrame, reference: str) -> list:
        """The report's tables that only this technique's cells can give (`report_tables.Table`
        each), placed after the behaviour table; `cells` holds every cell of the store.
        None by default."""
        return []

    def __init__(self, **config: Any):
        self.config = {**self.default_config, **config}

    @classmethod
    def for_arch(cls, arch: str) -> "Technique":
        """This technique as it runs on one matrix row: `checkpoint_config` on a checkpoint's row."""
        from archbench.checkpoints import is_checkpoint

        return cls(**cls.checkpoint_config) if is_checkpoint(arch) else cls()

    def why_not(self, adapter, task) -> str | None:
        """The reason this technique cannot run on `adapter`, or None."""
        missing_caps = self.capabilities - adapter.capabilities
        if missing_caps:
            return f"{adapter.family} lacks {', '.join(sorted(missing_caps))}"
        if self.representation and getattr(adapter, "control_shares_representation", False):
            return (f"{adapter.family} trains only its readout: the control has the same "
                    "representation by construction")
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


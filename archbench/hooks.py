"""Hook points and interventions: the one activation interface shared by every family.

A `HookSpec` names an activation (`blocks.{i}.resid_post`), gives it a role from a closed
vocabulary that techniques ask for (`stream`, `mixer`, ...), and names its axes. Activations
always have axes `(batch, pos, *features)`; non-sequence models use `pos` of length 1.

Interventions are small callables `fn(activation, spec) -> activation` in the spirit of
pyvene's intervention objects (Wu et al. 2024) and TransformerLens hook functions
(Nanda & Bloom 2022): `Zero`, `Mean`, `Patch`, `Add`, `Project`, or any plain callable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

# The closed role vocabulary (docs/architecture.md, "Hook interface"). Names differ by family; roles do not.
ROLES: dict[str, str] = {
    "embed": "input representation",
    "stream": "main state after block i (the residual stream or its analogue)",
    "mixer": "token-mixing output (attention, SSM, WKV)",
    "mlp": "channel-mixing output (MLP, MoE, KAN edges)",
    "state": "recurrent state per step",
    "attn_pattern": "attention weights",
    "router": "gate logits of a mixture of experts",
    "expert": "one expert's output",
    "logits": "final readout",
    "other": "a site with no role techniques ask for (kept for inspection and patching)",
}


@dataclass(frozen=True)
class HookSpec:
    """One hook point: its dotted name, its role, the names of its axes, and its depth."""

    name: str
    role: str
    axes: tuple[str, ...]
    layer: int | None = None  # block index (or loop/step index) for depth-ordered techniques

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r} for {self.name}; roles: {sorted(ROLES)}")
        if self.axes[:2] != ("batch", "pos"):
            raise ValueError(f"{self.name}: axes must start with ('batch', 'pos'), got {self.axes}")


Positions = Union[None, int, Sequence[int], torch.Tensor]


def position_mask(positions: Positions, batch: int, length: int, device=None) -> torch.Tensor | None:
    """(batch, pos) bool mask of the positions an intervention touches; None means all.

    `positions` may be an int or a list of ints (the same positions in every example), a
    (batch,) long tensor (one position per example), or a (batch, pos) bool tensor.
    """
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor):
        if positions.dtype == torch.bool:
            return positions.to(device).expand(batch, length)
        if positions.dim() != 1 or positions.shape[0] != batch:
            raise ValueError(f"a tensor of positions must be (batch,) = ({batch},), "
                             f"got {tuple(positions.shape)}")
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask[torch.arange(batch, device=device), positions.to(device)] = True
        return mask  # (batch, pos): one position per example
    idx = [positions] if isinstance(positions, int) else list(positions)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, idx] = True
    return mask  # (batch, pos): the same positions in every example


def _blend(act: torch.Tensor, new: torch.Tensor, positions: Positions) -> torch.Tensor:
    """`new` where positions are selected, `act` elsewhere."""
    mask = position_mask(positions, act.shape[0], act.shape[1], act.device)
    if mask is None:
        return new
    mask = mask.view(*mask.shape, *([1] * (act.dim() - 2)))  # (batch, pos, 1, ...)
    return torch.where(mask, new, act)


class Intervention:
    """Base class: subclasses implement `__call__(activation, spec) -> activation`."""

    def __call__(self, act: torch.Tensor, spec: HookSpec) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass
class Zero(Intervention):
    """Set the activation to zero (at `positions`, or everywhere)."""

    positions: Positions = None

    def __call__(self, act, spec):
        return _blend(act, torch.zeros_like(act), self.positions)


@dataclass
class Mean(Intervention):
    """Replace by a mean activation: `values` broadcasts against (batch, pos, *features)."""

    values: torch.Tensor  # (*features) or (pos, *features)
    positions: Positions = None

    def __call__(self, act, spec):
        return _blend(act, self.values.to(act).expand_as(act), self.positions)


@dataclass
class Patch(Intervention):
    """Interchange: put the source run's activation in place (at `positions`, or everywhere)."""

    source: torch.Tensor  # (batch, pos, *features), same shape as the activation
    positions: Positions = None

    def __call__(self, act, spec):
        if self.source.shape != act.shape:
            raise ValueError(f"Patch at {spec.name}: source shape {tuple(self.source.shape)} "
                             f"!= activation shape {tuple(act.shape)}")
        return _blend(act, self.source.to(act), self.positions)


@dataclass
class Add(Intervention):
    """Add `scale * vector` (a steering vector broadcast over batch and position)."""

    vector: torch.Tensor  # (*features), or anything broadcastable to the activation
    positions: Positions = None
    scale: float = 1.0

    def __call__(self, act, spec):
        return _blend(act, act + self.scale * self.vector.to(act), self.positions)


@dataclass
class Project(Intervention):
    """Project out the span of `out` (k, d) from the last axis: a ← a − a·Q·Qᵀ."""

    out: torch.Tensor  # (k, d) directions, need not be orthonormal
    positions: Positions = None

    def __call__(self, act, spec):
        q, _ = torch.linalg.qr(self.out.to(act).T)  # (d, k) orthonormal basis of span(out)
        return _blend(act, act - (act @ q) @ q.T, self.positions)


InterventionLike = Union[Intervention, Callable[[torch.Tensor, HookSpec], torch.Tensor]]


class HookPoint(torch.nn.Identity):
    """An identity module that exists only to be hooked (TransformerLens's HookPoint).

    Adapters insert one where a library computes an activation without a module boundary
    (an attention pattern, a recurrent state) so that the generic forward-hook machinery
    can read and replace it.
    """

    @property
    def hooked(self) -> bool:
        """Whether a hook is attached now: code that must do extra work to expose a value
        (a per-head split of a fused projection) does it only then."""
        return bool(self._forward_hooks or self._forward_pre_hooks)


class StateHookPoint(HookPoint):
    """A HookPoint for per-step recurrent states that a scan reruns after an edit.

    The scan passes its clean states through this point; when an intervention edits some
    steps, the recurrence runs on from the edited states, so the states it actually used
    differ from the returned value after the edited step. The scan records those in `used`,
    and `Adapter.run` caches them in place of the intervention's output (then clears `used`).
    """

    used: "torch.Tensor | None" = None

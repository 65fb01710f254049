"""Feature groups: a slice of one hook point's first feature axis, addressed as `name[a:b]`.

Some components are not whole hook points: a KAN's hidden layer is one hook point of edge
activations (batch, pos, out, in), and a group of its output nodes, with the edges into
them, is a component; a spiking layer's membrane (batch, pos, neuron) is one hook point,
and a group of its neurons is a component. `Adapter.run` accepts `name[a:b]` wherever it
accepts a hook name, in `cache` and in `interventions`:

- cached, `name[a:b]` is `name`'s activation sliced to features a..b-1 of its first feature
  axis (axis 2), (batch, pos, b - a, ...);
- an intervention on `name[a:b]` sees that slice (and a `HookSpec` named `name[a:b]` with
  `name`'s role, axes and depth), and what it returns replaces the slice alone; the rest of
  the activation is untouched. Several groups of one hook point compose in the order given.

Groups are addressed, never listed: `Adapter.specs`, and so every technique's site list,
holds whole hook points only. The known-answer organisms of KAN and spiking
(`archbench.iit_sites`) designate groups; this is the "optionally a subspace" of an
interchange-intervention alignment (Geiger et al. 2022), restricted to coordinate slices.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Mapping

import torch

from archbench.hooks import HookSpec, InterventionLike

_GROUP = re.compile(r"^(?P<base>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def parse(name: str) -> tuple[str, slice] | None:
    """`name[a:b]` -> (name, slice(a, b)); None for a plain hook name."""
    m = _GROUP.match(name)
    if m is None:
        return None
    start, stop = int(m["start"]), int(m["stop"])
    if stop <= start:
        raise KeyError(f"feature group {name}: empty slice (write name[a:b] with a < b)")
    return m["base"], slice(start, stop)


def base_name(name: str) -> str:
    """The hook point a name addresses (itself for a plain hook name)."""
    found = parse(name)
    return found[0] if found else name


def split(name: str, n_features: int, n_groups: int) -> list[str]:
    """`name` cut into `n_groups` equal consecutive groups of its `n_features` features."""
    if n_features % n_groups:
        raise ValueError(f"{name}: {n_features} features do not split into {n_groups} equal groups")
    size = n_features // n_groups
    return [f"{name}[{g * size}:{(g + 1) * size}]" for g in range(n_groups)]


def spec(specs: Mapping[str, HookSpec], name: str) -> HookSpec | None:
    """The `HookSpec` of a hook name or feature group (None if its hook point is unknown)."""
    found = parse(name)
    if found is None:
        return specs.get(name)
    base = specs.get(found[0])
    if base is None or len(base.axes) < 3:
        return None  # no feature axis to slice
    return replace(base, name=name)


def select(act: torch.Tensor, name: str) -> torch.Tensor:
    """The group's slice of its hook point's activation: (batch, pos, f, ...) -> (batch, pos, b - a, ...)."""
    found = parse(name)
    return act if found is None else act[:, :, found[1]]


def on_group(intervention: InterventionLike, name: str, group_spec: HookSpec) -> InterventionLike:
    """An intervention on the whole hook point that applies `intervention` to the group's slice."""
    sl = parse(name)[1]

    def edit(act: torch.Tensor, spec: HookSpec) -> torch.Tensor:
        part = intervention(act[:, :, sl], group_spec)  # (batch, pos, b - a, ...)
        if part.shape != act[:, :, sl].shape:
            raise ValueError(f"intervention at {name} returned {tuple(part.shape)}, "
                             f"expected {tuple(act[:, :, sl].shape)}")
        # concatenated, not written in place: the edit stays differentiable for attribution
        return torch.cat([act[:, :, :sl.start], part.to(act), act[:, :, sl.stop:]], dim=2)

    return edit


def merge(interventions: Mapping[str, InterventionLike],
          specs: Mapping[str, HookSpec]) -> dict[str, InterventionLike]:
    """Interventions keyed by hook point: each feature group's folded into its hook point's,
    several on one hook point applied in the order given."""
    by_base: dict[str, list[InterventionLike]] = {}
    for name, fn in interventions.items():
        if parse(name) is not None:
            fn = on_group(fn, name, spec(specs, name))
        by_base.setdefault(base_name(name), []).append(fn)
    return {base: fns[0] if len(fns) == 1 else _chain(fns) for base, fns in by_base.items()}


def _chain(fns: list[InterventionLike]) -> InterventionLike:
    def edit(act: torch.Tensor, spec: HookSpec) -> torch.Tensor:
        for fn in fns:
            act = fn(act, spec)
        return act

    return edit

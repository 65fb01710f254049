"""Per-step hook points for models that run their own time loop (spiking nets, reservoirs).

A recurrent model that loops over time in Python computes its state one step at a time, so
a plain forward hook fires T times per forward with a (batch, *features) tensor each time.
The archbench contract wants one activation per name with axes (batch, pos, *features),
and an intervention must act at its positions only, with the edited value feeding the
recurrence.

The model calls a `StepHookPoint` as `hook(x, t, n_steps)` at every step t. The adapter
describes it with a `StepSite` and mixes in `StepwiseAttach`, which routes those sites to
`attach_stepwise`:

- at step t the intervention sees a canonical (batch, T, *features) tensor holding the
  already-edited values of steps < t, the fresh value at t, and zeros for steps > t (not yet
  computed); only its position t is read back, so `positions=[t]` acts at step t only and
  the replaced value is what the model carries into step t + 1;
- the cache holds the stacked per-step values (after any intervention), (batch, T, *f);
  with `grad=True` it is a leaf wired into every step, so gradients with respect to the
  cached tensor are the gradients with respect to the per-step activations.

Position-wise interventions (Zero, Mean, Patch, Add, Project) therefore behave exactly as
on a whole-sequence tensor; a custom callable may look at earlier steps but not later ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from archbench.adapter import Site
from archbench.hooks import HookSpec


class StepHookPoint(nn.Module):
    """Identity over one time step: `hook(x, t, n_steps) -> x`, hooked once per step."""

    def forward(self, x: torch.Tensor, t: int, n_steps: int) -> torch.Tensor:
        return x


@dataclass
class StepSite(Site):
    """A `StepHookPoint` whose per-step tensors (batch, *f) form one (batch, T, *f) activation."""


def attach_stepwise(site: StepSite, spec: HookSpec, intervention, store, grad: bool):
    """Register the per-step hook on `site.module`; returns the handle (see module docstring)."""
    history: list[torch.Tensor] = []  # edited per-step values of the current forward
    leaf: list[torch.Tensor] = []  # with grad: the cached (B, T, *f) tensor, in the graph
    steps: list[torch.Tensor] = []  # with grad: its T per-step views (B, *f)

    def hook(module, args, output):
        x, t, n_steps = args[0], int(args[1]), int(args[2])  # (B, *f), step, number of steps
        if t == 0:
            history.clear()
            leaf.clear()
            steps.clear()
        new = None
        if intervention is not None:
            later = [torch.zeros_like(x)] * (n_steps - t - 1)
            canon = torch.stack([*history, x, *later], dim=1)  # (B, T, *f)
            new = intervention(canon, spec)[:, t]  # (B, *f): only step t is read back
            x = new
        history.append(x)
        if store is None:
            return new
        if not grad:
            if t == n_steps - 1:  # stacked once, at the last step
                store[spec.name] = torch.stack(history, dim=1).detach()  # (B, T, *f)
            return new
        # grad=True: the cache is a leaf whose step t is added to the carried value as
        # (leaf_t - leaf_t.detach()), exactly zero, so d(out)/d(cache) is the gradient with
        # respect to the per-step activation (through every later step) and values are unchanged.
        # Its steps are views from one `unbind` (indexing leaf[:, t] at every step would
        # zero-fill a whole (B, T, *f) gradient per step in the backward).
        if t == 0:
            leaf.append(torch.zeros(x.shape[0], n_steps, *x.shape[1:], dtype=x.dtype,
                                    device=x.device, requires_grad=True))
            store[spec.name] = leaf[0]
            steps.extend(leaf[0].unbind(1))
        leaf[0].data[:, t] = x.detach()
        step = steps[t]
        return x + (step - step.detach())

    return site.module.register_forward_hook(hook, prepend=True)


class StepwiseAttach:
    """Adapter mixin: `StepSite`s attach per step, every other site as usual."""

    def _attach(self, site, spec, intervention, store, grad):
        if isinstance(site, StepSite):
            return attach_stepwise(site, spec, intervention, store, grad)
        return super()._attach(site, spec, intervention, store, grad)

"""Where each family's known-answer organism must hold each task's primary variable.

One table: family -> task (or "*" for every task) -> the designated component, a hook name
template in which `{last}` is the deepest block (or loop iteration). The alignment's
position is the answer position, and its candidates are every hook point of the table's
candidate roles at that position (the designated one included), so strict IIT
(`archbench.iit`) trains every other component there to have no effect.

Why the last block's token mixer: it is the last place where information from other
positions enters the answer position, so it is the one component at that position through
which every task's variable *can* be routed while every other component there (earlier
mixers and MLPs at the answer position, and the MLP after it) carries nothing the answer
needs. The variable is computed at earlier positions by earlier blocks (count: the
running count at the last input token; modadd: (a + b) mod p at b's position, which
attends to a; recall: the value whose preceding key matches, by a previous-token head) and
moved to the answer position by that mixer. An earlier mixer could not be designated
together with strict training of the components after it on tasks such as modadd, whose
variable needs an MLP after the attention that gathers a and b: patching that MLP from the
source would then change the answer. Candidate roles are `mixer` and `mlp` (components that
do not overlap: MoE experts sit inside their block's `mlp`, and a recurrent `state` feeds
its own block's mixer). Families whose training cannot shape an inner representation are in
`NOT_APPLICABLE` with the reason.

Two families have no token mixer and one hook point per layer for their components, so
their designated component is a *feature group* (`archbench.feature_groups`), group 0 of
`GROUPED`'s equal groups of one hook point, and the candidates are that hook point's groups:

- KAN: the first layer's edges into hidden nodes 0-3 of 16 (`blocks.0.edges[0:4]`). The
  first layer is where every input reaches the hidden nodes, so a group of hidden nodes is
  the component through which the variable can be computed while the other groups carry
  none of it. The output layer's edges are not candidates: they read every hidden node,
  so those from the designated group carry its variable forward by construction, as a
  later stream site does.
- spiking: the last layer's membrane, neurons 0-15 of 64 (`blocks.{last}.mem[0:16]`), at
  the answer step, which the readout reads. Earlier layers' membranes are not candidates:
  one edited at the answer step cannot change the answer (its spikes at that step fired
  before the edit and there is no later step), so they would be inert without training and
  would make every ranking easier by construction.
"""

from __future__ import annotations

import re

import torch

from archbench import feature_groups
from archbench.iit import Alignment

CANDIDATE_ROLES = ("mixer", "mlp")

DESIGNATED: dict[str, dict[str, str]] = {
    "transformer": {"*": "blocks.{last}.attn.out"},
    "moe": {"*": "blocks.{last}.attn.out"},
    "looped": {"*": "loops.{last}.attn.out"},
    "mamba": {"*": "blocks.{last}.ssm.out"},
    "mamba2": {"*": "blocks.{last}.ssm.out"},
    "rwkv": {"*": "blocks.{last}.wkv.out"},
    # bidirectional: the last block's attention at the answer slot is the last place where the
    # inputs reach the slot, as the last mixer at the answer position is in a causal model
    "diffusion": {"*": "blocks.{last}.attn.out"},
}

# family -> (hook name template, number of equal feature groups); group 0 is designated
GROUPED: dict[str, tuple[str, int]] = {
    "kan": ("blocks.0.edges", 4),
    "spiking": ("blocks.{last}.mem", 4),
}

NOT_APPLICABLE: dict[str, str] = {
    "reservoir": "only the linear readout is trained (ridge regression): no training can shape the reservoir",
    "nvar": "only the linear readout is trained (ridge regression): the features are fixed by construction",
}


def why_not(family: str) -> str | None:
    """Why a family has no known-answer organisms (None if it has)."""
    if family in DESIGNATED or family in GROUPED:
        return None
    return NOT_APPLICABLE.get(family, f"no designated site is chosen for {family}")


def _grouped(adapter, task) -> Alignment:
    """Group 0 of `GROUPED`'s hook point, among all its groups, at the answer position."""
    template, n_groups = GROUPED[adapter.family]
    pattern = re.compile(template.replace(".", r"\.").format(last=r"(\d+)"))
    layers = [int(m.group(1)) if m.groups() else 0 for m in map(pattern.fullmatch, adapter.specs) if m]
    name = template.format(last=max(layers))
    probe = torch.zeros(1, task.seq_len, dtype=torch.long)  # (1, T): only the activation's shape is read
    n_features = adapter.run(probe, cache=[name]).cache[name].shape[2]
    groups = tuple(feature_groups.split(name, n_features, n_groups))
    return Alignment(designated=groups[0], candidates=groups, position=adapter.answer_position(task.seq_len))


def alignment(adapter, task) -> Alignment:
    """The designated component, its candidates and position for this adapter on this task."""
    reason = why_not(adapter.family)
    if reason:
        raise ValueError(f"{adapter.family}: {reason}")
    if adapter.family in GROUPED:
        found = _grouped(adapter, task)
        found.check(adapter)
        return found
    table = DESIGNATED[adapter.family]
    template = table.get(task.name, table["*"])
    components = [s for s in adapter.specs.values() if s.role in CANDIDATE_ROLES]
    last = max(s.layer for s in components)
    designated = template.format(last=last)
    found = Alignment(designated=designated, candidates=tuple(s.name for s in components),
                      position=adapter.answer_position(task.seq_len))
    found.check(adapter)
    return found

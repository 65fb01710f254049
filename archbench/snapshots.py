"""Training snapshots for the development axis: the weights at fixed fractions of training.

`Adapter.fit` cannot know in advance at which step training will stop (the target, a
plateau or the step cap), so `SnapshotKeeper` copies the weights every `interval` steps and,
when it holds more than `capacity` copies, drops every other one and doubles the interval:
whatever the final step, the copies are spread over the whole run at a resolution of at
most 2 / capacity of it. At the end `at_stages` picks, for each fraction of the steps
trained (`archbench.variants.STAGES`), the copy nearest it. Copying the weights does not
touch the optimiser or any random generator, so an organism trains bit for bit as without
snapshots.

The chosen snapshots are saved beside the organism's weights as `snapshots.safetensors`
(tensor names `step{N}/{parameter}`), hashed and checked like every weight file
(archbench/integrity.py); the metadata lists them with each one's held-out accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILE = "snapshots.safetensors"


class SnapshotKeeper:
    def __init__(self, model: torch.nn.Module, interval: int = 10, capacity: int = 40):
        self.model = model
        self.interval = interval
        self.capacity = capacity
        self.kept: dict[int, dict[str, torch.Tensor]] = {}

    def offer(self, step: int) -> None:
        """Called after every optimiser step; keeps a copy on the current grid."""
        if step % self.interval:
            return
        self.kept[step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if len(self.kept) > self.capacity:
            self.interval *= 2
            self.kept = {s: w for s, w in self.kept.items() if s % self.interval == 0}

    def at_stages(self, final_step: int, stages) -> list[tuple[float, int, dict[str, torch.Tensor]]]:
        """(stage, step, weights) of the kept copy nearest each fraction of `final_step`;
        copies at the final step itself are left out (that is the organism)."""
        steps = [s for s in sorted(self.kept) if s < final_step]
        if not steps:
            return []
        chosen = []
        for stage in stages:
            step = min(steps, key=lambda s: (abs(s - stage * final_step), s))
            chosen.append((float(stage), step, self.kept[step]))
        return chosen


def save(path: Path, snapshots) -> None:
    """Write (stage, step, weights) snapshots into an organism directory (steps deduplicated)."""
    tensors = {f"step{step}/{k}": v.contiguous() for _, step, weights in snapshots for k, v in weights.items()}
    save_file(tensors, str(Path(path) / FILE))


def load(path: Path, step: int) -> dict[str, torch.Tensor]:
    """The weights saved for `step` in an organism directory (a KeyError if none were)."""
    prefix = f"step{step}/"
    tensors = load_file(str(Path(path) / FILE))
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise KeyError(f"{Path(path) / FILE} holds no snapshot at step {step}")
    return state

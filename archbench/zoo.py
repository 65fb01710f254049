"""The zoo: trained organisms per (architecture, task, seed), cached, gated, reused.

An organism is trained once from its config and cached as safetensors + JSON metadata under
`$ARCHBENCH_CACHE/organisms/` (default `~/.cache/archbench`). Its directory name hashes
everything that defines it (family, model and training config, task knobs, seed, archbench
version), so a changed config never reuses a stale model. Writes go to a temporary directory
that is renamed into place, so a killed run never leaves a half-written organism.

The random-init control of an organism is the very initialisation it was trained from:
`Adapter.for_task(task, seed)` with the same seed, built, never trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from archbench import registry
from archbench.version import __version__

DEFAULT_GATE = 0.9


def cache_root() -> Path:
    return Path(os.environ.get("ARCHBENCH_CACHE", Path.home() / ".cache" / "archbench"))


# Bumped whenever training changes meaning without a config change (e.g. the validation
# split used for early stopping; 3: cosine learning-rate decay and plateau stopping; 4: a
# plateau rise must also beat two standard errors of the validation accuracy), so
# cached organisms from older code are not reused; `Adapter.training_format` does the same
# for one family.
TRAINING_FORMAT = 4


def organism_id(arch: str, task, seed: int) -> str:
    cls = registry.adapter(arch)
    task = task.for_seed(seed)
    identity = {
        "arch": arch, "model": cls.default_config, "train": cls.train_config,
        "task_train": cls.task_train_config.get(task.name, {}),
        "task_model": cls.task_model_config.get(task.name, {}), "task": task.name,
        "task_config": task.config(), "seed": seed, "archbench": __version__,
        "training_format": TRAINING_FORMAT, "family_training_format": cls.training_format,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{arch}/{task.name}/seed{seed}-{digest[:12]}"


def organism_dir(arch: str, task, seed: int) -> Path:
    return cache_root() / "organisms" / organism_id(arch, task, seed)


def cached_meta(arch: str, task, seed: int) -> dict[str, Any] | None:
    path = organism_dir(arch, task, seed) / "adapter.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["meta"]


def organism(arch: str, task, seed: int):
    """(trained adapter, metadata): from the cache, or trained now and cached."""
    cls = registry.adapter(arch)
    task = task.for_seed(seed)
    path = organism_dir(arch, task, seed)
    if (path / "adapter.json").exists():
        return cls.load(path), cached_meta(arch, task, seed)
    adapter = cls.for_task(task, seed)
    report = adapter.fit(task, seed)
    meta = {**asdict(report), "arch": arch, "task": task.name, "seed": seed,
            "task_config": task.config(), "organism": organism_id(arch, task, seed),
            "archbench": __version__, "torch": torch.__version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        adapter.save(tmp, meta)
        os.replace(tmp, path)  # atomic; if another process won the race, keep theirs
    except OSError:
        if not (path / "adapter.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return adapter, meta


def plant(arch: str, task_name: str, seed: int, accuracy: float = 1.0) -> dict[str, Any]:
    """Cache the untrained model as the organism, with a recorded accuracy; returns its meta.

    For dry runs of the runner and for tests: the matrix then runs without training, and
    the recorded accuracy decides the gate.
    """
    task = registry.task(task_name).for_seed(seed)
    adapter = registry.adapter(arch).for_task(task, seed)
    meta = {"accuracy": accuracy, "train_accuracy": accuracy, "steps": 0, "seconds": 0.0,
            "history": [], "arch": arch, "task": task_name, "seed": seed, "planted": True,
            "organism": organism_id(arch, task, seed)}
    adapter.save(organism_dir(arch, task, seed), meta)
    return meta


def control(arch: str, task, seed: int):
    """The random-init control: the same architecture and seed, never trained."""
    return registry.adapter(arch).for_task(task.for_seed(seed), seed)


def gate_reason(meta: dict[str, Any], threshold: float = DEFAULT_GATE) -> str | None:
    """Why an organism fails the behavioural gate (None if it passes)."""
    if meta["accuracy"] < threshold:
        # floor to 3 decimals so that 0.8996 never reads as "0.900 < 0.900"
        shown = math.floor(meta["accuracy"] * 1000) / 1000
        return f"held-out accuracy {shown:.3f} < {threshold:.3f}"
    return None


def list_organisms() -> list[dict[str, Any]]:
    root = cache_root() / "organisms"
    rows = []
    for path in sorted(root.glob("*/*/*/adapter.json")):
        meta = json.loads(path.read_text())["meta"]
        rows.append({k: meta.get(k) for k in ("arch", "task", "seed", "accuracy", "steps", "seconds", "stopped")}
                    | {"path": str(path.parent)})
    return rows

"""The zoo: trained organisms per (architecture, task, seed), cached, gated, reused.

An organism is trained once from its config and cached as safetensors + JSON metadata under
`$ARCHBENCH_CACHE/organisms/` (default `~/.cache/archbench`). Its directory name hashes
everything that defines it (family, model and training config, task knobs, seed, archbench
version), so a changed config never reuses a stale model. Writes go to a temporary directory
that is renamed into place, so a killed run never leaves a half-written organism.

Every load is checked (archbench/integrity.py): valid metadata, weight files matching the
sha256 recorded at build, and a re-gate of the loaded model on held-out examples. An
organism that fails is moved to `$ARCHBENCH_CACHE/quarantine/` and rebuilt, or, with
`no_retrain`, refused with a one-line `CorruptOrganism`.

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
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from archbench import checkpoints, integrity, registry, snapshots
from archbench.integrity import CorruptOrganism, OrganismWarning
from archbench.version import __version__

DEFAULT_GATE = 0.9
# examples per forward when scoring a checkpoint's gate: logits of a real vocabulary are big
# ((32, 20, 49152) float32 is 126 MB)
CHECKPOINT_BATCH = 32

# what loading a damaged organism raises (safetensors' errors are OSError or SafetensorError,
# a state dict of the wrong shape or keys RuntimeError, a damaged config KeyError or TypeError)
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError)


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


def cached_meta(arch: str, task, seed: int, no_retrain: bool = False) -> dict[str, Any] | None:
    """The metadata of a cached organism whose files pass the checks that load no model.

    None when there is none, or when its metadata or weight files fail a check (`organism`
    then rebuilds it and says why); with `no_retrain` a failed check raises CorruptOrganism
    instead. An organism written before archbench recorded hashes passes here on its
    metadata and whole files; `organism` re-gates it on first load and records its hash.
    """
    task = task.for_seed(seed)
    path = organism_dir(arch, task, seed)
    if not path.exists():
        return None
    try:
        meta = integrity.read_info(path, organism_id(arch, task, seed), registry.adapter(arch).family)["meta"]
        integrity.check_weights(path, meta)
    except CorruptOrganism:
        if no_retrain:
            raise
        return None
    return meta


# (organism directory, weights digest, recorded accuracy) re-gated in this process: a worker
# loads an organism once per cell, and the same bytes give the same model
_regated: set[tuple[str, str, float]] = set()


def _load_checked(cls, path: Path, task, seed: int):
    """(adapter, metadata) of the cached organism at `path`, after every integrity check
    (see archbench/integrity.py); raises CorruptOrganism. An organism without a recorded
    hash (written by an earlier archbench) has it recorded once the re-gate passes."""
    meta = integrity.read_info(path, path_id(path), cls.family)["meta"]
    digest = integrity.check_weights(path, meta)
    try:
        adapter = cls.load(path)
    except _LOAD_ERRORS as exc:
        raise CorruptOrganism(f"{path / 'model.safetensors'} does not load into the organism "
                              f"({integrity.first_line(exc)})") from None
    key = (str(path), json.dumps(digest, sort_keys=True), float(meta["accuracy"]))
    legacy = integrity.WEIGHTS_KEY not in meta
    checked = ""
    # a planted model's accuracy is declared; a checkpoint's bytes are the sha256-checked copy of
    # a file the user gave (re-gating a 135M model costs a minute per worker and organism)
    if not meta.get("planted") and meta.get("stopped") != "pretrained" and (legacy or key not in _regated):
        measured = integrity.check_regate(adapter, task, seed, meta, path / "model.safetensors")
        _regated.add(key)
        checked = f"; re-gate accuracy {measured:.3f}, recorded {meta['accuracy']:.3f}"
    if legacy:
        files = ", ".join(digest)
        try:
            integrity.record_digest(path, digest)
            done = f"recorded the sha256 of {files}"
        except OSError as exc:  # a read-only cache: the re-gate has verified it all the same
            done = f"could not record the sha256 of {files} ({integrity.first_line(exc)})"
        meta = {**meta, integrity.WEIGHTS_KEY: digest}
        warnings.warn(OrganismWarning(f"organism {meta['organism']}: {done} (written before archbench "
                                      f"recorded hashes{checked})"))
    return adapter, meta


def path_id(path: Path) -> str:
    """The organism id of an organism directory (its path below `organisms/`)."""
    return path.relative_to(cache_root() / "organisms").as_posix()


def _quarantine(path: Path) -> Path:
    """Move a corrupt organism out of the zoo (kept for inspection, never read again)."""
    dest = cache_root() / "quarantine" / f"{path_id(path).replace('/', '_')}-{time.strftime('%Y%m%dT%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(path, dest)
    except FileNotFoundError:  # another process moved it first
        pass
    except OSError:  # e.g. the same second's copy is already there
        shutil.rmtree(path, ignore_errors=True)
    return dest


def _write(path: Path, adapter, meta: dict[str, Any]) -> dict[str, Any]:
    """Save an organism with its weights' hash into place atomically; return its metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        adapter.save(tmp, meta)
        meta = {**meta, integrity.WEIGHTS_KEY: integrity.weights_digest(tmp)}
        integrity.record_digest(tmp, meta[integrity.WEIGHTS_KEY])
        os.replace(tmp, path)  # atomic; if another process won the race, keep theirs
    except OSError:
        if not (path / integrity.META_FILE).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def organism(arch: str, task, seed: int, no_retrain: bool = False):
    """(trained adapter, metadata): from the cache after its integrity checks, or trained now.

    A cached organism that fails a check is moved to `$ARCHBENCH_CACHE/quarantine/` and
    rebuilt, with one warning line naming the file and why; with `no_retrain` the
    CorruptOrganism is raised instead.
    """
    cls = registry.adapter(arch)
    task = task.for_seed(seed)
    path = organism_dir(arch, task, seed)
    if path.exists():
        try:
            return _load_checked(cls, path, task, seed)
        except CorruptOrganism as exc:
            if no_retrain:
                raise
            moved = _quarantine(path)
            warnings.warn(OrganismWarning(f"organism {organism_id(arch, task, seed)}: {exc}; rebuilding it "
                                          f"(the old files are in {moved})"))
    if cls.stage is not None:  # a development row: a snapshot of the family's own organism
        adapter, meta = _snapshot_organism(cls, arch, task, seed, no_retrain)
        return adapter, _write(path, adapter, meta)
    if getattr(cls, "checkpoint", None) is not None:  # a researcher's checkpoint: loaded, never trained
        adapter, report = _pretrained(cls, task, seed)
    else:
        adapter = cls.for_task(task, seed)
        report = adapter.fit(task, seed)
    meta = {**asdict(report), "arch": arch, "task": task.name, "seed": seed,
            "task_config": task.config(), "organism": organism_id(arch, task, seed),
            "archbench": __version__, "torch": torch.__version__, **adapter.describe()}
    return adapter, _write(path, adapter, meta)


def _snapshot_organism(cls, arch: str, task, seed: int, no_retrain: bool):
    """(adapter, metadata) of a development row's organism: the snapshot of the family's
    organism nearest `cls.stage` of its training (trained first if the zoo lacks it). Its
    accuracy is the snapshot's held-out accuracy; `final_accuracy` is the organism's, which
    the gate reads (`gate_reason`)."""
    _, final = organism(cls.variant_of, task, seed, no_retrain=no_retrain)
    entry = next((e for e in final.get("snapshots") or [] if abs(e["stage"] - cls.stage) < 1e-9), None)
    if entry is None:
        raise ValueError(f"organism {final['organism']} has no training snapshot at stage {cls.stage:g} "
                              f"(written by an archbench before the development axis, or too short a run); "
                              f"delete {organism_dir(cls.variant_of, task, seed)} to retrain it")
    adapter = cls.for_task(task, seed)
    adapter.model.load_state_dict(snapshots.load(organism_dir(cls.variant_of, task, seed), entry["step"]))
    adapter.model.eval()
    meta = {"accuracy": entry["accuracy"], "train_accuracy": None, "steps": entry["step"], "seconds": 0.0,
            "history": [], "stopped": "snapshot", "stage": cls.stage, "final_accuracy": final["accuracy"],
            "final_steps": final["steps"], "arch": arch, "task": task.name, "seed": seed,
            "task_config": task.config(), "organism": organism_id(arch, task, seed), "archbench": __version__,
            "torch": torch.__version__}
    return adapter, meta


def _pretrained(cls, task, seed: int):
    """(adapter, TrainReport) of a checkpoint on a task: its own weights, with its held-out
    accuracy on the task as the gate (a checkpoint that fails a task is reported, not scored).

    The accuracy is that of the argmax over the task's answer tokens (the decision every
    technique scores) on REGATE_EXAMPLES test examples; a task with many right answers
    (greater_than) judges the choice with its `accepts`."""
    from archbench.adapter import TrainReport
    from archbench.technique_helpers import answer_prediction

    start = time.perf_counter()
    cls.check_task(task)
    adapter = cls.pretrained()

    def accuracy(split: str) -> float:
        ex = task.sample(integrity.REGATE_EXAMPLES, seed, split)
        with torch.no_grad():
            pred = torch.cat([answer_prediction(adapter.forward(ex.tokens[i:i + CHECKPOINT_BATCH])[:, -1], task)
                              for i in range(0, len(ex), CHECKPOINT_BATCH)])  # (n,)
        right = task.accepts(pred, ex.tokens) if hasattr(task, "accepts") else pred == ex.answer
        return float(right.float().mean())

    return adapter, TrainReport(accuracy=accuracy("test"), steps=0, seconds=time.perf_counter() - start,
                                train_accuracy=accuracy("train"), history=[], stopped="pretrained")


def plant(arch: str, task_name: str, seed: int, accuracy: float = 1.0) -> dict[str, Any]:
    """Cache the untrained model as the organism, with a recorded accuracy; returns its meta.

    For dry runs of the runner and for tests: the matrix then runs without training, and
    the recorded accuracy decides the gate (a planted organism is not re-gated).
    """
    task = checkpoints.task(arch, task_name).for_seed(seed)
    adapter = registry.adapter(arch).for_task(task, seed)
    meta = {"accuracy": accuracy, "train_accuracy": accuracy, "steps": 0, "seconds": 0.0,
            "history": [], "arch": arch, "task": task_name, "seed": seed, "planted": True,
            "organism": organism_id(arch, task, seed)}
    path = organism_dir(arch, task, seed)
    if path.exists():
        shutil.rmtree(path)
    return _write(path, adapter, meta)


def known_answer_organism(arch: str, task, seed: int, no_retrain: bool = False):
    """(adapter, metadata) of the known-answer organism trained by strict IIT to hold the
    task's primary variable at one designated component (`archbench.known_answer`)."""
    from archbench import known_answer  # it builds on this module

    return known_answer.organism(arch, task, seed, no_retrain=no_retrain)


def control(arch: str, task, seed: int):
    """The random-init control: the same architecture and seed, never trained."""
    return registry.adapter(arch).for_task(task.for_seed(seed), seed)


def gate_reason(meta: dict[str, Any], threshold: float = DEFAULT_GATE) -> str | None:
    """Why an organism fails the behavioural gate (None if it passes); a NaN or infinite
    accuracy fails it (NaN < threshold is False, so it would otherwise pass)."""
    # a development row is gated on its final organism: an early snapshot is scored, not gated
    accuracy = meta.get("final_accuracy", meta.get("accuracy"))
    if not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool) or not math.isfinite(accuracy):
        return f"held-out accuracy {accuracy!r} is not a finite number"
    if accuracy < threshold:
        # floor to 3 decimals so that 0.8996 never reads as "0.900 < 0.900"
        shown = math.floor(accuracy * 1000) / 1000
        whose = "the final organism's held-out accuracy" if "final_accuracy" in meta else "held-out accuracy"
        return f"{whose} {shown:.3f} < {threshold:.3f}"
    return None


def list_organisms() -> list[dict[str, Any]]:
    """Every cached organism with its metadata and `check`: "ok", "unverified" (no hash
    recorded yet) or the one line saying what is wrong with its files (the re-gate, which
    loads the model, runs when a run or `zoo build` uses it)."""
    root = cache_root() / "organisms"
    rows = []
    for path in sorted(p for p in root.glob("*/*/*") if p.is_dir() and not p.name.startswith(".")):
        arch, task, _ = path_id(path).split("/")
        meta: dict[str, Any] = {"arch": arch, "task": task}
        try:
            family = registry.adapter(arch).family
        except registry.UnknownName:
            family = None
        try:
            meta = integrity.read_info(path, path_id(path), family)["meta"]
            integrity.check_weights(path, meta)
            check = "ok" if integrity.WEIGHTS_KEY in meta else "unverified"
        except CorruptOrganism as exc:
            check = str(exc)
        rows.append({k: meta.get(k) for k in ("arch", "task", "seed", "accuracy", "steps", "seconds", "stopped")}
                    | {"path": str(path), "check": check})
    return rows

"""Integrity checks: a cached organism is what was written, and every score is a number.

An organism's metadata (`adapter.json`) records the sha256 of each of its weight files at
build time (`weights_sha256`). Every load checks the metadata (valid JSON, the organism it
names, a finite accuracy in [0, 1]), the weight files (present, structurally whole, matching
their recorded hashes) and then *re-gates* the loaded model: its accuracy on the first
`REGATE_EXAMPLES` examples of the test split the recorded accuracy was measured on must lie
within `regate_tolerance` of that accuracy. Any failure is a `CorruptOrganism`, whose
message is one line naming the file and why; the zoo rebuilds the organism or, when asked
not to retrain, stops with that line.

A cell's result is checked the same way before it is stored: a non-finite score, a
non-finite per-example value or non-finite activations in the model make an error row
(retried on rerun), never a score.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

META_FILE = "adapter.json"
WEIGHTS_KEY = "weights_sha256"  # metadata key: {weight file name: sha256 hex digest}
REGATE_EXAMPLES = 256
# the metadata every organism needs (the runner, the store and the gate read them)
REQUIRED_META = ("organism", "arch", "task", "seed", "accuracy")


class CorruptOrganism(Exception):
    """A cached organism failed an integrity check; the message is one line: file and why."""


class OrganismWarning(UserWarning):
    """A cached organism was rebuilt or had its weights' hash recorded (one line each)."""


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(float(x))


# ---- files -------------------------------------------------------------------------------

def weight_files(path: Path) -> list[Path]:
    """The weight files of an organism directory: every file but the metadata (and hidden
    files, such as a metadata update a killed process left half-written)."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.name != META_FILE and not p.name.startswith("."))


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(path: Path) -> dict[str, str]:
    """{file name: sha256} of an organism directory's weight files."""
    return {f.name: sha256(f) for f in weight_files(path)}


def check_safetensors(file: Path) -> None:
    """Raise CorruptOrganism unless `file` is a whole safetensors file: a readable header whose
    tensors end exactly at the end of the file (a truncated or padded file fails)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            if not 0 < n <= size - 8:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as exc:
        raise CorruptOrganism(f"{file} is not a readable safetensors file ({first_line(exc)})") from None
    if 8 + n + max(ends, default=0) != size:
        raise CorruptOrganism(f"{file} is {size} bytes, its header describes "
                              f"{8 + n + max(ends, default=0)} (truncated or overwritten)")


def read_info(path: Path, organism_id: str, family: str) -> dict[str, Any]:
    """The parsed metadata file of an organism directory, checked; raises CorruptOrganism."""
    file = path / META_FILE
    try:
        info = json.loads(file.read_text())
    except FileNotFoundError:
        raise CorruptOrganism(f"{file} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptOrganism(f"{file} is not valid JSON ({first_line(exc)})") from None
    meta = info.get("meta") if isinstance(info, dict) else None
    if not isinstance(meta, dict) or not isinstance(info.get("config"), dict):
        raise CorruptOrganism(f"{file} lacks the organism's config or metadata")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CorruptOrganism(f"{file} lacks {', '.join(missing)}")
    if info.get("family") != family or meta["organism"] != organism_id:
        raise CorruptOrganism(f"{file} describes {info.get('family')!r} organism {meta['organism']!r}, "
                              f"not {family!r} organism {organism_id!r}")
    accuracy = meta["accuracy"]
    if not _is_finite_number(accuracy) or not 0.0 <= float(accuracy) <= 1.0:
        raise CorruptOrganism(f"{file} records accuracy {accuracy!r}, not a number in [0, 1]")
    recorded = meta.get(WEIGHTS_KEY)
    if recorded is not None and not (isinstance(recorded, dict) and recorded
                                     and all(isinstance(v, str) for v in recorded.values())):
        raise CorruptOrganism(f"{file} has a malformed {WEIGHTS_KEY}")
    return info


def check_weights(path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """Check the weight files against the metadata; return their digest.

    With a recorded digest every file must match it; without one (an organism written before
    archbench recorded hashes) the safetensors files must at least be whole.
    """
    recorded = meta.get(WEIGHTS_KEY)
    for name in recorded or ():
        if not (path / name).is_file():
            raise CorruptOrganism(f"{path / name} is missing")
    files = weight_files(path)
    if not any(f.suffix == ".safetensors" for f in files):
        raise CorruptOrganism(f"{path / 'model.safetensors'} is missing")
    for f in files:
        if f.suffix == ".safetensors":
            check_safetensors(f)
    digest = {f.name: sha256(f) for f in files}
    for name, want in (recorded or {}).items():
        if digest[name] != want:
            raise CorruptOrganism(f"{path / name} does not match its recorded sha256 "
                                  "(it changed after it was written)")
    return digest


def record_digest(path: Path, digest: dict[str, str]) -> None:
    """Write `digest` into the metadata file atomically (a reader sees the old or the new one)."""
    file = path / META_FILE
    info = json.loads(file.read_text())
    info["meta"][WEIGHTS_KEY] = digest
    tmp = file.with_name(f".{META_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(file)


# ---- the re-gate --------------------------------------------------------------------------

def regate_tolerance(accuracy: float, n: int = REGATE_EXAMPLES) -> float:
    """How far the accuracy on n of the recorded accuracy's examples may stray from it: four
    binomial standard errors (at least four examples' worth, so a perfect organism may miss a
    near-tie or two after a change of BLAS or thread count)."""
    return 4 * math.sqrt(max(accuracy * (1 - accuracy), 1 / n) / n)


def regate_accuracy(adapter, task, seed: int, n: int = REGATE_EXAMPLES) -> float:
    """Accuracy on the first n examples of the test split `Adapter.fit` measured accuracy on."""
    test = task.sample(1024, seed, "test")
    with torch.random.fork_rng(devices=[]):  # leaves the RNG as it was: scores must not change
        adapter.model.eval()
        pred = adapter.predict(test.tokens[:n])
    return float((pred == test.answer[:n]).float().mean())


def check_regate(adapter, task, seed: int, meta: dict[str, Any], where: Path) -> float:
    """Raise CorruptOrganism unless the loaded model's re-gate accuracy agrees with the
    recorded one; return the re-gate accuracy."""
    measured = regate_accuracy(adapter, task, seed)
    recorded = float(meta["accuracy"])
    if not math.isfinite(measured) or abs(measured - recorded) > regate_tolerance(recorded):
        raise CorruptOrganism(f"{where} scores accuracy {measured:.3f} on {REGATE_EXAMPLES} held-out examples, "
                              f"but {recorded:.3f} is recorded (tolerance {regate_tolerance(recorded):.3f})")
    return measured


# ---- results ------------------------------------------------------------------------------

def nonfinite_result(result) -> str | None:
    """Why a technique's applicable result cannot be stored as a score (None if it can)."""
    score = result.score
    if not _is_finite_number(score):
        return f"the technique returned a non-finite score ({score!r})"
    try:
        values = np.asarray(result.per_example, dtype=float).ravel()
    except (TypeError, ValueError):
        return "the technique's per-example values are not numbers"
    bad = ~np.isfinite(values)
    if bad.any():
        return (f"{int(bad.sum())} of {values.size} per-example values are not finite "
                f"(first: {values[bad][0]})")
    return None


def nonfinite_activations(adapter, task, seed: int, n: int = 16) -> str | None:
    """Where the model's logits or cached activations on n test examples are not finite (None
    if nowhere): a technique would otherwise score a NaN model as if it were a model."""
    tokens = task.sample(n, seed, "test").tokens
    with torch.random.fork_rng(devices=[]):
        out = adapter.run(tokens, cache="all")
    for name, act in {"logits": out.logits, **out.cache}.items():
        if torch.is_tensor(act) and act.is_floating_point() and not torch.isfinite(act).all():
            share = float((~torch.isfinite(act)).float().mean())
            return f"non-finite activations at {name} ({share:.0%} of its values) on {n} test examples"
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

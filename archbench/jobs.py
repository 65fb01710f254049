"""The two jobs a run is made of, as every executor runs them in its workers.

`train_organism` trains or loads one organism and returns its metadata and gate;
`run_cell` scores one technique on one organism or its random-init control and returns the
row the driver stores. Neither raises: an exception becomes an error result with its
traceback. `init_worker` is what every worker process does first (one torch thread, one
BLAS thread), and `failed_result` is what a job that died before returning stands for (an
executor that lost a worker hands it to the driver instead of the result).
"""

from __future__ import annotations

import resource
import time
import traceback
import warnings
from typing import Any, Callable

from archbench import checkpoints, integrity, registry, zoo
from archbench.store import RunSpec


class JobFailed(RuntimeError):
    """A plain call (not an organism or cell job) died before returning."""


def init_worker() -> None:
    """One thread per worker for torch and for numpy/scipy's BLAS (reservoirpy's ridge
    solves would otherwise start a BLAS thread per core in every worker)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _warning_lines(caught: list) -> list[str]:
    """Distinct warnings a job raised, one line each, for the driver to show above the bar."""
    return list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).strip().splitlines()[0]}"
                              for w in caught if str(w.message).strip()))


def train_organism(arch: str, task_name: str, seed: int, gate: float, no_retrain: bool = False) -> dict[str, Any]:
    """An organism job (in a worker): train or load one organism; return its metadata and gate.

    With `no_retrain` a cached organism that fails its integrity checks is not rebuilt: the
    result carries `refused`, the one line saying which file and why."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        try:
            task = checkpoints.task(arch, task_name)
            _, meta = zoo.organism(arch, task, seed, no_retrain=no_retrain)
            out = {"ok": True, "meta": meta, "gate": zoo.gate_reason(meta, gate)}
        except zoo.CorruptOrganism as exc:  # raised only with no_retrain
            out = {"ok": False, "error": str(exc), "refused": str(exc)}
        except Exception:
            out = {"ok": False, "error": traceback.format_exc()}
    return out | {"wall_s": time.perf_counter() - start, "warnings": _warning_lines(caught)}


def gated_row(meta: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"organism_accuracy": meta["accuracy"], "status": "n/a", "reason": f"gate failed: {reason}"}


def _scored_row(adapter, spec: RunSpec, task) -> dict[str, Any]:
    """The technique's row on one adapter: ok with a finite score, n/a with a reason, or an
    error when the model's activations or the technique's numbers are not finite."""
    problem = integrity.nonfinite_activations(adapter, task, spec.seed)
    if problem:
        return {"status": "error", "error": f"{spec.label()}: {problem}"}
    result = registry.technique(spec.technique).for_arch(spec.arch)(adapter, task, spec.seed)
    if not result.applicable:
        return {"status": "n/a", "reason": result.reason}
    problem = integrity.nonfinite_result(result)
    if problem:
        return {"status": "error", "error": f"{spec.label()}: {problem}"}
    return {"status": "ok", "score": float(result.score), "per_example": result.per_example,
            "metrics": result.metrics, "details": result.details}


def run_cell(spec: RunSpec, gate: float, no_retrain: bool = False) -> dict[str, Any]:
    """A cell job (in a worker): one technique on one organism or control; never raises.

    NaN and infinities never become scores: they make an `error` row (rerun next time).
    With `no_retrain` an organism that fails its integrity checks makes a row with
    `refused` (the one line saying which file and why), which the driver stops on."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        try:
            task = checkpoints.task(spec.arch, spec.task).for_seed(spec.seed)
            # a control cell needs the organism's metadata (its gate) but not its weights
            meta = zoo.cached_meta(spec.arch, task, spec.seed, no_retrain) if spec.control else None
            trained = None
            if meta is None:
                trained, meta = zoo.organism(spec.arch, task, spec.seed, no_retrain=no_retrain)
            reason = zoo.gate_reason(meta, gate)
            if reason:
                row = gated_row(meta, reason)
            else:
                adapter = zoo.control(spec.arch, task, spec.seed) if spec.control else trained
                row = {"organism_accuracy": meta["accuracy"]} | _scored_row(adapter, spec, task)
        except zoo.CorruptOrganism as exc:  # raised only with no_retrain
            row = {"status": "error", "error": str(exc), "refused": str(exc)}
        except Exception:
            row = {"status": "error", "error": traceback.format_exc()}
    return row | {"wall_s": time.perf_counter() - start, "peak_mem_mb": _peak_mb(),
                  "warnings": _warning_lines(caught)}


def failed_result(fn: Callable, error: str) -> dict[str, Any]:
    """What an organism or cell job that died before returning (its worker killed, its cluster
    job failed) stands for: the shapes `train_organism` and `run_cell` return for an exception,
    so the cell becomes an error row that the next run retries. Any other call raises JobFailed."""
    if fn is run_cell:
        return {"status": "error", "error": error, "warnings": []}
    if fn is train_organism:
        return {"ok": False, "error": error, "warnings": []}
    raise JobFailed(error)

"""Known-answer organisms: trained by strict IIT to hold the primary variable at one component.

Alongside each ordinary organism (`archbench.zoo.organism`) a gradient-trained family can
have a known-answer one: the same architecture and initialisation, trained by
`archbench.iit.fit_iit` with the designated site of `archbench.iit_sites`, so where the
task's primary variable lives is known by construction (Geiger et al. 2022; Gupta et al.
2024, InterpBench). It is cached in the same zoo with the same integrity checks, under its
own id `{arch}/{task}/iit-seed{seed}-{hash}`, whose hash covers everything the ordinary id
does plus "iit", the designated site, its candidates and the loss weights; ordinary
organisms and their ids are untouched.

Its metadata adds, on held-out (test-split) counterfactual pairs: `iia`, the fraction
whose answer becomes `expected` when the designated component alone is patched from the
source; `max_other_change` (and `max_other_site`), the largest fraction whose answer
changes when one non-designated candidate alone is patched; and `effects`, both numbers per
candidate. The gate: behaviour >= 0.9 (the zoo's), IIA >= 0.9, max other change <= 0.10.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import torch

from archbench import iit, iit_sites, registry, zoo
from archbench.integrity import CorruptOrganism, OrganismWarning
from archbench.version import __version__

IIA_GATE = 0.9
OTHER_CHANGE_GATE = 0.10
N_EVAL_PAIRS = 256
# per-family knobs of fit_iit over Adapter.fit's: a gradient-norm cap of 1 (without it the
# transformer on count rose to 0.86 and collapsed to 0.27 at step 900); the step cap stays the
# family's. No plateau stopping: the IIT metric (the worst of behaviour, IIA and 1 - max other
# change) is at its highest at the first evaluation, where nothing has been learnt and no
# patch changes an answer (behaviour at chance, ~0.26 on count), and it dips while the
# model learns the task through every component before strict training moves it to the
# designated one, so a plateau measured against that first value stopped MoE on count at
# 1,100 steps while it was rising (its last four evaluations 0.129, 0.055, 0.188, 0.203).
# MoE trains 4,000 steps: at the 2,000 cap on count its metric was still rising (0.426 -> 0.809
# over the last 100 steps; behaviour 1.000, IIA 0.992, its MoE MLP still changing 0.207 of answers).
# MoE's strict weight is 4: at 1 its metric sat flat at 0.79 over the last 600 of 4,000 steps
# on count (the last MoE MLP changing 0.270 of answers); at 4 count passes at 1,400 steps
# (behaviour 1.000, IIA 0.988, largest other change 0.000).
# Spiking likewise: at its 2,000-step cap and strict weight 1, count missed (IIA 0.805, another
# neuron group changing 0.113 of answers); 4,000 steps at weight 1 reached 0.990 at step 3,800
# and fell to 0.729 by 4,000 (IIA 0.797); 4,000 steps at weight 4 pass (behaviour 0.996, IIA
# 0.949, largest other change 0.000).
# KAN trains 3,000 steps: at its 1,500 cap seed 2 of count missed (IIA 0.574, node group
# 8-11 changing 0.293 of answers); strict weight 4 made it worse (IIA 0.023, the count held
# in group 8-11); 3,000 steps at weight 1 pass (behaviour 1.000, IIA 0.949, other 0.008).
IIT_TRAIN: dict[str, dict[str, Any]] = {"*": {"grad_clip": 1.0, "plateau_steps": None},
                                        "kan": {"steps": 3000},
                                        "moe": {"steps": 4000, "w_strict": 4.0},
                                        "spiking": {"steps": 4000, "w_strict": 4.0}}


def iit_config(arch: str, task) -> dict[str, Any]:
    """The knobs `fit_iit` trains this family on this task with (weights and fit overrides)."""
    return {**iit.DEFAULT_IIT, **IIT_TRAIN["*"], **IIT_TRAIN.get(arch, {})}


def alignment(arch: str, task, seed: int) -> iit.Alignment:
    return iit_sites.alignment(zoo.control(arch, task, seed), task.for_seed(seed))


def organism_id(arch: str, task, seed: int) -> str:
    """The cache id: the ordinary organism's identity plus "iit", the alignment and the weights."""
    cls = registry.adapter(arch)
    task = task.for_seed(seed)
    identity = {"ordinary": zoo.organism_id(arch, task, seed), "iit": 1,
                "alignment": asdict(alignment(arch, task, seed)), "iit_config": iit_config(arch, task),
                "family_training_format": cls.training_format}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{arch}/{task.name}/iit-seed{seed}-{digest[:12]}"


def gate_reason(meta: dict[str, Any], threshold: float = zoo.DEFAULT_GATE) -> str | None:
    """Why a known-answer organism fails its gate (None if it passes), with the numbers."""
    why = [r for r in [zoo.gate_reason(meta, threshold)] if r]
    if not meta.get("iia", 0.0) >= IIA_GATE:
        why.append(f"IIA at {meta.get('designated')} {meta.get('iia', float('nan')):.3f} < {IIA_GATE:.2f}")
    if not meta.get("max_other_change", 1.0) <= OTHER_CHANGE_GATE:
        why.append(f"patching {meta.get('max_other_site')} changes {meta.get('max_other_change', float('nan')):.3f} "
                   f"of answers > {OTHER_CHANGE_GATE:.2f}")
    return "; ".join(why) or None


def measure(adapter, task, seed: int, al: iit.Alignment) -> dict[str, Any]:
    """IIA at the designated component and the other candidates' effects, on test pairs."""
    pairs = task.counterfactuals(N_EVAL_PAIRS, seed, "test")
    effects = iit.interchange_effects(adapter, task, pairs, al)
    return {**iit.summary(effects, al), "effects": effects}


def organism(arch: str, task, seed: int, no_retrain: bool = False):
    """(trained adapter, metadata) of the known-answer organism: cached, or trained now.

    Raises ValueError for a family without known-answer organisms (`iit_sites.why_not`).
    """
    cls = registry.adapter(arch)
    reason = iit_sites.why_not(cls.family)
    if reason:
        raise ValueError(f"{arch} has no known-answer organisms: {reason}")
    task = task.for_seed(seed)
    oid = organism_id(arch, task, seed)
    path = zoo.cache_root() / "organisms" / oid
    if path.exists():
        try:
            return zoo._load_checked(cls, path, task, seed)
        except CorruptOrganism as exc:
            if no_retrain:
                raise
            import warnings
            moved = zoo._quarantine(path)
            warnings.warn(OrganismWarning(f"organism {oid}: {exc}; rebuilding it (the old files are in {moved})"))
    adapter = cls.for_task(task, seed)
    al = iit_sites.alignment(adapter, task)
    cfg = iit_config(arch, task)
    report = iit.fit_iit(adapter, task, seed, al, **cfg)
    meta = {**asdict(report), "arch": arch, "task": task.name, "seed": seed, "task_config": task.config(),
            "organism": oid, "archbench": __version__, "torch": torch.__version__, "known_answer": True,
            "designated": al.designated, "candidates": list(al.candidates), "position": al.position,
            "iit_config": cfg, **measure(adapter, task, seed, al)}
    meta["gate"] = gate_reason(meta) or "pass"
    return adapter, zoo._write(path, adapter, meta)

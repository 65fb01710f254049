"""The cost model of the matrix runner: estimated seconds of organism and cell jobs.

The runner orders its one queue of organism and cell jobs longest first (archbench/runner.py);
these estimates start from priors measured on the published quick-matrix store and are
replaced by the medians the current store records.
"""

from __future__ import annotations

import collections
import sqlite3
import statistics

from archbench.store import Store

# Priors from the quick-matrix store of scoring version 2 (3 seeds, one core per worker, 2-core
# machine under load; median seconds). Organism training seconds per family x task (KAN, NVAR and
# reservoir tasks that store lacks keep the version-1 figures):
ORGANISM_SECONDS: dict[tuple[str, str], float] = {
    ("diffusion", "count"): 20.6, ("diffusion", "facts"): 51.7, ("diffusion", "modadd"): 27.1,
    ("diffusion", "parity"): 66.9, ("diffusion", "recall"): 76.0,
    ("kan", "count"): 0.5, ("kan", "facts"): 1.0, ("kan", "modadd"): 12.0, ("kan", "parity"): 0.7,
    ("kan", "recall"): 14.4,
    ("looped", "count"): 27.9, ("looped", "facts"): 12.3, ("looped", "modadd"): 75.9,
    ("looped", "parity"): 120.4, ("looped", "recall"): 71.1,
    ("mamba", "count"): 41.1, ("mamba", "facts"): 23.2, ("mamba", "modadd"): 50.0,
    ("mamba", "parity"): 519.7, ("mamba", "recall"): 116.6,
    ("mamba2", "count"): 37.8, ("mamba2", "facts"): 15.6, ("mamba2", "modadd"): 80.6,
    ("mamba2", "parity"): 291.2, ("mamba2", "recall"): 50.5,
    ("moe", "count"): 20.7, ("moe", "facts"): 8.1, ("moe", "modadd"): 137.3, ("moe", "parity"): 126.8,
    ("moe", "recall"): 29.8,
    ("nvar", "count"): 9.9, ("nvar", "facts"): 16.0, ("nvar", "modadd"): 5.2, ("nvar", "parity"): 1.1,
    ("nvar", "recall"): 0.4,
    ("reservoir", "count"): 3.8, ("reservoir", "facts"): 0.7, ("reservoir", "modadd"): 0.5,
    ("reservoir", "parity"): 6.2, ("reservoir", "recall"): 1.1,
    ("rwkv", "count"): 15.3, ("rwkv", "facts"): 6.3, ("rwkv", "modadd"): 36.1, ("rwkv", "parity"): 101.9,
    ("rwkv", "recall"): 49.8,
    ("spiking", "count"): 7.5, ("spiking", "facts"): 6.4, ("spiking", "modadd"): 19.5,
    ("spiking", "parity"): 54.2, ("spiking", "recall"): 28.1,
    ("transformer", "count"): 10.3, ("transformer", "facts"): 4.6, ("transformer", "modadd"): 14.4,
    ("transformer", "parity"): 48.7, ("transformer", "recall"): 10.9,
}
DEFAULT_ORGANISM_SECONDS = 20.0
# A cell's seconds ~ technique seconds x family factor x task factor (a log-linear fit to the
# ok cells of the same store, transformer and modadd = 1; KAN, reservoir and spiking, which had
# no ok cells there, keep their version-1 factors rescaled to that base; unknown names get
# 1 s, 1 and 1):
TECHNIQUE_SECONDS = {"ablation": 0.475, "attribution": 0.147, "cka": 0.055, "logit_lens": 0.021,
                     "patching": 0.282, "probe": 0.138, "sae": 0.796, "steering": 0.097, "tuned_lens": 0.123}
FAMILY_FACTOR = {"diffusion": 0.76, "kan": 0.61, "looped": 5.23, "mamba": 6.17, "mamba2": 4.55, "moe": 0.97,
                 "reservoir": 2.76, "rwkv": 3.17, "spiking": 0.53, "transformer": 1.0}
TASK_FACTOR = {"count": 3.03, "facts": 1.17, "modadd": 1.0, "parity": 4.02, "recall": 2.38}

class CostModel:
    """Estimated seconds of organism and cell jobs on one worker.

    A (family, task) training time or (technique, family, task) cell time that the store has
    recorded (organisms' `seconds`, ok cells' `wall_s`; medians) is used as it is; any other
    comes from the priors above, scaled by how much faster or slower this machine has been
    than the priors on the jobs the store knows.
    """

    def __init__(self, store: Store | None = None):
        self.organisms: dict[tuple[str, str], float] = {}
        self.cells: dict[tuple[str, str, str], float] = {}
        if store is not None:
            try:
                rows = store.db.execute("SELECT arch, task, seconds FROM organisms WHERE seconds > 0").fetchall()
                self.organisms = self._medians(rows)
                rows = store.db.execute("SELECT technique, arch, task, wall_s FROM cells "
                                        "WHERE status = 'ok' AND wall_s > 0").fetchall()
                self.cells = self._medians(rows)
            except sqlite3.DatabaseError:
                pass
        self.organism_speed = self._speed({k: (v, self._organism_prior(*k)) for k, v in self.organisms.items()})
        self.cell_speed = self._speed({k: (v, self._cell_prior(*k)) for k, v in self.cells.items()})

    @staticmethod
    def _medians(rows) -> dict:
        groups: dict[tuple, list[float]] = collections.defaultdict(list)
        for *key, seconds in rows:
            groups[tuple(key)].append(seconds)
        return {k: statistics.median(v) for k, v in groups.items()}

    @staticmethod
    def _speed(pairs: dict) -> float:
        ratios = [seen / prior for seen, prior in pairs.values() if prior > 0]
        return min(max(statistics.median(ratios), 0.05), 20.0) if ratios else 1.0

    @staticmethod
    def _organism_prior(arch: str, task: str) -> float:
        return ORGANISM_SECONDS.get((arch, task), DEFAULT_ORGANISM_SECONDS)

    @staticmethod
    def _cell_prior(technique: str, arch: str, task: str) -> float:
        return TECHNIQUE_SECONDS.get(technique, 1.0) * FAMILY_FACTOR.get(arch, 1.0) * TASK_FACTOR.get(task, 1.0)

    def organism(self, arch: str, task: str) -> float:
        seen = self.organisms.get((arch, task))
        return seen if seen is not None else self._organism_prior(arch, task) * self.organism_speed

    def cell(self, technique: str, arch: str, task: str) -> float:
        seen = self.cells.get((technique, arch, task))
        return seen if seen is not None else self._cell_prior(technique, arch, task) * self.cell_speed

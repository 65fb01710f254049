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

# Priors from the published quick matrix (results/archbench.db.gz, one core per worker).
# Organism training seconds per family x task:
ORGANISM_SECONDS: dict[tuple[str, str], float] = {
    ("diffusion", "count"): 33.3, ("diffusion", "facts"): 55.9, ("diffusion", "modadd"): 54.8,
    ("diffusion", "parity"): 172.3, ("diffusion", "recall"): 99.3,
    ("kan", "count"): 0.5, ("kan", "facts"): 1.0, ("kan", "modadd"): 6.6, ("kan", "parity"): 0.7,
    ("kan", "recall"): 10.2,
    ("looped", "count"): 16.2, ("looped", "facts"): 5.5, ("looped", "modadd"): 35.6,
    ("looped", "parity"): 42.5, ("looped", "recall"): 40.7,
    ("mamba", "count"): 21.5, ("mamba", "facts"): 8.4, ("mamba", "modadd"): 23.5,
    ("mamba", "parity"): 23.3, ("mamba", "recall"): 207.2,
    ("mamba2", "count"): 13.9, ("mamba2", "facts"): 3.1, ("mamba2", "modadd"): 31.3,
    ("mamba2", "parity"): 5.3, ("mamba2", "recall"): 63.1,
    ("moe", "count"): 8.8, ("moe", "facts"): 2.8, ("moe", "modadd"): 66.0, ("moe", "parity"): 36.2,
    ("moe", "recall"): 16.0,
    ("nvar", "count"): 7.4, ("nvar", "facts"): 24.8, ("nvar", "modadd"): 3.0, ("nvar", "parity"): 1.1,
    ("nvar", "recall"): 0.4,
    ("reservoir", "count"): 1.2, ("reservoir", "facts"): 0.7, ("reservoir", "modadd"): 0.5,
    ("reservoir", "parity"): 1.7, ("reservoir", "recall"): 1.1,
    ("rwkv", "count"): 4.1, ("rwkv", "facts"): 1.3, ("rwkv", "modadd"): 13.8, ("rwkv", "parity"): 9.5,
    ("rwkv", "recall"): 52.9,
    ("spiking", "count"): 1.3, ("spiking", "facts"): 2.0, ("spiking", "modadd"): 5.1,
    ("spiking", "parity"): 13.5, ("spiking", "recall"): 13.6,
    ("transformer", "count"): 3.3, ("transformer", "facts"): 0.9, ("transformer", "modadd"): 3.5,
    ("transformer", "parity"): 16.5, ("transformer", "recall"): 4.8,
}
DEFAULT_ORGANISM_SECONDS = 20.0
# A cell's seconds ~ technique seconds x family factor x task factor (a log-linear fit to the
# ok cells of the same store; unknown names get 1 s, 1 and 1):
TECHNIQUE_SECONDS = {"ablation": 0.84, "attribution": 0.33, "logit_lens": 0.032, "patching": 0.36,
                     "probe": 0.49, "sae": 1.11, "steering": 0.18, "tuned_lens": 0.21, "cka": 0.058}
FAMILY_FACTOR = {"diffusion": 0.84, "kan": 0.31, "looped": 1.72, "mamba": 5.37, "mamba2": 2.83, "moe": 0.93,
                 "reservoir": 1.41, "rwkv": 0.8, "spiking": 0.27, "transformer": 0.51}
TASK_FACTOR = {"count": 1.61, "facts": 0.68, "modadd": 0.53, "parity": 1.41, "recall": 1.23}


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

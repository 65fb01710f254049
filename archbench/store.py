"""The results store: one SQLite file per results directory, one row per cell.

WAL mode and one transaction per row: a run killed at any moment keeps every cell that
finished, and the next run resumes by skipping them. A cell's key hashes everything that
computed it (`cell_identity`: the technique's version and resolved config, the task's
config, the organism, the scoring version, the library versions), so a rerun after any of
them changes recomputes exactly the affected cells, and the new row replaces the old one:
the store holds one row per cell. Organisms' training records
live in their own table. `load_results()` returns a pandas DataFrame.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sqlite3
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from archbench.version import __version__

DB_NAME = "archbench.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    technique TEXT NOT NULL, arch TEXT NOT NULL, task TEXT NOT NULL,
    seed INTEGER NOT NULL, control INTEGER NOT NULL,
    status TEXT NOT NULL,            -- ok | n/a | error
    score REAL, reason TEXT, error TEXT,
    per_example TEXT, metrics TEXT, details TEXT,
    organism_accuracy REAL,
    wall_s REAL, peak_mem_mb REAL,
    provenance TEXT, created TEXT DEFAULT CURRENT_TIMESTAMP,
    scoring INTEGER, identity TEXT   -- the scoring version; what computed the cell (JSON)
);
CREATE TABLE IF NOT EXISTS organisms (
    organism TEXT PRIMARY KEY,
    arch TEXT NOT NULL, task TEXT NOT NULL, seed INTEGER NOT NULL,
    accuracy REAL, train_accuracy REAL, steps INTEGER, seconds REAL,
    gate TEXT, meta TEXT, created TEXT DEFAULT CURRENT_TIMESTAMP
);
"""


@dataclass(frozen=True, order=True)
class RunSpec:
    """One cell of the matrix: a technique on one organism (or its random-init control)."""

    technique: str
    arch: str
    task: str
    seed: int
    control: bool = False

    def key(self) -> str:
        """A hash of everything that computed the cell (see `cell_identity`)."""
        payload = json.dumps(cell_identity(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def label(self) -> str:
        return f"{self.technique}/{self.arch}/{self.task}/seed{self.seed}{'/control' if self.control else ''}"


@lru_cache(maxsize=None)
def cell_identity(spec: RunSpec) -> dict[str, Any]:
    """What computed a cell: its names, the technique's version and resolved config, the
    task's config for that seed, the organism (whose id hashes its model and training
    config and the training format), the scoring version and the library versions.

    A rerun after any of these changes recomputes exactly the cells it affects.
    """
    from archbench import registry, zoo
    from archbench.technique import SCORING_VERSION

    technique = registry.technique(spec.technique)
    task = registry.task(spec.task).for_seed(spec.seed)
    return {**asdict(spec), **library_versions(), "scoring": SCORING_VERSION,
            "technique_version": technique.version, "technique_config": technique().config,
            "task_config": task.config(), "organism": zoo.organism_id(spec.arch, task, spec.seed)}


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"archbench": __version__}
    for lib in ("torch", "transformers", "numpy"):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "missing"
    return out


@lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Versions, git SHA of the archbench checkout (if any) and hardware."""
    import os

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {**library_versions(), "git_sha": sha, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "system": platform.system()}


class Store:
    """The SQLite results store of one results directory."""

    def __init__(self, results_dir: str | Path):
        self.dir = Path(results_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(cells)")}
        for column, kind in (("scoring", "INTEGER"), ("identity", "TEXT")):  # stores written by 0.1
            if column not in have:
                self.db.execute(f"ALTER TABLE cells ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def done_keys(self) -> set[str]:
        """Keys of cells that finished (ok or n/a); errors are retried."""
        return {k for (k,) in self.db.execute("SELECT key FROM cells WHERE status != 'error'")}

    def put_cell(self, spec: RunSpec, row: dict[str, Any]) -> None:
        """Write one cell; a row of the same cell computed by another config or version is replaced."""
        identity = cell_identity(spec)
        values = {
            "key": spec.key(), **asdict(spec), "control": int(spec.control),
            "status": row["status"], "score": row.get("score"), "reason": row.get("reason"),
            "error": row.get("error"), "per_example": json.dumps(row.get("per_example", [])),
            "metrics": json.dumps(row.get("metrics", {}), default=str),
            "details": json.dumps(row.get("details", []), default=str),
            "organism_accuracy": row.get("organism_accuracy"), "wall_s": row.get("wall_s"),
            "peak_mem_mb": row.get("peak_mem_mb"), "provenance": json.dumps(provenance()),
            "scoring": identity["scoring"], "identity": json.dumps(identity, sort_keys=True, default=str),
        }
        cols = ", ".join(values)
        marks = ", ".join("?" * len(values))
        with self.db:  # one transaction per cell
            self.db.execute("DELETE FROM cells WHERE technique = ? AND arch = ? AND task = ? AND seed = ?"
                            " AND control = ? AND key != ?", (spec.technique, spec.arch, spec.task,
                                                              spec.seed, int(spec.control), values["key"]))
            self.db.execute(f"INSERT OR REPLACE INTO cells ({cols}) VALUES ({marks})", list(values.values()))

    def put_organism(self, meta: dict[str, Any], gate: str | None) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO organisms (organism, arch, task, seed, accuracy, train_accuracy,"
                " steps, seconds, gate, meta) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (meta["organism"], meta["arch"], meta["task"], meta["seed"], meta["accuracy"],
                 meta.get("train_accuracy"), meta.get("steps"), meta.get("seconds"), gate,
                 json.dumps({k: v for k, v in meta.items() if k != "history"}, default=str)))

    def cells(self):
        """All cells as a pandas DataFrame (JSON columns decoded)."""
        import pandas as pd

        df = pd.read_sql_query("SELECT * FROM cells ORDER BY technique, task, arch, seed, control", self.db)
        df["scoring"] = df["scoring"].fillna(1).astype(int)  # rows written before scoring versions
        for col in ("per_example", "metrics", "details", "provenance", "identity"):
            df[col] = df[col].map(lambda s: json.loads(s) if s else None)
        df["control"] = df["control"].astype(bool)
        return df

    def organisms(self):
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM organisms ORDER BY arch, task, seed", self.db)


def load_results(results_dir: str | Path = "results"):
    """The cells of a results directory as a pandas DataFrame."""
    path = Path(results_dir) / DB_NAME
    if not path.exists():
        raise FileNotFoundError(f"no results store at {path}: run `archbench run --matrix --results {results_dir}`")
    with Store(results_dir) as store:
        return store.cells()

"""The results store: one SQLite file per results directory, one row per cell.

WAL mode and one transaction per row: a run killed at any moment keeps every cell that
finished, and the next run resumes by skipping them. A cell's key hashes everything that
computed it (`cell_identity`: the technique's version and resolved config, the task's
config, the organism, the scoring version, the library versions), so a rerun after any of
them changes recomputes exactly the affected cells, and the new row replaces the old one:
the store holds one row per cell. Organisms' training records
live in their own table, and `reports` records which cells each report file was rendered
from (a digest) and the file's own digest, so a rerun re-renders exactly when the store or
a file changed. `load_results()` returns a pandas DataFrame.

The schema is versioned (`PRAGMA user_version`, `SCHEMA_VERSION`) and checked when a store
is opened, before any cell is computed: an older store gains its missing columns and
tables; a newer one, or an old one missing a column no default can fill, is refused with
one line naming the fix (`StoreError`). `reading(dir)` opens a directory's store for
reading, from `archbench.db` or, where only the published `archbench.db.gz` exists, from a
temporary decompressed copy (nothing is written next to it).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import platform
import shutil
import sqlite3
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from archbench.version import __version__

DB_NAME = "archbench.db"
GZ_NAME = DB_NAME + ".gz"  # the published store, committed compressed

# 1: archbench 0.1 (no scoring, identity); 2: scoring and identity per cell; 3: the reports table;
# 4: the localisation table (known-answer organisms). Stores written before versions were
# recorded read 0 and are migrated like version 1.
SCHEMA_VERSION = 4

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
CREATE TABLE IF NOT EXISTS localisation (
    organism TEXT NOT NULL,          -- the known-answer organism (its control: control = 1)
    technique TEXT NOT NULL, control INTEGER NOT NULL,
    arch TEXT NOT NULL, task TEXT NOT NULL, seed INTEGER NOT NULL,
    designated TEXT, n_candidates INTEGER,
    rank INTEGER,                    -- of the designated component; NULL where the technique does not apply
    scores TEXT,                     -- candidate -> the technique's score (JSON)
    gate TEXT, meta TEXT,            -- the known-answer organism's gate and metadata (JSON)
    created TEXT DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (organism, technique, control)
);
CREATE TABLE IF NOT EXISTS reports (
    file TEXT PRIMARY KEY,           -- relative to the results directory
    source TEXT NOT NULL,            -- digest of the cells, organisms and settings it was rendered from
    sha256 TEXT NOT NULL,            -- digest of the file as written
    created TEXT DEFAULT CURRENT_TIMESTAMP
);
"""


class StoreError(Exception):
    """A store this archbench cannot use as it is; the message is one line naming the fix."""


@lru_cache(maxsize=1)
def _expected_columns() -> dict[str, list[tuple[str, str, bool, Any]]]:
    """table -> [(column, type, required, default)] of the current schema, read from SCHEMA itself."""
    mem = sqlite3.connect(":memory:")
    mem.executescript(SCHEMA)
    tables = [t for (t,) in mem.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = {t: [(c[1], c[2], bool(c[3]) and c[4] is None and not c[5], c[4])
               for c in mem.execute(f"PRAGMA table_info({t})")] for t in tables}
    mem.close()
    return out


def _statements(script: str) -> list[str]:
    """A script's statements (a `;` inside a comment does not end one)."""
    out, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            out.append(pending)
            pending = ""
    return out


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring an older store to SCHEMA_VERSION, or raise StoreError before anything is computed."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {version}, newer than this archbench's {SCHEMA_VERSION}: "
                         "upgrade archbench (pip install -U archbench) or point --results at another directory")
    if version == SCHEMA_VERSION:
        return
    have = {t: {c[1] for c in db.execute(f"PRAGMA table_info({t})")} for t in _expected_columns()}
    missing = {t: [c for c in cols if have[t] and c[0] not in have[t]] for t, cols in _expected_columns().items()}
    required = [f"{t}.{c[0]}" for t, cols in missing.items() for c in cols if c[2]]
    if required:
        raise StoreError(f"{path} has an older schema that cannot be migrated (no {', '.join(required)}): "
                         f"move it away (its cells are recomputed) or point --results at another directory")
    db.execute("BEGIN IMMEDIATE")  # all or nothing: executescript would commit part-way
    try:
        for statement in _statements(SCHEMA):
            db.execute(statement)  # the tables it lacks
        for table, cols in missing.items():
            for name, kind, _, default in cols:
                # ALTER TABLE takes constant defaults only: `created` of migrated rows stays empty
                fill = f" DEFAULT {default}" if default is not None and default != "CURRENT_TIMESTAMP" else ""
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}{fill}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")



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
    from archbench import registry
    from archbench.technique import SCORING_VERSION

    technique = registry.technique(spec.technique)
    task_config, organism = organism_identity(spec.arch, spec.task, spec.seed)
    return {**asdict(spec), **library_versions(), "scoring": SCORING_VERSION,
            "technique_version": technique.version, "technique_config": technique.for_arch(spec.arch).config,
            "task_config": task_config, "organism": organism}


@lru_cache(maxsize=None)
def organism_identity(arch: str, task_name: str, seed: int) -> tuple[dict[str, Any], str]:
    """(task config for the seed, organism id): shared by the cells of one organism, so a
    matrix builds each task once per organism rather than once per cell."""
    from archbench import checkpoints, zoo

    task = checkpoints.task(arch, task_name).for_seed(seed)
    return task.config(), zoo.organism_id(arch, task, seed)


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
        self.copy = False  # True for `reading`'s temporary copy of a published archbench.db.gz
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            _migrate(self.db, self.path)
        except BaseException:
            self.db.close()
            raise

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

    def put_localisation(self, rows: list[dict[str, Any]]) -> None:
        """Write one known-answer organism's localisation rows (one per technique and control)
        in one transaction; rows of the same organism, technique and control are replaced."""
        cols = ["organism", "technique", "control", "arch", "task", "seed", "designated", "n_candidates",
                "rank", "scores", "gate", "meta"]
        with self.db:
            for row in rows:
                values = {**row, "control": int(row["control"]), "scores": json.dumps(row.get("scores")),
                          "meta": json.dumps(row.get("meta", {}), default=str)}
                self.db.execute(f"INSERT OR REPLACE INTO localisation ({', '.join(cols)}) "
                                f"VALUES ({', '.join('?' * len(cols))})", [values.get(c) for c in cols])

    def localisation(self):
        """The localisation rows as a pandas DataFrame (JSON columns decoded)."""
        import pandas as pd

        df = pd.read_sql_query("SELECT * FROM localisation ORDER BY arch, task, seed, technique, control", self.db)
        for col in ("scores", "meta"):
            df[col] = df[col].map(lambda s: json.loads(s) if s else None)
        df["control"] = df["control"].astype(bool)
        return df

    def content_digest(self, scoring: int | None = None) -> str:
        """A digest of every cell (of scoring version `scoring`, or all), every organism
        record and every localisation row, every column: what a report rendered from this
        store depends on."""
        h = hashlib.sha256()
        where = "" if scoring is None else f" WHERE COALESCE(scoring, 1) = {int(scoring)}"
        for query in (f"SELECT * FROM cells{where} ORDER BY key", "SELECT * FROM organisms ORDER BY organism",
                      "SELECT * FROM localisation ORDER BY organism, technique, control"):
            for row in self.db.execute(query):
                h.update(json.dumps(row, default=str).encode())
            h.update(b"\x00")
        return h.hexdigest()

    def reports(self) -> dict[str, tuple[str, str]]:
        """The report files last written: file -> (source digest, file sha256)."""
        return {f: (src, sha) for f, src, sha in self.db.execute("SELECT file, source, sha256 FROM reports")}

    def put_reports(self, source: str, files: dict[str, str]) -> None:
        """Record a finished rendering: the files it wrote (name -> sha256), all from `source`."""
        with self.db:
            self.db.execute("DELETE FROM reports")
            self.db.executemany("INSERT INTO reports (file, source, sha256) VALUES (?, ?, ?)",
                                [(f, source, sha) for f, sha in files.items()])


def has_store(results_dir: str | Path) -> bool:
    """Whether `results_dir` holds a store: `archbench.db`, or the published `archbench.db.gz`."""
    return (Path(results_dir) / DB_NAME).exists() or (Path(results_dir) / GZ_NAME).exists()


@contextlib.contextmanager
def reading(results_dir: str | Path) -> Iterator[Store]:
    """The store of `results_dir` for reading. Where only `archbench.db.gz` exists it is
    decompressed into a temporary directory (removed afterwards): `store.copy` is then True,
    and nothing written to it outlives the block."""
    root = Path(results_dir)
    if (root / DB_NAME).exists() or not (root / GZ_NAME).exists():
        with Store(root) as store:
            yield store
        return
    with tempfile.TemporaryDirectory(prefix="archbench-store-") as tmp:
        with gzip.open(root / GZ_NAME, "rb") as src, open(Path(tmp) / DB_NAME, "wb") as dst:
            try:
                shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as exc:  # gzip's BadGzipFile is an OSError
                raise StoreError(f"{root / GZ_NAME} is damaged ({exc}); restore it (git checkout) "
                                 "or point --results at another directory") from None
        with Store(tmp) as store:
            store.copy = True
            yield store


def unpack(results_dir: str | Path) -> bool:
    """Where a directory holds only the published `archbench.db.gz`, decompress it into
    `archbench.db` (atomically) so a run resumes it; True if it did."""
    from archbench.results_dir import write_atomic

    root = Path(results_dir)
    if (root / DB_NAME).exists() or not (root / GZ_NAME).exists():
        return False
    with reading(root) as store:  # decompresses and checks it is a store this archbench reads
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = store.path.read_bytes()
    write_atomic(root / DB_NAME, data)
    return True


def load_results(results_dir: str | Path | None = None):
    """The cells of a results directory (`archbench.db` or `archbench.db.gz`) as a pandas DataFrame;
    by default the directory a run writes to (`results_dir.DEFAULT`, as on the command line)."""
    if results_dir is None:
        from archbench.results_dir import DEFAULT

        results_dir = DEFAULT
    if not has_store(results_dir):
        path = Path(results_dir) / DB_NAME
        raise FileNotFoundError(f"no results store at {path}: run `archbench run --matrix --results {results_dir}`")
    with reading(results_dir) as store:
        return store.cells()

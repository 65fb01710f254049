"""What a run leaves on disk: a report that survives a crash, errors that say what is true,
and a results directory of its own.

Cells come from two constant techniques on a planted (random-init) transformer, so every
run here takes a second; a "kill" between the cells and the report is the pieces called in
order (run_matrix, then no report), a full disk is SQLite's own SQLITE_FULL (a page cap) or
a report write raising ENOSPC, and a read-only store is SQLite's own read-only error (as
root, chmod alone cannot make a directory read-only).
"""

import errno
import gzip
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from archbench import cli, jobs, registry, report, results_dir, runner, store, zoo
from archbench.cli import main
from archbench.store import RunSpec, Store
from archbench.technique import SCORING_VERSION, Result, Technique


class Constant(Technique):
    """Scores every organism and control 0.5: a cell that costs nothing."""

    name = "constant"
    roles = frozenset({"stream"})

    def run(self, adapter, task, seed):
        return Result.from_per_example([0.5] * 8)


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(registry, "_extra", {k: {} for k in registry.BUILTINS})
    registry.register("techniques", "constant", Constant)
    registry.register("techniques", "constant2", Constant)
    for seed in (0, 1):
        zoo.plant("transformer", "modadd", seed)


def run_args(results, techniques="constant", seeds=1, *more):
    return ["run", "--matrix", "--arch", "transformer", "--technique", techniques, "--task", "modadd",
            "--seeds", str(seeds), "--workers", "1", "--no-progress", "--results", str(results), *more]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("archbench: error:") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    return err


# --- a crash-safe report ------------------------------------------------------------------

def test_a_run_killed_before_its_report_gets_the_report_on_rerun(fakes, tmp_path, capsys):
    r = tmp_path / "r"
    assert main(run_args(r, "constant")) == 0
    assert "constant2" not in (r / "LEADERBOARD.md").read_text()
    # the next run computes constant2's cells and is killed before it renders anything
    runner.run_matrix(runner.expand(["transformer"], ["constant", "constant2"], ["modadd"], [0]), r,
                      workers=1, progress=False)
    capsys.readouterr()
    assert main(run_args(r, "constant,constant2")) == 0
    assert "4 cells: 4 already done" in capsys.readouterr().out
    board = (r / "LEADERBOARD.md").read_text()
    assert "constant2" in board and "constant2" in (r / "cells.csv").read_text()


def test_a_writer_killed_between_write_and_rename_leaves_no_temp_file_after_the_next_run(fakes, tmp_path):
    r = tmp_path / "r"
    assert main(run_args(r)) == 0
    # a process SIGKILLed after writing its temporary file, before renaming it into place
    killed = ("import os, signal, sys\n"
              "from archbench import results_dir\n"
              "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
              "results_dir.write_atomic(sys.argv[1], b'half a report')\n")
    for name in ("LEADERBOARD.md", "figures/transfer_matrix.png"):
        proc = subprocess.run([sys.executable, "-c", killed, str(r / name)])
        assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in r.rglob("*.tmp"))
    assert len(left) == 2 and all(n.startswith((".LEADERBOARD.md.", ".transfer_matrix.png.")) for n in left)
    assert results_dir.stale_temps(r) == sorted(r.rglob("*.tmp"))
    assert main(run_args(r)) == 0
    assert not list(r.rglob("*.tmp"))  # the next run removed them
    assert "half a report" not in (r / "LEADERBOARD.md").read_text()


def test_a_truncated_or_missing_report_file_is_rewritten(fakes, tmp_path, capsys):
    r = tmp_path / "r"
    assert main(run_args(r)) == 0
    names = ["LEADERBOARD.md", "index.html", "leaderboard.tex", "cells.csv", "figures/transfer_matrix.png"]
    complete = {n: (r / n).read_bytes() for n in names}
    (r / "LEADERBOARD.md").write_bytes(complete["LEADERBOARD.md"][:200])  # a write cut short
    (r / "index.html").unlink()
    (r / "figures" / "transfer_matrix.png").unlink()
    assert not report.is_current(r, scoring=SCORING_VERSION)
    assert main(run_args(r)) == 0
    assert {n: (r / n).read_bytes() for n in names} == complete
    capsys.readouterr()
    assert main(run_args(r)) == 0  # nothing changed: nothing rewritten
    assert "(up to date)" in capsys.readouterr().out


def test_a_full_disk_while_writing_the_report_keeps_the_old_files_whole(fakes, tmp_path, monkeypatch, capsys):
    r = tmp_path / "r"
    assert main(run_args(r)) == 0
    before = {p: p.read_bytes() for p in r.rglob("*") if p.is_file() and p.suffix in (".md", ".html", ".tex",
                                                                                    ".csv", ".png")}
    runner.run_matrix(runner.expand(["transformer"], ["constant", "constant2"], ["modadd"], [0]), r,
                      workers=1, progress=False)
    real, writes = results_dir._write_all, []

    def disk_fills_up(fd, data):
        writes.append(len(data))
        if len(writes) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(results_dir, "_write_all", disk_fills_up)
    capsys.readouterr()
    assert main(["report", "--results", str(r)]) == 2
    err = one_line_error(capsys)
    assert "no space left" in err and "damaged" not in err
    assert not [p for p in r.rglob("*.tmp")]  # the temporary files went with the failure
    assert (r / "LEADERBOARD.md").read_bytes() == before[r / "LEADERBOARD.md"]  # written last
    after_failure = {p: p.read_bytes() for p in before}
    monkeypatch.setattr(results_dir, "_write_all", real)
    assert not report.is_current(r, scoring=SCORING_VERSION)  # the unfinished rendering was not recorded
    assert main(run_args(r, "constant,constant2")) == 0
    assert "constant2" in (r / "LEADERBOARD.md").read_text()
    for path, data in after_failure.items():  # each file was the old one or the complete new one
        assert data in (before[path], path.read_bytes()), path


def test_report_then_run_does_not_render_twice(fakes, tmp_path, capsys):
    r = tmp_path / "r"
    assert main(run_args(r)) == 0
    assert main(["report", "--results", str(r)]) == 0  # every format, one scoring version
    capsys.readouterr()
    assert main(run_args(r)) == 0
    assert "(up to date)" in capsys.readouterr().out
    assert main(["report", "--results", str(r), "--format", "md"]) == 0  # a subset: not what a run renders
    assert not report.is_current(r, scoring=SCORING_VERSION)


# --- errors that say what is true -----------------------------------------------------------

def _store_with(tmp_path, cells_columns: str, version: int = 0) -> Path:
    r = tmp_path / "old"
    r.mkdir()
    con = sqlite3.connect(r / store.DB_NAME)
    con.execute(f"CREATE TABLE cells ({cells_columns})")
    con.execute(f"PRAGMA user_version = {version}")
    con.commit()
    con.close()
    return r


def test_an_older_store_is_migrated_before_any_cell_is_computed(fakes, tmp_path, capsys):
    # an older archbench's cells table: no timing, memory, provenance, scoring or identity columns
    r = _store_with(tmp_path, "key TEXT PRIMARY KEY, technique TEXT NOT NULL, arch TEXT NOT NULL, "
                              "task TEXT NOT NULL, seed INTEGER NOT NULL, control INTEGER NOT NULL, "
                              "status TEXT NOT NULL, score REAL, reason TEXT, error TEXT, per_example TEXT")
    assert main(run_args(r)) == 0, capsys.readouterr().err
    with Store(r) as s:
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
        cells = s.cells()
    assert len(cells) == 2 and (cells.status == "ok").all() and cells.wall_s.notna().all()


@pytest.mark.parametrize("columns, version, says", [
    ("key TEXT PRIMARY KEY, technique TEXT, arch TEXT, task TEXT, seed INTEGER, control INTEGER", 0,
     "older schema that cannot be migrated (no cells.status)"),
    ("key TEXT PRIMARY KEY", 99, "newer than this archbench"),
], ids=["unmigratable", "newer"])
def test_a_store_of_another_schema_is_refused_at_start(fakes, tmp_path, monkeypatch, capsys, columns, version, says):
    r = _store_with(tmp_path, columns, version)
    computed = []
    monkeypatch.setattr(runner, "run_cell", lambda *a: computed.append(a))
    assert main(run_args(r)) == 2
    err = one_line_error(capsys)
    assert says in err and "damaged" not in err and computed == []


def test_a_full_disk_while_recording_cells_says_so_and_keeps_the_finished_ones(fakes, tmp_path, monkeypatch,
                                                                                capsys):
    r = tmp_path / "r"
    real_init = Store.__init__

    def on_a_full_disk(self, *args, **kw):  # SQLite's own SQLITE_FULL once the file would grow
        real_init(self, *args, **kw)
        self.db.execute(f"PRAGMA max_page_count = {self.db.execute('PRAGMA page_count').fetchone()[0]}")

    monkeypatch.setattr(Store, "__init__", on_a_full_disk)
    assert main(run_args(r, "constant,constant2", 2)) == 2
    err = one_line_error(capsys)
    assert "full" in err and "damaged" not in err and "unreadable" not in err
    monkeypatch.setattr(Store, "__init__", real_init)
    with Store(r) as s:
        kept = len(s.cells())
    assert kept >= 1
    assert main(run_args(r, "constant,constant2", 2)) == 0
    assert f"8 cells: {kept} already done" in capsys.readouterr().out


def test_a_read_only_store_says_read_only(fakes, tmp_path, monkeypatch, capsys):
    r = tmp_path / "r"
    assert main(run_args(r)) == 0
    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda path, **kw: real(f"file:{path}?mode=ro", uri=True, **kw))
    capsys.readouterr()
    assert main(run_args(r, "constant,constant2")) == 2
    err = one_line_error(capsys)
    assert "read-only" in err and "damaged" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_results_directory_says_read_only(fakes, tmp_path, capsys):
    r = tmp_path / "r"
    assert main(run_args(r)) == 0
    r.chmod(0o555)
    try:
        capsys.readouterr()
        assert main(run_args(r, "constant,constant2")) == 2
        err = one_line_error(capsys)
        assert ("read-only" in err or "cannot be written" in err) and "damaged" not in err
    finally:
        r.chmod(0o755)


def test_explain_names_sqlites_own_errors(tmp_path):
    db = tmp_path / "x.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)")
    with pytest.raises(sqlite3.Error) as ro:
        sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("INSERT INTO t VALUES (1)")
    assert "read-only" in results_dir.explain(ro.value, tmp_path)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute(f"PRAGMA max_page_count = {con.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.Error) as full:
        for _ in range(100):
            con.execute("INSERT INTO t VALUES (?)", ("x" * 1000,))
    assert "full" in results_dir.explain(full.value, tmp_path)
    damaged = tmp_path / "bad.db"
    damaged.write_bytes(b"not a database" * 100)
    with pytest.raises(sqlite3.Error) as bad:
        sqlite3.connect(damaged).execute("SELECT * FROM sqlite_master")
    assert "damaged" in results_dir.explain(bad.value, tmp_path)
    assert "no space left" in results_dir.explain(OSError(errno.ENOSPC, "No space left on device", "f"), tmp_path)
    lock = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / results_dir.LOCK_NAME))
    assert "cannot be written (Permission denied)" in results_dir.explain(lock, tmp_path)


def test_a_second_run_on_the_same_directory_exits_or_waits(fakes, tmp_path, monkeypatch, capsys):
    r = tmp_path / "r"
    r.mkdir()
    holder = subprocess.Popen(  # another run's lock, held until told to let go
        [sys.executable, "-c", "import sys; from filelock import FileLock; l = FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); sys.stdin.readline(); l.release()",
         str(r / results_dir.LOCK_NAME)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        computed = []
        with monkeypatch.context() as m:
            m.setattr(runner, "run_cell", lambda *a: computed.append(a))
            assert main(run_args(r)) == 2
        err = one_line_error(capsys)
        assert "another archbench run holds" in err and "--wait" in err and computed == []

        # with --wait the run says it waits, and proceeds once the other run lets go
        waited = []

        def note(line):
            waited.append(line)
            holder.stdin.write("go\n")
            holder.stdin.flush()

        monkeypatch.setattr(cli, "_note", note)
        assert main(run_args(r, "constant", 1, "--wait")) == 0
        assert holder.wait(timeout=60) == 0 and any("waiting" in line for line in waited)
    finally:
        if holder.poll() is None:
            holder.kill()
    with Store(r) as s:
        assert len(s.cells()) == 2


# --- a results directory of its own ---------------------------------------------------------

def test_the_default_results_directory_is_not_the_published_one(fakes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = run_args("x")[:-2]  # no --results
    assert main(args) == 0
    assert (tmp_path / "archbench-results" / "archbench.db").exists() and not (tmp_path / "results").exists()
    assert cli.build_parser().parse_args(["report"]).results == "archbench-results"
    gitignore = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "archbench-results/" in gitignore


def test_load_results_defaults_to_the_directory_a_run_writes(fakes, tmp_path, monkeypatch):
    import archbench

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="archbench-results"):
        archbench.load_results()
    assert main(["run", "--matrix", "--arch", "transformer", "--technique", "constant", "--task", "modadd",
                 "--seeds", "1", "--workers", "1", "--no-progress"]) == 0  # no --results: the default
    assert len(archbench.load_results()) == len(store.load_results()) == 2
    assert (archbench.load_results().technique == "constant").all()


def _published(tmp_path) -> Path:
    """A directory holding only archbench.db.gz, as the committed results/ does."""
    r = tmp_path / "published"
    r.mkdir()
    with open(tmp_path / "r" / store.DB_NAME, "rb") as src, gzip.open(r / store.GZ_NAME, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return r


def test_report_reads_a_published_archbench_db_gz(fakes, tmp_path, capsys):
    assert main(run_args(tmp_path / "r")) == 0
    with Store(tmp_path / "r") as s:
        s.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    r = _published(tmp_path)
    assert main(["report", "--results", str(r)]) == 0
    assert (r / "LEADERBOARD.md").read_text() == (tmp_path / "r" / "LEADERBOARD.md").read_text()
    assert not (r / store.DB_NAME).exists()  # read through a temporary copy
    assert len(store.load_results(r)) == 2
    # a run on it resumes the published cells instead of starting an empty store
    capsys.readouterr()
    assert main(run_args(r)) == 0
    out = capsys.readouterr()
    assert "2 cells: 2 already done" in out.out and "decompressed" in out.err


def test_a_filtered_run_gets_the_reference_architecture(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run(specs, results, **kw):
        seen["archs"] = sorted({s.arch for s in specs})
        return runner.RunSummary(total=len(specs), skipped=len(specs))

    monkeypatch.setattr(runner, "run_matrix", fake_run)
    monkeypatch.setattr(report, "is_current", lambda *a, **kw: True, raising=False)
    monkeypatch.setattr(report, "write", lambda results, **kw: results / "LEADERBOARD.md")
    assert main(["run", "--matrix", "--arch", "mamba", "--technique", "probe", "--task", "modadd",
                 "--results", str(tmp_path)]) == 0
    assert seen["archs"] == ["mamba", "transformer"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adding transformer" in err and "reference" in err


def test_a_report_without_the_reference_says_so(tmp_path):
    with Store(tmp_path) as s:
        for control in (False, True):
            s.put_cell(RunSpec("probe", "mamba", "modadd", 0, control),
                       {"status": "ok", "score": 0.5, "per_example": [0.5] * 4, "wall_s": 0.1})
    assert "reference architecture (transformer) has no cells here" in report.write(tmp_path).read_text()


class InterruptedAtFirstCell:
    """An executor that trains organisms (by planting them) and is interrupted (Ctrl-C)
    when the first cell would finish."""

    capacity = 1

    def __init__(self):
        self.running = {}

    def submit(self, tag, fn, args):
        self.running[tag] = (fn, args)

    def next_done(self, timeout=None):
        tag, (fn, args) = self.running.popitem()
        if fn is not jobs.train_organism:
            raise KeyboardInterrupt
        meta = zoo.plant(*args[:3])
        return tag, {"ok": True, "meta": meta, "gate": None, "wall_s": 1.0}

    def cancel(self):
        self.running.clear()


def test_the_interrupt_message_counts_what_was_kept(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(runner.EXECUTORS, "local", lambda workers: InterruptedAtFirstCell())
    assert main(["run", "--matrix", "--arch", "transformer", "--technique", "probe", "--task", "modadd,count",
                 "--seeds", "1", "--no-progress", "--results", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert "kept 0 cells and 2 trained organisms" in err and "rerun to resume" in err
    assert "finished cells are saved" not in err

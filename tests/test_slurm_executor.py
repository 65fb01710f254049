"""The Slurm executor: the same cells as the local executor, the same scores, the same store.

No Slurm here, so jobs run through submitit's own stand-ins: cluster "debug" (each job in this
process, when the driver looks for it) and "local" (each job a process of its own, its call
and result exchanged as pickles in the job folder, as on a cluster). Organisms are planted
random-init models (as in test_runner.py) unless a test trains one. What needs Slurm's own
commands (the test job, scancel) runs against small stand-in `sbatch` and `scancel` scripts.
"""

import functools
import os
import signal
import stat
import sys
import time

import pytest

from archbench import cli, jobs, runner, zoo
from archbench.store import Store

submitit = pytest.importorskip("submitit")
slurm_executor = pytest.importorskip("archbench.slurm_executor")

ARGS = ["--arch", "transformer", "--technique", "cka,probe", "--task", "facts", "--seeds", "1", "--no-progress"]


def on_cluster(monkeypatch, cluster: str, **options):
    """`--executor slurm` now submits to submitit's `cluster` instead of Slurm."""
    monkeypatch.setitem(runner.EXECUTORS, "slurm", functools.partial(runner._slurm_executor, cluster=cluster,
                                                                     **options))


def scores(results):
    with Store(results) as s:
        cells = s.cells()
    return cells, cells.set_index("key").score.to_dict()


def test_slurm_and_local_store_identical_scores_and_resume(monkeypatch, tmp_path, capsys):
    on_cluster(monkeypatch, "debug")
    zoo.plant("transformer", "facts", 0)
    jobs = tmp_path / "jobs"
    assert cli.main(["run", "--matrix", *ARGS, "--executor", "slurm", "--workers", "2", "--slurm-time", "0:10:00",
                     "--slurm-cpus-per-task", "1", "--slurm-folder", str(jobs / "%j"),
                     "--results", str(tmp_path / "slurm")]) == 0
    runner.run_matrix(runner.expand(["transformer"], ["cka", "probe"], ["facts"], [0]), tmp_path / "local",
                      workers=1, progress=False)
    on_slurm, slurm_scores = scores(tmp_path / "slurm")
    local, local_scores = scores(tmp_path / "local")
    assert len(on_slurm) == 4 and (on_slurm.status == "ok").all()
    assert slurm_scores == local_scores
    assert on_slurm.per_example.tolist() == local.per_example.tolist()

    capsys.readouterr()
    assert cli.main(["run", "--matrix", *ARGS, "--executor", "slurm", "--results", str(tmp_path / "slurm")]) == 0
    assert "4 already done" in capsys.readouterr().out


def test_a_job_that_dies_on_the_cluster_is_an_error_row(monkeypatch, tmp_path):
    # `false` in place of the job's Python: every job ends at once without a result, as one
    # whose node lacks archbench's environment would; no wait for a result file that never comes
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)
    specs = runner.expand(["transformer"], ["cka"], ["facts"], [0])

    dead = slurm_executor.SlurmExecutor(2, cluster="local", python="false", folder=tmp_path / "jobs" / "%j")
    summary = runner.run_matrix(specs, tmp_path / "r", executor=dead, progress=False)
    assert (summary.ok, summary.error, summary.organisms_trained) == (0, 2, 0)
    assert summary.errors[0].startswith("organism transformer/facts/0: slurm job ")
    cells, _ = scores(tmp_path / "r")
    assert cells.error.str.startswith("organism failed to train:").all()

    zoo.plant("transformer", "facts", 0)  # now the organism is there and the cell jobs die
    summary = runner.run_matrix(specs, tmp_path / "r", executor=dead, progress=False)
    assert (summary.ok, summary.error) == (0, 2)
    cells, _ = scores(tmp_path / "r")
    last_lines = cells.error.map(lambda e: e.strip().splitlines()[-1])
    assert last_lines.str.match(r"slurm job \d+ failed \(.*\); its log: .*_log\.err$").all()
    assert len(list((tmp_path / "jobs").glob("*/*_submitted.pkl"))) == 3  # failed jobs' files are kept


def test_a_refused_submission_is_an_error_row(monkeypatch, tmp_path):
    zoo.plant("transformer", "facts", 0)
    ex = slurm_executor.SlurmExecutor(2, cluster="debug", folder=tmp_path / "jobs" / "%j")

    def refuse(*args, **kwargs):
        raise submitit.core.utils.FailedJobError("sbatch: error: QOSMaxSubmitJobPerUserLimit")

    monkeypatch.setattr(ex._executor, "submit", refuse)
    summary = runner.run_matrix(runner.expand(["transformer"], ["cka"], ["facts"], [0]), tmp_path / "r",
                                executor=ex, progress=False)
    assert summary.error == 2
    assert summary.errors[0].endswith("sbatch refused the job: sbatch: error: QOSMaxSubmitJobPerUserLimit")
    with pytest.raises(jobs.JobFailed, match="QOSMaxSubmitJobPerUserLimit"):
        ex.map(zoo.cache_root, [()], lambda args, out: None)  # a plain call has no row to become


def test_map_runs_organism_jobs_in_order_of_submission(tmp_path):
    zoo.plant("transformer", "facts", 0)
    ex = slurm_executor.SlurmExecutor(1, cluster="debug", folder=tmp_path / "jobs" / "%j")
    got = []
    ex.map(jobs.train_organism, [("transformer", "facts", 0, 0.9), ("transformer", "facts", 0, 1.1)],
           lambda args, out: got.append((args[-1], out["ok"], out["gate"])))
    assert [(gate, ok, bool(reason)) for gate, ok, reason in got] == [(0.9, True, False), (1.1, True, True)]


def test_cancel_stops_the_jobs_in_flight(tmp_path):
    # submitit's local cluster cancels with SIGINT. A test run started in the background by a
    # non-interactive shell has SIGINT ignored, and its job controllers would inherit that, so
    # this process gets a SIGINT handler for the test (a handled signal is reset to the default
    # in a child, an ignored one is not)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ex = slurm_executor.SlurmExecutor(2, cluster="local", folder=tmp_path / "jobs" / "%j")
        ex.submit("a", time.sleep, (600,))
        ex.submit("b", time.sleep, (600,))
        jobs = list(ex._in_flight)
        ex.cancel()
        for job in jobs:
            job._process.wait(timeout=120)  # the job's controller, which ends its task with it
            assert not job.paths.result_pickle.exists()
        with pytest.raises(RuntimeError, match="no job in flight"):
            ex.next_done(0)
    finally:
        signal.signal(signal.SIGINT, previous)


def fake_command(folder, name: str, script: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_cancel_is_one_scancel_for_every_slurm_job(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_command(bin_dir, "scancel", f'echo "$@" >> {tmp_path / "scancelled"}')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.SlurmJob, "watcher", submitit.slurm.slurm.SlurmInfoWatcher())  # ours alone
    ex = slurm_executor.SlurmExecutor(2, cluster="debug", folder=tmp_path / "jobs" / "%j")
    for tag, job_id in enumerate(("101", "102")):
        ex._in_flight[submitit.SlurmJob(tmp_path / "jobs" / "%j", job_id)] = (tag, jobs.run_cell)
    ex.cancel()
    assert (tmp_path / "scancelled").read_text() == "101 102\n" and not ex._in_flight


def test_bad_slurm_settings_are_one_line_usage_errors(monkeypatch, tmp_path, capsys):
    def error(*flags):
        assert cli.main(["run", "--matrix", *ARGS, "--executor", "slurm", *flags,
                         "--results", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    err = error()  # the tests' cache is in /tmp
    assert "ARCHBENCH_CACHE is" in err and "local to each node" in err
    monkeypatch.setattr(slurm_executor, "_node_local", lambda path: False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert "no `sbatch` on PATH" in error()
    (tmp_path / "bin").mkdir()
    fake_command(tmp_path / "bin", "sbatch", 'echo "sbatch: error: invalid partition specified: gpu" >&2; exit 1')
    assert "Slurm refused a test job (sbatch: error: invalid partition specified: gpu)" in error(
        "--slurm-partition", "gpu")
    assert "expected a Slurm time limit" in error("--slurm-time", "an hour")
    assert not (tmp_path / "r").exists()  # nothing ran


def test_slurm_flags_need_the_slurm_executor(tmp_path, capsys):
    assert cli.main(["run", "--matrix", *ARGS, "--slurm-partition", "cpu", "--results", str(tmp_path)]) == 2
    assert "--slurm-partition needs --executor slurm" in capsys.readouterr().err
    assert cli.main(["run", "--matrix", *ARGS, "--executor", "slurm", "--address", "auto",
                     "--results", str(tmp_path)]) == 2
    assert "--address needs --executor ray" in capsys.readouterr().err


def test_missing_submitit_is_a_one_line_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now fails as if it were not installed
    assert cli.main(["run", "--matrix", *ARGS, "--executor", "slurm", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "archbench[slurm]"' in err
    with pytest.raises(ImportError, match="archbench\\[slurm\\]"):
        runner.EXECUTORS["slurm"](2)


@pytest.mark.parametrize("text, minutes", [("90", 90), ("5:30", 6), ("2:00:00", 120), ("1-0", 1440),
                                           ("1-2:30", 1590), ("0-0:0:1", 1)])
def test_slurm_time_limits_in_every_sbatch_format(text, minutes):
    assert slurm_executor.slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["0", "0:00:00", "1:2:3:4", "-5", "1-", "an hour", ""])
def test_what_is_not_a_slurm_time_limit(text):
    with pytest.raises(ValueError):
        slurm_executor.slurm_minutes(text)


@pytest.mark.slow
def test_organism_and_cells_as_separate_processes_match_the_local_executor(monkeypatch, tmp_path, capsys):
    """The organism is trained in a job of its own, its cells read it from the cache in theirs."""
    on_cluster(monkeypatch, "local")
    args = [a if a != "cka,probe" else "cka" for a in ARGS]
    assert cli.main(["run", "--matrix", *args, "--executor", "slurm", "--workers", "2",
                     "--slurm-folder", str(tmp_path / "jobs" / "%j"), "--results", str(tmp_path / "slurm")]) == 0
    assert "2 cells: 0 already done, 2 ok" in capsys.readouterr().out
    with Store(tmp_path / "slurm") as s:
        organisms = s.organisms()
    assert list(organisms.arch) == ["transformer"] and zoo.list_organisms()[0]["steps"] > 0
    assert cli.main(["run", "--matrix", *args, "--workers", "1", "--results", str(tmp_path / "local")]) == 0
    assert scores(tmp_path / "slurm")[1] == scores(tmp_path / "local")[1]
    assert len(list((tmp_path / "jobs").glob("*/*_log.out"))) == 3 and not list((tmp_path / "jobs").rglob("*.pkl"))
    capsys.readouterr()
    assert cli.main(["run", "--matrix", *args, "--executor", "slurm", "--results", str(tmp_path / "slurm")]) == 0
    assert "2 already done" in capsys.readouterr().out

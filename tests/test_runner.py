"""Runner, store and resume: cells are isolated, finished cells survive a SIGKILL and are skipped.

Organisms here are planted random-init models with a recorded accuracy, so these tests
exercise the runner's bookkeeping in seconds; training itself is tested in the slow suite.
"""

import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

import pytest

from archbench import costs, jobs, registry, runner, zoo
from archbench.store import RunSpec, Store
from archbench.technique import Technique





class Exploding(Technique):
    name = "exploding"
    roles = frozenset({"stream"})

    def run(self, adapter, task, seed):
        raise RuntimeError("this technique always fails")


def test_matrix_runs_isolates_errors_gates_and_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_extra", {k: {} for k in registry.BUILTINS})
    registry.register("techniques", "exploding", Exploding)
    zoo.plant("transformer", "modadd", 0)
    zoo.plant("transformer", "facts", 0, accuracy=0.5)
    specs = runner.expand(["transformer"], ["probe", "exploding"], ["modadd", "facts"], [0])
    summary = runner.run_matrix(specs, tmp_path / "r", workers=1, progress=False)
    assert (summary.ok, summary.na, summary.error) == (2, 4, 2)
    with Store(tmp_path / "r") as store:
        cells = store.cells()
    err = cells[cells.status == "error"]
    assert set(err.technique) == {"exploding"} and err.error.str.contains("always fails").all()
    na = cells[cells.status == "n/a"]
    assert set(na.task) == {"facts"} and na.reason.str.contains("gate failed: held-out accuracy 0.5").all()
    ok = cells[cells.status == "ok"]
    assert ok.score.between(0, 1).all() and ok.per_example.map(len).gt(0).all()
    again = runner.run_matrix(specs, tmp_path / "r", workers=1, progress=False)
    assert again.skipped == 6 and again.error == 2  # errors are retried, finished cells are not


def test_runspec_key_is_stable_and_distinct():
    a, b = RunSpec("probe", "transformer", "modadd", 0), RunSpec("probe", "transformer", "modadd", 0, True)
    assert a.key() == RunSpec("probe", "transformer", "modadd", 0).key() and a.key() != b.key()


def test_a_changed_technique_config_recomputes_only_that_techniques_cells(tmp_path, monkeypatch):
    for arch in ("transformer", "mamba"):
        zoo.plant(arch, "modadd", 0)
    specs = runner.expand(["transformer", "mamba"], ["probe", "cka"], ["modadd"], [0])
    assert runner.run_matrix(specs, tmp_path, workers=1, progress=False).ok == 8
    from archbench.techniques.cka import CKA
    monkeypatch.setitem(CKA.default_config, "n_test", 256)
    again = runner.run_matrix(specs, tmp_path, workers=1, progress=False)
    assert again.skipped == 4 and again.ok == 4
    with Store(tmp_path) as store:
        cells = store.cells()
    assert len(cells) == 8  # one row per cell: the recomputed cka rows replaced the old ones
    assert set(cells[cells.technique == "cka"].identity.map(lambda i: i["technique_config"]["n_test"])) == {256}


def test_a_bumped_family_training_format_recomputes_only_that_familys_cells(tmp_path, monkeypatch):
    specs = runner.expand(["transformer", "mamba"], ["probe"], ["modadd"], [0])
    for arch in ("transformer", "mamba"):
        zoo.plant(arch, "modadd", 0)
    runner.run_matrix(specs, tmp_path, workers=1, progress=False)
    monkeypatch.setattr(registry.adapter("mamba"), "training_format", 99)
    zoo.plant("mamba", "modadd", 0)  # the new format's organism
    again = runner.run_matrix(specs, tmp_path, workers=1, progress=False)
    assert again.skipped == 2 and again.ok == 2


def test_a_bumped_technique_version_recomputes_its_cells(tmp_path, monkeypatch):
    zoo.plant("transformer", "modadd", 0)
    specs = runner.expand(["transformer"], ["probe", "cka"], ["modadd"], [0])
    runner.run_matrix(specs, tmp_path, workers=1, progress=False)
    monkeypatch.setattr(registry.technique("probe"), "version", 99)
    again = runner.run_matrix(specs, tmp_path, workers=1, progress=False)
    assert again.skipped == 2 and again.ok == 2


def test_expand_makes_trained_and_control_cells():
    specs = runner.expand(["transformer"], ["probe", "patching"], ["modadd"], range(2))
    assert len(specs) == 8 and sum(s.control for s in specs) == 4


def test_resume_after_sigkill_loses_no_finished_cell(tmp_path, isolated_cache):
    tasks = ["modadd", "count", "facts", "recall"]
    for t in tasks:
        for s in (0, 1):
            zoo.plant("transformer", t, s)
    results = tmp_path / "r"
    cmd = [sys.executable, "-m", "archbench.cli", "run", "--matrix", "--arch", "transformer",
           "--technique", "probe,patching", "--task", ",".join(tasks), "--seeds", "2", "--workers", "1",
           "--results", str(results), "--no-progress"]
    env = {**os.environ, "ARCHBENCH_CACHE": str(isolated_cache)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = results / "archbench.db"
    deadline = time.time() + 120
    n_before = 0
    while time.time() < deadline and n_before < 3:
        time.sleep(0.2)
        if db.exists():
            try:
                n_before = sqlite3.connect(db).execute("SELECT count(*) FROM cells").fetchone()[0]
            except sqlite3.OperationalError:
                pass
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    before = dict(con.execute("SELECT key, created FROM cells").fetchall())
    assert 3 <= len(before) < 32
    con.close()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{len(before)} already done" in done.stdout
    after = dict(sqlite3.connect(db).execute("SELECT key, created FROM cells").fetchall())
    assert len(after) == 32 and all(after[k] == v for k, v in before.items())
    assert (results / "LEADERBOARD.md").exists()


def _processes_with_env(marker: str) -> list[int]:
    """pids of live processes whose environment holds `marker` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_a_run_stops_its_workers(tmp_path, isolated_cache, how):
    for s in range(4):
        zoo.plant("transformer", "recall", s)
    results, marker = tmp_path / "r", f"ARCHBENCH_TEST_RUN={tmp_path.name}"
    cmd = [sys.executable, "-m", "archbench.cli", "run", "--matrix", "--arch", "transformer",
           "--technique", "probe,patching", "--task", "recall", "--seeds", "4", "--workers", "2",
           "--results", str(results), "--no-progress"]
    env = {**os.environ, "ARCHBENCH_CACHE": str(isolated_cache), marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(_processes_with_env(marker)) < 3:  # driver + 2 workers
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be stopped"
    os.kill(proc.pid, how)
    code = proc.wait(timeout=60)
    if how == signal.SIGTERM:
        assert code == 130 and "rerun to resume" in proc.stderr.read()
    deadline = time.time() + 20
    while time.time() < deadline and _processes_with_env(marker):
        time.sleep(0.2)
    assert _processes_with_env(marker) == []


# --- the scheduler: one queue, longest first, cells behind their organism -----------------

class SimulatedExecutor:
    """An executor on a simulated clock: each job takes `seconds(fn, args)`; organism jobs
    plant the organism (accuracy from `accuracy`), cell jobs return a synthetic ok row."""

    def __init__(self, capacity, seconds, accuracy=None):
        self.capacity, self.seconds, self.accuracy = capacity, seconds, accuracy or {}
        self.clock, self.running, self.log = 0.0, {}, []  # log: (event, time, what)

    def submit(self, tag, fn, args):
        what = args[:3] if fn is jobs.train_organism else args[0]
        self.running[tag] = (self.clock + self.seconds(fn, args), fn, args, what)
        self.log.append(("start", self.clock, what))

    def next_done(self, timeout=None):
        tag = min(self.running, key=lambda t: self.running[t][0])
        end, fn, args, what = self.running.pop(tag)
        self.clock = end
        self.log.append(("end", end, what))
        if fn is jobs.train_organism:
            meta = zoo.plant(*args[:3], accuracy=self.accuracy.get(args[:3], 1.0))
            return tag, {"ok": True, "meta": meta, "gate": zoo.gate_reason(meta, args[3]), "wall_s": 1.0}
        return tag, {"status": "ok", "score": 0.5, "per_example": [0.5], "organism_accuracy": 1.0, "wall_s": 0.1}

    def cancel(self):
        self.running.clear()


def _record_training_times(results, seconds):
    with Store(results) as store:
        for (arch, task), s in seconds.items():
            store.put_organism({"organism": f"old/{arch}/{task}", "arch": arch, "task": task, "seed": 9,
                                "accuracy": 1.0, "seconds": s}, None)


def test_cost_model_prefers_recorded_times_and_scales_priors(tmp_path):
    _record_training_times(tmp_path, {("transformer", "modadd"): 7.0, ("transformer", "count"): 6.6})
    with Store(tmp_path) as store:
        store.put_cell(RunSpec("probe", "transformer", "modadd", 0), {"status": "ok", "wall_s": 2.5})
        model = costs.CostModel(store)
    assert model.organism("transformer", "modadd") == 7.0 and model.cell("probe", "transformer", "modadd") == 2.5
    # this machine's time over the priors' on the recorded organisms scales the unrecorded ones
    speed = statistics.median([7.0 / costs.ORGANISM_SECONDS[("transformer", "modadd")],
                               6.6 / costs.ORGANISM_SECONDS[("transformer", "count")]])
    assert model.organism("mamba", "recall") == pytest.approx(costs.ORGANISM_SECONDS[("mamba", "recall")] * speed)
    assert costs.CostModel().organism("mamba", "recall") > costs.CostModel().organism("kan", "count")


def test_jobs_run_longest_first_and_cells_start_while_organisms_train(tmp_path):
    times = {("transformer", "modadd"): 30.0, ("transformer", "count"): 10.0, ("transformer", "facts"): 3.0}
    _record_training_times(tmp_path, times)
    fake = SimulatedExecutor(2, lambda fn, args: times[args[:2]] if fn is jobs.train_organism else 0.5,
                             accuracy={("transformer", "facts", 0): 0.5})
    specs = runner.expand(["transformer"], ["probe", "cka"], ["facts", "count", "modadd"], [0])
    summary = runner.run_matrix(specs, tmp_path, executor=fake, progress=False)
    assert (summary.ok, summary.na, summary.organisms_trained) == (8, 4, 3)
    organisms = [s for s in summary.started if s.startswith("organism")]
    assert organisms == ["organism transformer/modadd/seed0", "organism transformer/count/seed0",
                         "organism transformer/facts/seed0"]  # longest first
    starts = {str(what): t for event, t, what in fake.log if event == "start"}
    last_landing = max(t for event, t, what in fake.log if event == "end" and isinstance(what, tuple))
    count_cells = [t for what, t in starts.items() if "count" in what and "Spec" in what]
    assert count_cells and min(count_cells) < last_landing  # count's cells ran while modadd trained
    # facts failed the gate: its cells were recorded n/a by the driver, never submitted
    assert not any("facts" in s for s in summary.started if not s.startswith("organism"))
    with Store(tmp_path) as store:
        cells = store.cells()
    facts = cells[cells.task == "facts"]
    assert len(facts) == 4 and (facts.status == "n/a").all() and facts.reason.str.startswith("gate failed").all()
    assert len(fake.log) == 2 * (3 + 8)  # each organism trained once, each passing cell run once


def test_cells_of_an_organism_that_failed_to_train_are_errors_without_retraining(tmp_path):
    class Failing(SimulatedExecutor):
        def next_done(self, timeout=None):
            tag = min(self.running, key=lambda t: self.running[t][0])
            if self.running[tag][1] is jobs.train_organism:
                self.running.pop(tag)
                return tag, {"ok": False, "error": "Traceback ...\nRuntimeError: diverged", "wall_s": 1.0}
            return super().next_done(timeout)

    fake = Failing(2, lambda fn, args: 1.0)
    summary = runner.run_matrix(runner.expand(["transformer"], ["probe"], ["modadd"], [0]), tmp_path,
                                executor=fake, progress=False)
    assert summary.error == 2 and summary.started == ["organism transformer/modadd/seed0"]
    assert any("diverged" in e for e in summary.errors)


def test_progress_counts_organisms_and_cells_and_estimates_time():
    job_o = runner.Job("organism", ("transformer", "modadd", 0), 10.0)
    job_c = runner.Job("cell", ("transformer", "modadd", 0), 2.0, RunSpec("probe", "transformer", "modadd", 0))
    p = runner.Progress(False, organisms=1, cells=2, capacity=2, work=14.0)
    assert p.eta() == pytest.approx(7.0)  # 14 s of work on 2 workers
    p.started(0, job_o)
    p.finished(0, job_o, 20.0)  # twice as slow as estimated: the rest is rescaled
    assert (p.organisms_done, p.cells_done) == (1, 0) and p.eta() == pytest.approx(4.0)
    p.recorded("ok", without_worker=job_c)
    counts, times, fraction = p.line()
    assert counts.startswith("organisms 1/1, cells 1/2") and "ETA" in times and 0 < fraction < 1
    p.close()


class Warns(Technique):
    name = "warns"
    roles = frozenset({"stream"})

    def run(self, adapter, task, seed):
        import warnings
        warnings.warn("a noisy library")
        raise RuntimeError("done warning")


def test_progress_line_and_warnings_above_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry, "_extra", {k: {} for k in registry.BUILTINS})
    registry.register("techniques", "warns", Warns)
    zoo.plant("transformer", "modadd", 0)
    specs = runner.expand(["transformer"], ["warns"], ["modadd"], [0])
    runner.run_matrix(specs, tmp_path, workers=1, progress=True)
    err = capsys.readouterr().err
    assert "organisms 0/0, cells 2/2 (2 errors)" in err and "elapsed" in err and "ETA" in err
    assert err.count("warning: UserWarning: a noisy library") == 1  # once per run, on its own line
    runner.run_matrix(specs, tmp_path / "quiet", workers=1, progress=False)
    assert "organisms" not in capsys.readouterr().err


def test_the_reference_family_is_scheduled_first():
    # a run stopped part-way must still hold the row every verdict divides by
    sched = runner.Scheduler(costs.CostModel())
    sched.add_organism(("mamba", "parity", 0), [])
    sched.add_organism(("transformer", "facts", 0), [])
    sched.add_organism(("moe", "modadd", 0), [])
    order = [sched.pop().organism[0] for _ in range(3)]
    assert order == ["transformer", "mamba", "moe"]  # then longest first

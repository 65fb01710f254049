"""Bad input gets one line, a did-you-mean and exit status 2; the listing commands work."""

import subprocess
import sys

import pytest

from archbench.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "archbench.cli", *args], capture_output=True, text=True)


def test_misspelt_arch_suggests_and_exits_2():
    out = run("run", "--matrix", "--arch", "transfomer")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "did you mean 'transformer'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["run", "--matrix", "--seeds", "0"], ["run", "--matrix", "--gate", "2"],
                                  ["run", "--matrix", "--technique", "probbe"], ["run"],
                                  ["inspect", "mamab"], ["frobnicate"]])
def test_bad_input_is_one_line_exit_2(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("archbench: error:") and err.strip().count("\n") == 0


def test_report_without_store_and_corrupt_store(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "archbench.db").write_bytes(b"this is not a database" * 100)
    assert main(["report", "--results", str(tmp_path / "bad")]) == 2
    assert "damaged" in capsys.readouterr().err
    assert (tmp_path / "bad" / "archbench.db").read_bytes().startswith(b"this is not")  # left as it was


def test_list_and_inspect(capsys):
    assert main(["list", "adapters"]) == 0
    assert "transformer" in capsys.readouterr().out
    assert main(["inspect", "transformer", "--task", "modadd"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.resid_post" in out and "stream" in out and "batch, pos, d_model" in out


def test_checkpoint_wrappers_stay_out_of_the_matrix(tmp_path, capsys, monkeypatch):
    from archbench import cli

    assert main(["run", "--matrix", "--arch", "rwkv_pth", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "rwkv_pth" in err and "\n" not in err
    default = cli._matrix_archs(None)
    assert "rwkv_pth" not in default and {"transformer", "mamba2", "nvar", "kan"} <= set(default)


@pytest.mark.parametrize("flags, seeds", [([], 5), (["--quick"], 3), (["--profile", "quick"], 3),
                                          (["--profile", "full"], 10), (["--profile", "full", "--seeds", "2"], 2),
                                          (["--quick", "--profile", "quick"], 3)])
def test_profiles_set_the_seeds(flags, seeds, tmp_path, monkeypatch):
    from archbench import report, runner

    seen = {}

    def fake_run(specs, results, **kw):
        seen["seeds"] = sorted({s.seed for s in specs})
        return runner.RunSummary(total=len(specs), skipped=len(specs))

    monkeypatch.setattr(runner, "run_matrix", fake_run)
    monkeypatch.setattr(report, "write", lambda results, **kw: results / "LEADERBOARD.md")
    assert main(["run", "--matrix", "--arch", "transformer", "--technique", "probe", "--task", "modadd",
                 *flags, "--results", str(tmp_path)]) == 0
    assert seen["seeds"] == list(range(seeds))


def test_quick_contradicting_a_profile_is_a_usage_error(tmp_path, capsys):
    assert main(["run", "--matrix", "--quick", "--profile", "full", "--results", str(tmp_path)]) == 2
    assert "--quick" in capsys.readouterr().err


# --- run's flags: every value is checked before anything is computed -----------------------

def _capture_run(monkeypatch):
    """Replace the run and the report by a recorder of what the run was asked to do."""
    from archbench import report, runner

    seen = {}

    def fake_run(specs, results, **kw):
        seen.update(specs=specs, **kw)
        return runner.RunSummary(total=len(specs), skipped=len(specs))

    monkeypatch.setattr(runner, "run_matrix", fake_run)
    monkeypatch.setattr(report, "is_current", lambda *a, **kw: True, raising=False)
    monkeypatch.setattr(report, "write", lambda results, **kw: results / "LEADERBOARD.md")
    return seen


@pytest.mark.parametrize("flag", ["--arch", "--technique", "--task"])
def test_an_empty_name_list_is_refused_not_read_as_all(flag, tmp_path, monkeypatch, capsys):
    seen = _capture_run(monkeypatch)
    assert main(["run", "--matrix", flag, "", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} needs at least one name" in err and not seen


def test_a_name_given_twice_counts_once(tmp_path, monkeypatch):
    seen = _capture_run(monkeypatch)
    assert main(["run", "--matrix", "--arch", "transformer,transformer", "--technique", "probe,probe",
                 "--task", "facts,facts", "--seeds", "1", "--results", str(tmp_path)]) == 0
    assert len(seen["specs"]) == len(set(seen["specs"])) == 2  # one trained and one control cell


def test_a_huge_seed_count_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from archbench import runner

    def expand(*args):
        raise AssertionError("a billion seeds were expanded into cells")

    monkeypatch.setattr(runner, "expand", expand)
    assert main(["run", "--matrix", "--seeds", str(10**9), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 to 100" in err


def test_workers_are_capped_at_the_cores(tmp_path, monkeypatch, capsys):
    from archbench import cli

    seen = _capture_run(monkeypatch)
    assert main(["run", "--matrix", "--arch", "transformer", "--technique", "probe", "--task", "facts",
                 "--workers", "1000", "--results", str(tmp_path)]) == 0
    assert seen["workers"] == cli._cores() < 1000
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--workers 1000 capped at {cli._cores()}" in err


@pytest.mark.parametrize("where", ["under-a-file", "dangling-symlink"])
def test_an_impossible_results_path_is_a_usage_error(where, tmp_path, monkeypatch, capsys):
    seen = _capture_run(monkeypatch)
    (tmp_path / "file").write_text("not a directory")
    if where == "under-a-file":
        results = tmp_path / "file" / "results"
    else:
        results = tmp_path / "link"
        results.symlink_to(tmp_path / "gone")
    assert main(["run", "--matrix", "--arch", "transformer", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("archbench: error: --results") and err.count("\n") == 1 and not seen


def test_an_unreachable_ray_cluster_is_one_line_not_a_hang(tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")

    def init(*args, **kw):
        raise AssertionError("ray.init was called for a cluster nobody answers for (it retries for minutes)")

    monkeypatch.setattr(ray, "init", init)
    assert main(["run", "--matrix", "--arch", "transformer", "--technique", "probe", "--task", "facts",
                 "--seeds", "1", "--executor", "ray", "--address", "127.0.0.1:1", "--no-progress",
                 "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Ray cluster at 127.0.0.1:1" in err


def test_inspect_organism_prints_the_trained_program(tmp_path, monkeypatch, capsys):
    """The program family's organism is its program: `inspect --organism` searches (or loads)
    it and prints its text and hook points; the random-init model's program is printed as such."""
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path))
    assert main(["inspect", "program", "--task", "count", "--organism", "0"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy 1.000" in out and "program of the trained organism:" in out
    assert "% 4" in out and "stmt.0.acc0" in out  # the running count mod 4 and its loop state
    assert main(["inspect", "program", "--task", "count"]) == 0
    assert "program of the random-init model" in capsys.readouterr().out

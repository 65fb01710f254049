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
    assert "unreadable" in capsys.readouterr().err
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

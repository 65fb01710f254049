"""The Ray executor: the same cells as the local executor, the same scores, the same store.

A local Ray instance (2 CPUs, no dashboard) is started once for the module, before each
test's isolated $ARCHBENCH_CACHE is set, so its workers see that cache only through the
runtime_env the executor passes, as nodes of a cluster would. Organisms are planted
random-init models (as in test_runner.py), so phase 1 reads the cache and nothing trains.
"""

import sys

import pytest
import torch

from archbench import cli, registry, runner, zoo
from archbench.store import Store

ARGS = ["--arch", "transformer", "--technique", "probe,patching", "--task", "modadd", "--seeds", "1",
        "--no-progress"]





@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_and_local_store_identical_scores_and_resume(ray_local, isolated_cache, tmp_path, capsys):
    from archbench.ray_executor import RayExecutor

    seen = []  # the workers started before this test's cache was set: they learn it from runtime_env
    RayExecutor(2).map(zoo.cache_root, [(), ()], lambda args, out: seen.append(out))
    assert seen == [isolated_cache.resolve()] * 2
    threads = []
    RayExecutor(2).map(torch.get_num_threads, [(), ()], lambda args, out: threads.append(out))
    assert threads == [1, 1]

    zoo.plant("transformer", "modadd", 0)
    assert cli.main(["run", "--matrix", *ARGS, "--executor", "ray", "--workers", "2",
                     "--results", str(tmp_path / "ray")]) == 0
    assert cli.main(["run", "--matrix", *ARGS, "--workers", "1", "--results", str(tmp_path / "local")]) == 0
    with Store(tmp_path / "ray") as s:
        on_ray, organisms = s.cells(), s.organisms()
    with Store(tmp_path / "local") as s:
        local = s.cells()
    assert len(on_ray) == len(local) == 4 and (on_ray.status == "ok").all()
    assert list(organisms.arch) == ["transformer"] and organisms.accuracy.tolist() == [1.0]
    assert on_ray.set_index("key").score.to_dict() == local.set_index("key").score.to_dict()
    assert on_ray.per_example.tolist() == local.per_example.tolist()

    capsys.readouterr()
    assert cli.main(["run", "--matrix", *ARGS, "--executor", "ray", "--results", str(tmp_path / "ray")]) == 0
    assert "4 already done" in capsys.readouterr().out


def test_missing_ray_is_a_one_line_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert cli.main(["run", "--matrix", *ARGS, "--executor", "ray", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "archbench[ray]"' in err
    with pytest.raises(ImportError, match="archbench\\[ray\\]"):
        runner.EXECUTORS["ray"](2)


def test_ray_flags_need_the_ray_executor(tmp_path, capsys):
    assert cli.main(["run", "--matrix", *ARGS, "--address", "auto", "--results", str(tmp_path)]) == 2
    assert "--address needs --executor ray" in capsys.readouterr().err
    assert cli.main(["run", "--matrix", *ARGS, "--executor", "ray", "--ray-cpus-per-task", "-1",
                     "--results", str(tmp_path)]) == 2


def test_a_ray_worker_that_dies_makes_an_error_row_not_a_crash(ray_local, isolated_cache, tmp_path):
    import os

    from archbench import jobs
    from archbench.ray_executor import RayExecutor

    class KillsPatchingWorkers(RayExecutor):
        """The patching cells' job kills its Ray worker process (os._exit) instead of running."""

        def _start(self, fn, args):
            if fn is jobs.run_cell and args[0].technique == "patching":
                return super()._start(os._exit, (1,))
            return super()._start(fn, args)

    zoo.plant("transformer", "modadd", 0)
    specs = runner.expand(["transformer"], ["probe", "patching"], ["modadd"], [0])
    runner.run_matrix(specs, tmp_path, executor=KillsPatchingWorkers(2, max_retries=0), progress=False)
    with Store(tmp_path) as s:
        cells = s.cells().set_index("technique")
    assert (cells.loc["probe"].status == "ok").all()  # the finished cells are kept
    assert (cells.loc["patching"].status == "error").all() and len(cells.loc["patching"]) == 2
    assert cells.loc["patching"].error.str.contains("Ray worker running run_cell died (WorkerCrashedError", regex=False).all()

"""archbench: does an interpretability technique transfer beyond GPT-style transformers?

Adapters expose one hook interface (`archbench.adapter`), tasks have known mechanisms
(`archbench.tasks`), techniques are scored against ground truth and random-init controls
(`archbench.technique`), and the runner writes a leaderboard of transfer verdicts.
"""

from archbench.version import __version__


def load_results(results_dir=None):
    """The cells of a results directory as a pandas DataFrame; by default `./archbench-results`,
    where a run writes (`load_results("results")` reads the published leaderboard)."""
    from archbench.store import load_results as _load

    return _load(results_dir)


__all__ = ["__version__", "load_results"]

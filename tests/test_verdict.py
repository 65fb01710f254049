"""The verdict rule on synthetic cells with known effects."""

import zlib

import numpy as np
import pandas as pd

from archbench.verdict import Settings, effect_replicates, summary, verdicts


def cells_for(arch, trained, control, seeds=(0, 1, 2), n=200, task="modadd", technique="probe", status="ok"):
    rng = np.random.default_rng(zlib.crc32(f"{arch}/{task}".encode()))  # str hash() varies per process
    rows = []
    for s in seeds:
        for is_control, p in ((False, trained), (True, control)):
            per = (rng.random(n) < p).astype(float).tolist()
            rows.append({"technique": technique, "task": task, "arch": arch, "seed": s, "control": is_control,
                         "status": status, "score": float(np.mean(per)) if status == "ok" else None,
                         "per_example": per if status == "ok" else [],
                         "reason": None if status == "ok" else "gate failed: accuracy 0.50 < 0.90"})
    return rows


def table(*groups):
    return pd.DataFrame([r for g in groups for r in g])


def test_verdict_categories():
    df = table(cells_for("transformer", 0.9, 0.1), cells_for("same", 0.88, 0.1), cells_for("half", 0.5, 0.1),
               cells_for("none", 0.1, 0.1), cells_for("gated", 0, 0, status="n/a"))
    v = verdicts(df).set_index("arch")
    assert v.loc["transformer", "verdict"] == "transfers" and abs(v.loc["transformer", "rho"] - 1) < 1e-9
    assert v.loc["same", "verdict"] == "transfers"
    assert v.loc["half", "verdict"] == "partial" and 0.4 < v.loc["half", "rho"] < 0.6
    assert v.loc["none", "verdict"] == "fails"
    assert v.loc["gated", "verdict"] == "n/a" and "gate failed" in v.loc["gated", "reason"]
    assert v.loc["same", "effect_lo"] > 0.7 and v.loc["none", "effect_lo"] < 0 < v.loc["none", "effect_hi"]


def test_no_reference_when_technique_fails_on_reference():
    df = table(cells_for("transformer", 0.1, 0.1), cells_for("other", 0.9, 0.1))
    v = verdicts(df).set_index("arch")
    assert set(v.verdict) == {"no-reference"}


def test_summary_pools_tasks_where_reference_works():
    df = table(cells_for("transformer", 0.9, 0.1, task="a"), cells_for("x", 0.9, 0.1, task="a"),
               cells_for("transformer", 0.1, 0.1, task="b"), cells_for("x", 0.1, 0.1, task="b"))
    s = summary(df).set_index("arch")
    assert s.loc["x", "verdict"] == "transfers" and s.loc["x", "tasks"] == "a"


def test_hierarchical_bootstrap_widens_with_seed_spread():
    rng = np.random.default_rng(0)
    settings = Settings(n_boot=1000)
    tight = effect_replicates({s: [0.5] * 50 for s in range(4)}, {s: [0.0] * 50 for s in range(4)}, settings, rng)
    spread = effect_replicates({s: [0.2 * s] * 50 for s in range(4)}, {s: [0.0] * 50 for s in range(4)}, settings, rng)
    assert np.ptp(tight) == 0 and np.quantile(spread, 0.975) - np.quantile(spread, 0.025) > 0.2
    assert abs(spread.mean() - 0.3) < 0.03

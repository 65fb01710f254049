"""The verdict rule on synthetic cells with known effects."""

import zlib

import numpy as np
import pandas as pd

from archbench.verdict import Settings, fieller, from_per_seed, interval, label, summary, verdicts


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


def seeded(arch, effects, task="modadd", technique="probe", n=100):
    """Cells whose per-seed effect is exactly `effects[s]` (constant per-example values)."""
    rows = []
    for s, e in enumerate(effects):
        for is_control, value in ((False, 0.1 + e), (True, 0.1)):
            rows.append({"technique": technique, "task": task, "arch": arch, "seed": s, "control": is_control,
                         "status": "ok", "score": value, "per_example": [value] * n, "reason": None})
    return rows


def test_the_interval_is_over_seeds_not_examples():
    # thousands of examples per seed cannot narrow an interval the seeds' spread makes wide
    v = verdicts(table(seeded("transformer", [0.9, 0.9, 0.9]), seeded("wobbly", [0.1, 0.9, 0.5]))).set_index("arch")
    lo, hi = v.loc["wobbly", "effect_lo"], v.loc["wobbly", "effect_hi"]
    t = 4.302653  # t(0.975, df=2)
    assert abs((hi - lo) / 2 - t * 0.4 / 3 ** 0.5) < 1e-6 and lo < 0 < hi
    assert v.loc["wobbly", "verdict"] == "fails" and abs(v.loc["wobbly", "effect_sd"] - 0.4) < 1e-12
    assert abs(v.loc["transformer", "effect_lo"] - 0.9) < 1e-9 and abs(v.loc["transformer", "effect_hi"] - 0.9) < 1e-9


def test_fewer_than_three_seeds_is_provisional():
    v = verdicts(table(seeded("transformer", [0.8, 0.82]), seeded("x", [0.8, 0.81]))).set_index("arch")
    assert v.loc["x", "verdict"] == "transfers" and bool(v.loc["x", "provisional"])
    assert label("transfers", True) == "✓*" and label("transfers", False) == "✓"
    three = verdicts(table(seeded("transformer", [0.8, 0.82, 0.81]), seeded("x", [0.8, 0.81, 0.79])))
    assert not three.provisional.any()


def test_a_weak_reference_gets_no_ratio():
    v = verdicts(table(seeded("transformer", [0.15, 0.2, 0.25]), seeded("x", [0.5, 0.5, 0.5]))).set_index("arch")
    assert v.loc["x", "verdict"] == "weak-reference" and "lower bound" in v.loc["x", "reason"]
    assert "rho" not in v.columns or np.isnan(v.loc["x", "rho"])


def test_fieller_interval_of_a_ratio():
    a = from_per_seed({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.0, 1: 0.0, 2: 0.0}, 0.95)
    exact = from_per_seed({0: 0.5, 1: 0.5, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0}, 0.95)
    lo, hi = fieller(a, exact, 0.95)  # a reference without spread: the interval of a, divided
    a_lo, a_hi = interval([0.5, 0.6, 0.7], 0.95)
    assert abs(lo - a_lo / 0.5) < 1e-9 and abs(hi - a_hi / 0.5) < 1e-9
    noisy = from_per_seed({0: 0.0, 1: 0.5, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 0.0}, 0.95)
    assert fieller(a, noisy, 0.95) == (float("-inf"), float("inf"))  # reference CI reaches 0


def test_one_seed_falls_back_to_the_examples_and_is_provisional():
    df = table(cells_for("transformer", 0.9, 0.1, seeds=(0,)), cells_for("x", 0.9, 0.1, seeds=(0,)))
    v = verdicts(df).set_index("arch")
    assert v.loc["x", "verdict"] == "transfers" and bool(v.loc["x", "provisional"])
    assert 0.7 < v.loc["x", "effect_lo"] < 0.8 < v.loc["x", "effect_hi"] < 0.9

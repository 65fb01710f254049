"""The transfer verdict: effects over random-init controls, seed-level intervals, ratios.

For technique T, task K, architecture A:
  score   per cell, the mean of its per-example values clipped to [0, 1] (the stored
          score): 0 is the technique's chance level, and a cell below chance (a random-init
          lens that names the majority answer less often than a constant guess would) counts
          as chance, not as a negative number that would inflate trained - control;
  effect  e_s = score(trained, seed s) - score(control, seed s): the control is the same
          seed's random init (the sanity check of Adebayo et al. 2018);
  CI      95% Student-t interval over the seeds' effects: the seed is the unit of
          replication (a retrained organism), and examples inside a seed only feed that
          seed's mean. Example-level bootstraps over 2 seeds gave effect CIs 6.5x narrower
          than the seeds' own spread warrants. With one seed there is no seed-level
          interval: the examples' standard error stands in and the verdict is provisional;
  ratio   rho = mean e_A / mean e_R against the reference architecture R, with a Fieller
          interval (the ratio of two independent t-estimates);
  verdict transfers (CI of e_A above 0 and rho >= rho_transfer), partial (CI above 0,
          rho below), fails (CI touches 0), no-reference (T's effect CI on R touches 0),
          weak-reference (R's effect CI is above 0 but its lower bound is below
          `weak_reference`, so rho would divide by a number that may be near 0: no rho is
          shown), n/a (roles missing or gate failed, with the reason). A verdict resting
          on fewer than `min_seeds` seeds (of A or of R) is marked provisional.
The summary verdict of (T, A) pools the tasks on which T works on R: per seed, the mean
effect over those tasks, then the same interval over seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

GLYPHS = {"transfers": "✓", "partial": "◐", "fails": "✗", "weak-reference": "≈",
          "no-reference": "∅", "n/a": "–"}
PROVISIONAL = "*"  # appended to the glyph of a verdict on fewer than min_seeds seeds


@dataclass(frozen=True)
class Settings:
    reference: str = "transformer"
    rho_transfer: float = 0.8
    confidence: float = 0.95
    min_seeds: int = 3
    weak_reference: float = 0.1

    def describe(self) -> str:
        return (f"reference={self.reference}; transfers: {self.confidence:.0%} seed-level t-interval of the "
                f"effect > 0 and rho >= {self.rho_transfer}; partial: interval > 0 and rho < "
                f"{self.rho_transfer}; fails: interval touches 0; rho only where the reference effect's "
                f"lower bound >= {self.weak_reference} (else weak-reference); provisional "
                f"({PROVISIONAL}): fewer than {self.min_seeds} seeds")

    def as_dict(self) -> dict:
        return asdict(self)


def cell_score(per_example, score) -> float:
    """A cell's score for the verdict: the mean of its per-example values, clipped to [0, 1]."""
    values = np.asarray(per_example if per_example is not None else [], dtype=float)
    if values.size:
        return float(np.clip(values.mean(), 0.0, 1.0))
    return float("nan") if score is None else float(score)


def interval(values, confidence: float, example_se: float | None = None) -> tuple[float, float]:
    """Student-t interval of the mean of per-seed values (n,); with one seed, mean ± z * example_se."""
    from scipy import stats  # imported on first use: a resumed run that renders nothing never needs it

    v = np.asarray(values, dtype=float)
    mean = float(v.mean()) if v.size else float("nan")
    if v.size >= 2:
        half = stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    elif v.size == 1 and example_se is not None:
        half = stats.norm.ppf((1 + confidence) / 2) * example_se
    else:
        return float("nan"), float("nan")
    return mean - float(half), mean + float(half)


def _example_se(per_example) -> float:
    v = np.asarray(per_example if per_example is not None else [], dtype=float)
    return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size >= 2 else float("nan")


@dataclass
class Effect:
    trained: float
    control: float
    effect: float
    lo: float
    hi: float
    n_seeds: int
    per_seed: dict = field(default_factory=dict)  # seed -> effect of that seed
    example_se: float | None = None  # the examples' SE of the effect (used with one seed only)

    @property
    def sd(self) -> float:
        v = np.asarray(list(self.per_seed.values()), dtype=float)
        return float(v.std(ddof=1)) if v.size >= 2 else float("nan")

    @property
    def variance_of_mean(self) -> float:
        n = len(self.per_seed)
        if n >= 2:
            return self.sd ** 2 / n
        return float("nan") if self.example_se is None else self.example_se ** 2


def from_per_seed(trained: dict, control: dict, confidence: float, example_se: float | None = None) -> Effect:
    """An effect from per-seed scores of trained and control cells (the seeds both have)."""
    seeds = sorted(set(trained) & set(control))
    per_seed = {s: trained[s] - control[s] for s in seeds}
    lo, hi = interval(list(per_seed.values()), confidence, example_se)
    return Effect(float(np.mean([trained[s] for s in seeds])), float(np.mean([control[s] for s in seeds])),
                  float(np.mean(list(per_seed.values()))), lo, hi, len(seeds), per_seed, example_se)


def measure(group: pd.DataFrame, settings: Settings) -> Effect | str:
    """The effect of one (technique, task, arch) group of ok cells, or the reason it has none."""
    ok = group[group.status == "ok"]
    if ok.empty:
        bad = group[group.status != "ok"]
        return "; ".join(sorted(set(bad.reason.fillna(bad.status)))) if len(bad) else "no cells"
    trained = {int(r.seed): r for r in ok[~ok.control].itertuples()}
    control = {int(r.seed): r for r in ok[ok.control].itertuples()}
    seeds = sorted(set(trained) & set(control))
    if not seeds:
        return "missing trained or control cells"
    score = lambda r: cell_score(r.per_example, r.score)
    se = None
    if len(seeds) == 1:
        s = seeds[0]
        se = float(np.hypot(_example_se(trained[s].per_example), _example_se(control[s].per_example)))
    return from_per_seed({s: score(trained[s]) for s in seeds}, {s: score(control[s]) for s in seeds},
                         settings.confidence, se)


def fieller(a: Effect, r: Effect, confidence: float) -> tuple[float, float]:
    """Confidence interval of mean(a) / mean(r) for independent estimates (Fieller 1954).

    Unbounded (-inf, inf) when r's own interval at this confidence reaches 0.
    """
    va, vr = a.variance_of_mean, r.variance_of_mean
    if np.isnan(va) or np.isnan(vr):
        return float("nan"), float("nan")
    from scipy import stats

    df = min(a.n_seeds, r.n_seeds) - 1
    t = stats.t.ppf((1 + confidence) / 2, df) if df >= 1 else stats.norm.ppf((1 + confidence) / 2)
    x, y = a.effect, r.effect
    qa = y * y - t * t * vr  # (x - rho y)^2 <= t^2 (va + rho^2 vr), as a quadratic in rho
    qb = -2 * x * y
    qc = x * x - t * t * va
    disc = qb * qb - 4 * qa * qc
    if qa <= 0 or disc < 0:
        return float("-inf"), float("inf")
    root = np.sqrt(disc)
    return float((-qb - root) / (2 * qa)), float((-qb + root) / (2 * qa))


def _verdict(e_a: Effect | str, e_r: Effect | str, settings: Settings) -> dict:
    if isinstance(e_a, str):
        return {"verdict": "n/a", "reason": e_a, "provisional": False}
    row = {"trained": e_a.trained, "control": e_a.control, "effect": e_a.effect,
           "effect_lo": e_a.lo, "effect_hi": e_a.hi, "n_seeds": e_a.n_seeds, "effect_sd": e_a.sd}
    n_ref = 0 if isinstance(e_r, str) else e_r.n_seeds
    row["provisional"] = min(e_a.n_seeds, n_ref or e_a.n_seeds) < settings.min_seeds
    if isinstance(e_r, str) or not e_r.lo > 0 or e_r.effect <= 0:
        why = e_r if isinstance(e_r, str) else f"reference effect CI [{e_r.lo:.2f}, {e_r.hi:.2f}] touches 0"
        return {**row, "verdict": "no-reference", "reason": why}
    if e_r.lo < settings.weak_reference:
        return {**row, "verdict": "weak-reference",
                "reason": f"reference effect {e_r.effect:.2f}, CI [{e_r.lo:.2f}, {e_r.hi:.2f}]: lower bound "
                          f"< {settings.weak_reference}, so no ratio is shown"}
    rho_lo, rho_hi = fieller(e_a, e_r, settings.confidence)
    row |= {"rho": e_a.effect / e_r.effect, "rho_lo": rho_lo, "rho_hi": rho_hi}
    if not e_a.lo > 0:
        return {**row, "verdict": "fails", "reason": ""}
    return {**row, "verdict": "transfers" if row["rho"] >= settings.rho_transfer else "partial", "reason": ""}


def label(verdict: str, provisional: bool) -> str:
    """The glyph of a verdict, marked when it is provisional."""
    mark = PROVISIONAL if provisional and verdict not in ("n/a", "no-reference") else ""
    return GLYPHS.get(verdict, "?") + mark


Effects = dict  # (technique, task, arch) -> Effect, or the reason there is none


def effects(cells: pd.DataFrame, settings: Settings = Settings()) -> Effects:
    """Every (technique, task, arch) group's effect, measured once for all tables."""
    return {key: measure(group, settings)
            for key, group in cells.groupby(["technique", "task", "arch"], sort=True)}


def verdicts(cells: pd.DataFrame, settings: Settings = Settings(), measured: Effects | None = None) -> pd.DataFrame:
    """One row per (technique, task, arch): scores, effect with CI, rho with CI, verdict."""
    measured = effects(cells, settings) if measured is None else measured
    rows = []
    for (tech, task, arch), e_a in measured.items():
        ref = measured.get((tech, task, settings.reference), "no cells")
        rows.append({"technique": tech, "task": task, "arch": arch, **_verdict(e_a, ref, settings)})
    return pd.DataFrame(rows)


def pool(effects_: list[Effect], confidence: float) -> Effect:
    """The mean over tasks of several effects: per seed (the seeds all tasks share), then over seeds."""
    seeds = sorted(set.intersection(*(set(e.per_seed) for e in effects_)))
    per_seed = {s: float(np.mean([e.per_seed[s] for e in effects_])) for s in seeds}
    ses = [e.example_se for e in effects_]
    se = float(np.sqrt(np.nansum(np.square(ses))) / len(ses)) if all(x is not None for x in ses) else None
    lo, hi = interval(list(per_seed.values()), confidence, se)
    return Effect(float(np.mean([e.trained for e in effects_])), float(np.mean([e.control for e in effects_])),
                  float(np.mean(list(per_seed.values()))) if seeds else float("nan"), lo, hi,
                  len(seeds), per_seed, se)


def summary(cells: pd.DataFrame, settings: Settings = Settings(), measured: Effects | None = None) -> pd.DataFrame:
    """One row per (technique, arch), pooling the tasks on which the technique works on R."""
    measured = effects(cells, settings) if measured is None else measured
    rows = []
    for tech, tc in cells.groupby("technique", sort=True):
        per_task = {task: measured.get((tech, task, settings.reference), "no cells")
                    for task in sorted(tc.task.unique())}
        good = [k for k, e in per_task.items() if isinstance(e, Effect) and e.lo > 0 and e.effect > 0]
        for arch in sorted(tc.arch.unique()):
            effects_ = {k: measured.get((tech, k, arch), "no cells") for k in good}
            usable = {k: e for k, e in effects_.items() if isinstance(e, Effect)}
            if not good:
                rows.append({"technique": tech, "arch": arch, "verdict": "no-reference", "provisional": False,
                             "reason": "the technique works on the reference for no task", "tasks": ""})
                continue
            if not usable:
                reasons = "; ".join(f"{k}: {e}" for k, e in effects_.items())
                rows.append({"technique": tech, "arch": arch, "verdict": "n/a", "reason": reasons,
                             "provisional": False, "tasks": ""})
                continue
            pooled_a = pool(list(usable.values()), settings.confidence)
            pooled_r = pool([per_task[k] for k in usable], settings.confidence)
            rows.append({"technique": tech, "arch": arch, **_verdict(pooled_a, pooled_r, settings),
                         "tasks": ",".join(sorted(usable))})
    return pd.DataFrame(rows)

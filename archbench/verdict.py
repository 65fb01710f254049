"""The transfer verdict: effects over random-init controls, hierarchical-bootstrap CIs, ratios.

For technique T, task K, architecture A (DESIGN.md section 5):
  effect  e = score(trained) - score(control), per seed (the control is the same seed's
          random init: the sanity check of Adebayo et al. 2018);
  CI      95% by hierarchical bootstrap: resample seeds, then examples within each seed
          (Saravanan et al. 2020, "Application of the hierarchical bootstrap");
  ratio   rho = mean e_A / mean e_R against the reference architecture R;
  verdict transfers (CI of e_A above 0 and rho >= rho_transfer), partial (CI above 0,
          rho below), fails (CI touches 0), no-reference (T does not work on R for K),
          n/a (roles missing or gate failed, with the reason).
The summary verdict of (T, A) pools the tasks on which T works on R.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

GLYPHS = {"transfers": "✓", "partial": "◐", "fails": "✗", "no-reference": "∅", "n/a": "–"}


@dataclass(frozen=True)
class Settings:
    reference: str = "transformer"
    rho_transfer: float = 0.8
    confidence: float = 0.95
    n_boot: int = 2000
    boot_seed: int = 0

    def describe(self) -> str:
        return (f"reference={self.reference}; transfers: {self.confidence:.0%} CI of effect > 0 and "
                f"rho >= {self.rho_transfer}; partial: CI > 0 and rho < {self.rho_transfer}; "
                f"fails: CI touches 0; bootstrap: {self.n_boot} hierarchical resamples (seeds, then examples)")

    def as_dict(self) -> dict:
        return asdict(self)


def boot_means(values, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) clipped means of example-level resamples of one seed's per-example values.

    With few distinct values (0/1 successes, normalised accuracies) a resample is a
    multinomial draw of the value counts: the same distribution at O(n_boot x distinct)
    cost instead of O(n_boot x n), which keeps `archbench report` at seconds on a full store.
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return np.full(n_boot, np.nan)
    levels, counts = np.unique(v, return_counts=True)
    if len(levels) <= 16:
        draws = rng.multinomial(v.size, counts / v.size, size=n_boot)  # (B, L)
        means = draws @ levels / v.size  # (B,)
    else:
        means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)  # (B,)
    return np.clip(means, 0.0, 1.0)


def effect_replicates(trained: dict[int, list[float]], control: dict[int, list[float]],
                      settings: Settings, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the mean effect: seeds resampled, then examples."""
    seeds = sorted(set(trained) & set(control))
    per_seed = np.stack([boot_means(trained[s], settings.n_boot, rng) -
                         boot_means(control[s], settings.n_boot, rng) for s in seeds])  # (S, B)
    pick = rng.integers(0, len(seeds), size=(settings.n_boot, len(seeds)))  # (B, S)
    return per_seed[pick, np.arange(settings.n_boot)[:, None]].mean(axis=1)  # (B,)


def _ci(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    a = (1 - confidence) / 2
    return float(np.nanquantile(reps, a)), float(np.nanquantile(reps, 1 - a))


@dataclass
class Effect:
    trained: float
    control: float
    effect: float
    lo: float
    hi: float
    n_seeds: int
    reps: np.ndarray


def measure(group: pd.DataFrame, settings: Settings, rng: np.random.Generator) -> Effect | str:
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
    t = np.mean([trained[s].score for s in seeds])
    c = np.mean([control[s].score for s in seeds])
    reps = effect_replicates({s: trained[s].per_example for s in seeds},
                             {s: control[s].per_example for s in seeds}, settings, rng)
    lo, hi = _ci(reps, settings.confidence)
    return Effect(float(t), float(c), float(t - c), lo, hi, len(seeds), reps)


def _verdict(e_a: Effect | str, e_r: Effect | str, settings: Settings) -> dict:
    if isinstance(e_a, str):
        return {"verdict": "n/a", "reason": e_a}
    row = {"trained": e_a.trained, "control": e_a.control, "effect": e_a.effect,
           "effect_lo": e_a.lo, "effect_hi": e_a.hi, "n_seeds": e_a.n_seeds}
    if isinstance(e_r, str) or e_r.lo <= 0 or e_r.effect <= 0:
        why = e_r if isinstance(e_r, str) else f"reference effect CI [{e_r.lo:.2f}, {e_r.hi:.2f}] touches 0"
        return {**row, "verdict": "no-reference", "reason": why}
    rho = e_a.effect / e_r.effect
    with np.errstate(divide="ignore", invalid="ignore"):
        rho_lo, rho_hi = _ci(e_a.reps / e_r.reps, settings.confidence)
    row |= {"rho": rho, "rho_lo": rho_lo, "rho_hi": rho_hi}
    if e_a.lo <= 0:
        return {**row, "verdict": "fails", "reason": ""}
    return {**row, "verdict": "transfers" if rho >= settings.rho_transfer else "partial", "reason": ""}


Effects = dict  # (technique, task, arch) -> Effect, or the reason there is none


def effects(cells: pd.DataFrame, settings: Settings = Settings()) -> Effects:
    """Every (technique, task, arch) group's effect, bootstrapped once for all tables."""
    rng = np.random.default_rng(settings.boot_seed)
    return {key: measure(group, settings, rng)
            for key, group in cells.groupby(["technique", "task", "arch"], sort=True)}


def verdicts(cells: pd.DataFrame, settings: Settings = Settings(), measured: Effects | None = None) -> pd.DataFrame:
    """One row per (technique, task, arch): scores, effect with CI, rho with CI, verdict."""
    measured = effects(cells, settings) if measured is None else measured
    rows = []
    for (tech, task, arch), e_a in measured.items():
        ref = measured.get((tech, task, settings.reference), "no cells")
        rows.append({"technique": tech, "task": task, "arch": arch, **_verdict(e_a, ref, settings)})
    return pd.DataFrame(rows)


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
                rows.append({"technique": tech, "arch": arch, "verdict": "no-reference",
                             "reason": "the technique works on the reference for no task", "tasks": ""})
                continue
            if not usable:
                reasons = "; ".join(f"{k}: {e}" for k, e in effects_.items())
                rows.append({"technique": tech, "arch": arch, "verdict": "n/a", "reason": reasons, "tasks": ""})
                continue
            pooled_a = _pool([usable[k] for k in usable])
            pooled_r = _pool([per_task[k] for k in usable])
            lo, hi = _ci(pooled_a.reps, settings.confidence)
            pooled_a.lo, pooled_a.hi = lo, hi
            pooled_r.lo, pooled_r.hi = _ci(pooled_r.reps, settings.confidence)
            rows.append({"technique": tech, "arch": arch, **_verdict(pooled_a, pooled_r, settings),
                         "tasks": ",".join(sorted(usable))})
    return pd.DataFrame(rows)


def _pool(effects: list[Effect]) -> Effect:
    """The mean over tasks of several effects (replicates averaged index by index)."""
    return Effect(trained=float(np.mean([e.trained for e in effects])),
                  control=float(np.mean([e.control for e in effects])),
                  effect=float(np.mean([e.effect for e in effects])), lo=np.nan, hi=np.nan,
                  n_seeds=min(e.n_seeds for e in effects),
                  reps=np.mean([e.reps for e in effects], axis=0))

"""The report's known-answer track: where each technique puts a variable whose place is known.

Two tables from the store's `localisation` rows (written by `archbench iit --results`):

- Known-answer organisms (task x architecture): behaviour, IIA at the designated component
  and the largest answer change another candidate causes, with how many pass the gate.
- Localisation (technique x architecture): per technique, the mean reciprocal rank (MRR)
  of the designated component among the candidates over the organisms that pass their gate
  (tasks x seeds), its 95% t-interval over those organisms, the same on their random-init
  controls, and how often the designated component is ranked first. Ties count against it
  (`archbench.localisation.rank`). A ranking that carries no information has an expected MRR
  of H(n)/n among n candidates (1/1 + ... + 1/n, over n): the chance level in each column
  header. A correlational technique (probe, lenses, SAE) that decodes the variable wherever
  it is readable ties the designated component with what reads it, and scores below a
  causal one that localises it.
"""

from __future__ import annotations

import pandas as pd

from archbench import verdict
from archbench.report_tables import Table, arch_order, ci


def chance_mrr(n: int) -> float:
    """Expected reciprocal rank of one item in a uniformly random order of n: H(n) / n."""
    return sum(1.0 / k for k in range(1, n + 1)) / n


def behaviour(loc: pd.DataFrame, reference: str) -> Table:
    """Known-answer organisms by task x architecture: behaviour · IIA · max other change, gate."""
    o = loc[~loc.control].drop_duplicates("organism")
    archs = arch_order(o.arch.unique(), reference)
    rows = []
    for task, g in o.groupby("task", sort=True):
        row = [task]
        for arch in archs:
            r = g[g.arch == arch]
            if r.empty:
                row.append("")
                continue
            m = pd.DataFrame(list(r.meta))
            passed = int((r.gate == "pass").sum())
            row.append(f"{m.accuracy.mean():.3f} · IIA {m.iia.mean():.3f} · other {m.max_other_change.max():.3f}"
                       f" · {passed}/{len(r)} pass")
        rows.append(row)
    note = ("Organisms trained by strict interchange intervention training (Geiger et al. 2022; Gupta et al. "
            "2024) to hold the task's primary variable at one designated component (the last block's token "
            "mixer at the answer position; KAN: the first layer's edges into hidden nodes 0-3 of 16; spiking: the "
            "last layer's membrane neurons 0-15 of 64 at the answer step). Per cell: held-out accuracy (mean over seeds) · IIA at the designated "
            "component (mean) · the largest fraction of answers another candidate changes when patched alone "
            "(max over seeds) · organisms passing the gate (behaviour ≥ 0.9, IIA ≥ 0.9, other ≤ 0.10) / built. "
            "Only organisms that pass are scored below.")
    return Table("known-answer", "Known-answer organisms (task × architecture)", ["task"] + archs, rows, note)


def localisation(loc: pd.DataFrame, reference: str, settings: verdict.Settings) -> Table:
    """Technique x architecture: MRR of the designated component [CI] on passing organisms and controls."""
    passed = loc[(loc.gate == "pass")]
    archs = arch_order(passed.arch.unique(), reference)
    n_cand = {a: int(passed[passed.arch == a].n_candidates.iloc[0]) for a in archs}
    rows = []
    for technique in sorted(passed.technique.unique()):
        row = [technique]
        for arch in archs:
            g = passed[(passed.technique == technique) & (passed.arch == arch)]
            trained, control = g[~g.control], g[g.control]
            if g.empty:
                row.append("")
                continue
            if trained["rank"].isna().all():
                row.append("n/a")
                continue
            rr = (1.0 / trained["rank"].astype(float)).tolist()
            rc = (1.0 / control["rank"].astype(float)).tolist()
            lo, hi = verdict.interval(rr, settings.confidence)
            first = int((trained["rank"] == 1).sum())
            row.append(f"{sum(rr) / len(rr):.2f} {ci(lo, hi)}\ncontrol {sum(rc) / len(rc):.2f} · "
                       f"first {first}/{len(rr)}")
        rows.append(row)
    header = ["technique"] + [f"{a} (n={n_cand[a]}, chance {chance_mrr(n_cand[a]):.2f})" for a in archs]
    note = ("Does the technique find where the variable is? Per cell: mean reciprocal rank (MRR) of the designated "
            "component among the n candidate components at the answer position (every mixer and MLP output there; KAN and spiking: the four equal "
            "feature groups of the designated component's hook point), "
            "over the known-answer organisms that pass their gate (tasks × seeds), with its 95% t-interval over "
            "those organisms (blank with one); the same on their random-init controls; how many organisms rank it "
            "first. Ties count against the designated component. Chance: the expected MRR of a random order, H(n)/n. "
            "Each technique scores components its own way (archbench/component_rankers.py): patching by interchange "
            "accuracy, ablation by the accuracy lost to mean ablation, attribution by attribution patching, steering "
            "by difference-of-means success over a random direction, probe/lenses/SAE by how well the variable or "
            "answer is read. The last three are correlational: they tie the designated component with the "
            "components that read its output.")
    return Table("localisation", "Localisation on known-answer organisms (technique × architecture)", header,
                 rows, note)


def tables(loc: pd.DataFrame, reference: str, settings: verdict.Settings) -> list[Table]:
    """The track's tables; none when the store holds no localisation rows."""
    if loc is None or loc.empty:
        return []
    out = [behaviour(loc, reference)]
    if (loc.gate == "pass").any():
        out.append(localisation(loc, reference, settings))
    return out

"""The known-answer table: what each known-answer organism is and where each technique puts it.

One row per (family, task, seed): behaviour (held-out accuracy), IIA at the designated
component, the largest answer change any other candidate causes, the gate, and for every
component ranker of `archbench.component_rankers` the rank it gives the designated
component on the organism and on its random-init control ("1/4 · 3/4"), with training
seconds. Families without known-answer organisms get a row with the reason. `archbench iit`
prints it as markdown and, with `--results`, stores `localisation_rows` (one per technique
and control) for the report's known-answer track.
"""

from __future__ import annotations

from typing import Any

from archbench import component_rankers, iit_sites, known_answer, localisation, registry, zoo

TECHNIQUES = list(component_rankers.RANKERS)
COLUMNS = ["family", "task", "seed", "designated", "candidates", "behaviour", "IIA", "max other change", "gate",
           *TECHNIQUES, "train s"]


def localisation_rows(arch: str, task_name: str, seed: int) -> list[dict[str, Any]]:
    """The store rows of one known-answer organism (trained, or from the cache): per
    technique, the designated component's rank and every candidate's score, on the organism
    and on its random-init control. Empty for a family without known-answer organisms."""
    task = registry.task(task_name).for_seed(seed)
    if iit_sites.why_not(registry.adapter(arch).family):
        return []
    adapter, meta = zoo.known_answer_organism(arch, task, seed)
    al = known_answer.alignment(arch, task, seed)
    control = zoo.control(arch, task, seed)
    kept = {k: v for k, v in meta.items() if k != "history"}
    rows = []
    for technique in TECHNIQUES:
        for is_control, model in ((False, adapter), (True, control)):
            scores = component_rankers.component_scores(technique, model, task, seed, al)
            rows.append({"organism": meta["organism"], "technique": technique, "control": is_control,
                         "arch": arch, "task": task_name, "seed": seed, "designated": al.designated,
                         "n_candidates": len(al.candidates), "scores": scores,
                         "rank": None if scores is None else localisation.rank(al.designated, scores),
                         "gate": known_answer.gate_reason(meta) or "pass", "meta": kept})
    return rows


def row(arch: str, task_name: str, seed: int, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The table row of one known-answer organism, from its `localisation_rows`."""
    reason = iit_sites.why_not(registry.adapter(arch).family)
    if reason:
        return {"family": arch, "task": task_name, "seed": seed, "gate": f"n/a: {reason}"}
    rows = localisation_rows(arch, task_name, seed) if rows is None else rows
    meta, n = rows[0]["meta"], rows[0]["n_candidates"]
    out = {"family": arch, "task": task_name, "seed": seed, "designated": rows[0]["designated"], "candidates": n,
           "behaviour": meta["accuracy"], "IIA": meta["iia"], "max other change": meta["max_other_change"],
           "gate": rows[0]["gate"], "train s": meta["seconds"]}
    for technique in TECHNIQUES:
        ranks = {r["control"]: r["rank"] for r in rows if r["technique"] == technique}
        out[technique] = "n/a" if ranks[False] is None else f"{ranks[False]} · {ranks[True]}"
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (numbers to 3 decimals, seconds to whole ones); each
    technique column reads "rank on the organism · rank on its control" among `candidates`."""
    def cell(key, value):
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.0f}" if key == "train s" else f"{value:.3f}"
        return str(value)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"

"""The known-answer table: what each known-answer organism is and where patching puts it.

One row per (family, task, seed): behaviour (held-out accuracy), IIA at the designated
component, the largest answer change any other candidate causes, the gate, the rank that
component-level patching (`archbench.localisation`) and the probe give the designated
component on the organism and on its random-init control, and training seconds. Families
without known-answer organisms get a row with the reason. `archbench iit` prints it as
markdown.
"""

from __future__ import annotations

from typing import Any

from archbench import iit_sites, known_answer, localisation, registry, zoo

COLUMNS = ["family", "task", "seed", "designated", "behaviour", "IIA", "max other change", "gate",
           "patching rank", "control patching rank", "probe rank", "train s"]


def row(arch: str, task_name: str, seed: int) -> dict[str, Any]:
    """The table row of one known-answer organism (trained, or from the cache)."""
    task = registry.task(task_name).for_seed(seed)
    reason = iit_sites.why_not(registry.adapter(arch).family)
    if reason:
        return {"family": arch, "task": task_name, "seed": seed, "gate": f"n/a: {reason}"}
    adapter, meta = zoo.known_answer_organism(arch, task, seed)
    al = known_answer.alignment(arch, task, seed)
    control = zoo.control(arch, task, seed)
    n = len(al.candidates)
    return {"family": arch, "task": task_name, "seed": seed, "designated": al.designated,
            "behaviour": meta["accuracy"], "IIA": meta["iia"], "max other change": meta["max_other_change"],
            "gate": known_answer.gate_reason(meta) or "pass",
            "patching rank": f"{localisation.rank(al.designated, localisation.patching_scores(adapter, task, seed, al))}/{n}",
            "control patching rank":
                f"{localisation.rank(al.designated, localisation.patching_scores(control, task, seed, al))}/{n}",
            "probe rank": f"{localisation.rank(al.designated, localisation.probe_scores(adapter, task, seed, al))}/{n}",
            "train s": meta["seconds"]}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (numbers to 3 decimals, seconds to whole ones)."""
    def cell(key, value):
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.0f}" if key == "train s" else f"{value:.3f}"
        return str(value)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"

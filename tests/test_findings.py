"""The findings section decides each published finding from the store's rows by its stated rule."""

from __future__ import annotations

import json

import pandas as pd

from archbench import findings, findings_figures


def _cell(technique, arch, task, seed, control, score, metrics=None, details=None, status="ok", reason=None):
    return {"technique": technique, "arch": arch, "task": task, "seed": seed, "control": control,
            "status": status, "score": score, "reason": reason, "metrics": metrics or {}, "details": details or []}


def _frame(rows):
    return pd.DataFrame(rows, columns=["technique", "arch", "task", "seed", "control", "status", "score", "reason",
                                       "metrics", "details"])


NO_ORGANISMS = pd.DataFrame(columns=["arch", "task", "seed", "accuracy", "meta"])


def _status(cells, organisms=NO_ORGANISMS) -> dict[str, str]:
    return {f.key: m.status for f, m in findings.measure_all(cells, organisms)}


def test_an_empty_store_tests_nothing_and_has_no_section():
    empty = _frame([])
    assert set(_status(empty).values()) == {"not testable"}
    assert findings.table(empty, NO_ORGANISMS) is None


def _fourier(share, kept, score=0.9):
    spectrum = [{"frequency": k, "share_embed": 0.1} for k in range(1, 12)]
    return ([_cell("fourier", "transformer", "modadd", s, False, score + 0.01 * s,
                   {"key_share": share, "accuracy_kept": kept}, spectrum) for s in range(3)]
            + [_cell("fourier", "transformer", "modadd", s, True, 0.1, {"key_share": 0.5}, spectrum) for s in range(3)])


def test_nanda_is_reproduced_only_when_power_is_concentrated_and_ablation_keeps_accuracy():
    assert _status(_frame(_fourier(0.95, 1.0)))["nanda"] == "reproduced"
    assert _status(_frame(_fourier(0.95, 0.5)))["nanda"] == "contradicted"  # ablation breaks it
    assert _status(_frame(_fourier(0.3, 1.0)))["nanda"] == "contradicted"  # power spread out
    assert _status(_frame(_fourier(0.95, 1.0, score=0.1)))["nanda"] == "contradicted"  # no effect over control
    assert findings_figures.nanda(_frame(_fourier(0.95, 1.0))) is not None


def _tracing(arch, kind, layer, n_layers=6):
    grid = [{"role": "stream", "layer": b, "position": p, "position_kind": k, "ie": 0.5}
            for b in range(1, n_layers + 1) for p, k in enumerate(["context", "subject_first", "subject_last"])]
    return ([_cell("causal_tracing", arch, "facts_long", s, False, 0.8 + 0.01 * s,
                   {"peak_subject_position_kind": kind, "peak_subject_layer": layer, "n_layers": n_layers}, grid)
             for s in range(3)]
            + [_cell("causal_tracing", arch, "facts_long", s, True, 0.05) for s in range(3)])


def test_meng_needs_the_last_subject_token_in_a_middle_block():
    deep = findings.DEEP
    assert _status(_frame(_tracing(deep, "subject_last", 3)))["meng"] == "reproduced"
    assert _status(_frame(_tracing(deep, "subject_first", 3)))["meng"] == "contradicted"
    assert _status(_frame(_tracing(deep, "subject_last", 6)))["meng"] == "contradicted"  # the last block
    assert _status(_frame(_tracing(deep, "subject_last", 1)))["meng"] == "contradicted"  # the first block
    assert _status(_frame(_tracing(findings.DEEP_MAMBA, "subject_last", 3)))["sharma"] == "reproduced"
    assert findings_figures.tracing(_frame(_tracing(deep, "subject_last", 3))) is not None


def test_a_gated_organism_makes_a_finding_not_testable_with_its_reason():
    rows = [_cell("symbolic", "kan", "regression", s, c, None, status="n/a",
                  reason="gate failed: held-out accuracy 0.41 < 0.90") for s in range(3) for c in (False, True)]
    measured = dict((f.key, m) for f, m in findings.measure_all(_frame(rows), NO_ORGANISMS))
    assert measured["pykan"].status == "not testable" and "gate failed" in measured["pykan"].text


def test_pykan_needs_a_high_r2_and_the_true_functions():
    good = [_cell("symbolic", "kan", "regression", s, False, 0.98, {"structure_match": True, "formula_match": True, "formula": "exp(...)"})
            for s in range(3)]
    assert _status(_frame(good))["pykan"] == "reproduced"
    wrong = [_cell("symbolic", "kan", "regression", s, False, 0.98, {"structure_match": False, "formula_match": True}) for s in range(3)]
    assert _status(_frame(wrong))["pykan"] == "contradicted"


def _organisms(acc):
    rows = []
    for (arch, pairs), values in acc.items():
        for seed, a in enumerate(values):
            rows.append({"arch": arch, "task": "mqar", "seed": seed, "accuracy": a,
                         "meta": json.dumps({"task_config": {"n_pairs": pairs, "n_keys": findings.MQAR_VOCAB}})})
    return pd.DataFrame(rows)


def test_zoology_needs_the_attention_gap_to_grow_with_the_pairs():
    few, most = findings.MQAR_PAIRS[0], findings.MQAR_PAIRS[-1]
    grows = {("transformer", few): [1.0, 1.0, 1.0], ("rwkv", few): [0.98, 0.99, 1.0],
             ("transformer", most): [0.95, 0.97, 0.96], ("rwkv", most): [0.30, 0.40, 0.35]}
    assert _status(_frame([]), _organisms(grows))["zoology"] == "reproduced"
    flat = {**grows, ("rwkv", most): [0.96, 0.97, 0.95]}
    assert _status(_frame([]), _organisms(flat))["zoology"] == "contradicted"
    assert findings_figures.zoology(_organisms(grows)) is not None


def test_findings_name_the_cells_they_need():
    specs = findings.specs(range(2))
    assert {(s.technique, s.arch, s.task) for s in specs} >= {
        ("fourier", "transformer", "modadd"), ("causal_tracing", findings.DEEP, "facts_long"),
        ("symbolic", "kan", "regression"), (findings.MQAR_TECHNIQUE, "transformer", findings.mqar_task(4))}
    assert len(specs) == len(set(specs)) and {s.control for s in specs} == {False, True}

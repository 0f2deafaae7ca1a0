"""Promotion gates on metric summaries, without a registry: the default gates refuse a model that
flags everything and one that scores at random, and pass a good one."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pe_triage.config import EvalConfig, GateConfig, RegistryConfig
from pe_triage.evaluation import evaluate_predictions
from pe_triage.evaluation.exam import EXAM_SUMMARY_KEYS
from pe_triage.registry.registry import MIN_GATES, REGRESSION_METRICS, GateResult, evaluate_gates

GOOD = {
    "patient_pe_sensitivity": 1.0, "patient_disease_sensitivity": 1.0, "slice_disease_sensitivity": 0.95,
    "slice_wnl_sensitivity": 0.9,
    "slice_pe_specificity": 0.9, "patient_pe_specificity": 0.8, "slice_stage1_auroc_ci_low": 0.85,
    "slice_stage2_auroc_ci_low": 0.9, "slice_stage1_auroc": 0.95, "slice_stage2_auroc": 0.97,
    "patient_cascade_accuracy": 0.9, "slice_cascade_accuracy": 0.9,
}
TEST_DATA = {"windows_digest": "w", "splits_digest": "s", "split": "test", "fold": "default"}


EXAM_GATES = {"min_exam_patient_pe_sensitivity", "min_exam_patient_disease_sensitivity", "min_exam_patient_pe_specificity",
              "min_exam_patient_pe_auroc_ci_low"}


def metrics(**summary: Any) -> dict[str, Any]:
    return {"summary": GOOD | summary, "test_data": TEST_DATA}


def failed(gates: list[GateResult]) -> list[str]:
    return [g.name for g in gates if not g.passed]


def test_every_minimum_is_on_by_default_and_a_good_summary_passes() -> None:
    gates = evaluate_gates(metrics(), None, RegistryConfig())
    assert [g.name for g in gates] == [name for name, _ in MIN_GATES if name not in EXAM_GATES]  # exam gates: off
    assert failed(gates) == []
    assert {f.name for f in fields(GateConfig)} == {n for n, _ in MIN_GATES} | {
        "max_regression", "max_site_auroc_drop", "max_site_pe_sensitivity_drop"}


@pytest.mark.parametrize(("name", "key"), MIN_GATES)
def test_each_minimum_refuses_below_its_threshold_and_names_itself(name: str, key: str) -> None:
    on = RegistryConfig(gates=replace(GateConfig(), **{name: getattr(GateConfig(), name) or 0.8}))  # exam gates: switched on
    gates = evaluate_gates(metrics(**{key: 0.4}), None, on)
    assert failed(gates) == [name]
    (gate,) = [g for g in gates if g.name == name]
    assert key in gate.detail and "<" in gate.detail


def test_a_metric_not_measured_fails_its_gate_without_a_crash() -> None:
    summary = {k: v for k, v in GOOD.items() if k != "slice_pe_specificity"} | {
        "slice_stage2_auroc_ci_low": None, "patient_pe_specificity": "n/a"}
    results = evaluate_gates({"summary": summary, "test_data": TEST_DATA}, None, RegistryConfig())
    gates = {g.name: g for g in results}
    assert sorted(n for n, g in gates.items() if not g.passed) == [
        "min_patient_pe_specificity", "min_slice_pe_specificity", "min_stage2_auroc_ci_low"]
    assert "missing from the metrics summary" in gates["min_slice_pe_specificity"].detail
    assert "not measured" in gates["min_stage2_auroc_ci_low"].detail
    assert gates["min_patient_pe_specificity"].value is None


def test_exam_gates_are_off_by_default_and_judge_the_exam_model_when_set() -> None:
    assert all(getattr(GateConfig(), name) is None for name in EXAM_GATES)
    assert {key for name, key in MIN_GATES if name in EXAM_GATES} <= set(EXAM_SUMMARY_KEYS)
    config = RegistryConfig(gates=GateConfig(min_exam_patient_pe_sensitivity=0.9, min_exam_patient_pe_auroc_ci_low=0.6))
    exam = {"exam_patient_pe_sensitivity": 0.95, "exam_patient_pe_auroc_ci_low": 0.7}
    assert failed(evaluate_gates(metrics(**exam), None, config)) == []
    low = evaluate_gates(metrics(**exam | {"exam_patient_pe_sensitivity": 0.85}), None, config)
    assert failed(low) == ["min_exam_patient_pe_sensitivity"]
    gates = {g.name: g for g in evaluate_gates(metrics(), None, config)}  # a version without an exam model
    assert not gates["min_exam_patient_pe_sensitivity"].passed
    assert "missing from the metrics summary" in gates["min_exam_patient_pe_sensitivity"].detail


def test_a_gate_result_is_recorded_as_the_json_the_decision_tags_always_held() -> None:
    gate = GateResult("min_patient_pe_sensitivity", 0.9, 0.8, True, "patient_pe_sensitivity 0.9000 >= 0.8")
    assert json.dumps(asdict(gate)) == json.dumps({"name": "min_patient_pe_sensitivity", "value": 0.9, "threshold": 0.8,
                                                   "passed": True, "detail": "patient_pe_sensitivity 0.9000 >= 0.8"})


def test_a_gate_set_to_none_is_off() -> None:
    config = RegistryConfig(gates=GateConfig(min_stage2_auroc_ci_low=None, min_slice_pe_specificity=None))
    gates = evaluate_gates(metrics(slice_stage2_auroc_ci_low=None, slice_pe_specificity=0.0), None, config)
    assert failed(gates) == [] and "min_stage2_auroc_ci_low" not in [g.name for g in gates]


def test_the_champion_comparison_covers_discrimination() -> None:
    assert {"slice_stage1_auroc", "slice_stage2_auroc"} <= set(REGRESSION_METRICS)
    # the slice sensitivities move with the operating point
    assert not any(m.startswith("slice_") and m.endswith("sensitivity") for m in REGRESSION_METRICS)
    gates = evaluate_gates(metrics(slice_stage1_auroc=0.9), metrics(), RegistryConfig())
    assert failed(gates) == ["max_regression.slice_stage1_auroc"]
    old_champion = metrics()
    del old_champion["summary"]["slice_stage2_auroc"]  # nothing measured to regress from: no gate
    names = [g.name for g in evaluate_gates(metrics(), old_champion, RegistryConfig())]
    assert "max_regression.slice_stage2_auroc" not in names


# ------------------------------------------------------------------- from evaluated predictions

def cohort() -> pd.DataFrame:
    """12 patients each of WNL, other disease and PE, 10 slices; a diseased patient has 4 lesion slices."""
    rows = []
    for cls in ("wnl", "other", "pe"):
        for p in range(12):
            labels = ["wnl"] * 10 if cls == "wnl" else ["wnl"] * 3 + [cls] * 4 + ["wnl"] * 3
            rows += [{"site": "A", "patient_id": f"{cls}{p}", "series_uid": f"{cls}{p}s", "slice_index": i,
                      "label": lab} for i, lab in enumerate(labels)]
    return pd.DataFrame(rows)


def judged(p_disease: np.ndarray, p_pe: np.ndarray, pred: pd.DataFrame) -> list[GateResult]:
    scored = pred.assign(p_disease=p_disease, p_pe=p_pe)
    m = evaluate_predictions(scored, threshold_stage1=0.5, threshold_stage2=0.5,
                             config=EvalConfig(bootstrap=200))
    return evaluate_gates({"summary": m["summary"], "test_data": TEST_DATA}, None, RegistryConfig())


def test_a_model_that_flags_everything_is_refused() -> None:
    pred = cohort()
    ones = np.ones(len(pred))
    names = failed(judged(ones, ones, pred))
    # the sensitivities, all it had to pass before, it passes
    assert not {"min_patient_pe_sensitivity", "min_patient_disease_sensitivity", "min_slice_disease_sensitivity"} & set(names)
    assert names == ["min_slice_disease_specificity", "min_slice_pe_specificity", "min_patient_pe_specificity",
                     "min_stage1_auroc_ci_low", "min_stage2_auroc_ci_low"]


def test_a_model_scoring_at_random_is_refused() -> None:
    pred = cohort()
    rng = np.random.default_rng(1)
    names = failed(judged(rng.uniform(size=len(pred)), rng.uniform(size=len(pred)), pred))
    assert {"min_stage1_auroc_ci_low", "min_stage2_auroc_ci_low"} <= set(names)


def test_a_good_model_passes() -> None:
    pred = cohort()
    rng = np.random.default_rng(2)
    label = pred["label"].to_numpy()
    noise = rng.normal(0, 0.1, (2, len(pred)))
    p_disease = np.clip(np.where(label == "wnl", 0.2, 0.8) + noise[0], 0, 1)
    p_pe = np.clip(np.where(label == "pe", 0.8, 0.2) + noise[1], 0, 1)
    assert failed(judged(p_disease, p_pe, pred)) == []

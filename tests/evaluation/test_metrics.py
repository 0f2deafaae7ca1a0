"""Evaluation metrics against values computed by hand on a 14-slice, 4-patient, 2-site cohort."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pe_triage.cli import main
from pe_triage.config import ConfigError, EvalConfig, IndeterminateMode
from pe_triage.evaluation import (
    SUMMARY_KEYS,
    auroc,
    average_precision,
    cascade_labels,
    evaluate_predictions,
    format_proportion,
    leave_one_site_out_summary,
    patient_decisions,
    patient_predictions,
    proportion,
    wilson_interval,
)
from pe_triage.evaluation.evaluate import EvaluationError, summarize_site_folds
from pe_triage.evaluation.metrics import CLASSES, curves
from pe_triage.stats import bootstrap_ranking

T1 = T2 = 0.5


def _slices(site: str, patient: str, series: str, labels: list[str], p_disease: list[float], p_pe: list[float]) -> list[dict]:
    return [{"site": site, "patient_id": patient, "series_uid": series, "slice_index": i, "label": lab, "p_disease": d, "p_pe": p}
            for i, (lab, d, p) in enumerate(zip(labels, p_disease, p_pe, strict=True))]


def cohort() -> pd.DataFrame:
    """a1: PE patient; a2: WNL patient with one false-positive slice; b1: other disease over two
    series whose boundary would make a false run of two; b2: WNL patient with no positive slice.
    Rows shuffled: order must come from slice_index, not from the frame."""
    rows = (_slices("A", "a1", "a1s", ["wnl", "pe", "pe", "pe", "wnl"], [.2, .9, .8, .4, .1], [.1, .7, .35, .9, .2])
            + _slices("A", "a2", "a2s", ["wnl"] * 3, [.1, .6, .3], [.9, .2, .1])
            + _slices("B", "b1", "b1s1", ["other", "other"], [.2, .7], [.1, .6])
            + _slices("B", "b1", "b1s2", ["other", "wnl"], [.9, .3], [.3, .2])
            + _slices("B", "b2", "b2s", ["wnl", "wnl"], [.2, .4], [.5, .5]))
    return pd.DataFrame(rows).sample(frac=1.0, random_state=3).reset_index(drop=True)


def evaluate(pred: pd.DataFrame | None = None, **cfg: object) -> dict:
    config = EvalConfig(**{"bootstrap": 200, **cfg})  # type: ignore[arg-type]
    return evaluate_predictions(cohort() if pred is None else pred, threshold_stage1=T1, threshold_stage2=T2, config=config)


def kn(p: dict) -> tuple[int, int]:
    return p["k"], p["n"]


# ----------------------------------------------------------------------------- proportions

def test_wilson_interval_matches_known_values() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(8, 10, 0.90) == pytest.approx((0.54079, 0.93144), abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_proportion_and_the_study_format() -> None:
    p = proportion(525, 542)
    assert p["k"] == 525 and p["n"] == 542 and p["value"] == pytest.approx(525 / 542)
    assert format_proportion(p) == "96.9% (525/542)"
    assert format_proportion(proportion(8, 10), ci=True) == "80.0% (8/10) [49.0–94.3]"
    empty = proportion(0, 0)
    assert empty == {"value": None, "k": 0, "n": 0, "ci": None}
    assert format_proportion(empty) == "— (0/0)" == format_proportion(empty, ci=True)


# ----------------------------------------------------------------------------- ranking metrics

def test_auroc_counts_ties_as_half_and_average_precision_is_step_wise() -> None:
    assert auroc([1, 0, 1, 0], [.9, .8, .7, .6]) == pytest.approx(0.75)
    assert average_precision([1, 0, 1, 0], [.9, .8, .7, .6]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # tie at 0.8 between a positive and a negative: half a pair; AP takes the tie as one threshold
    assert auroc([1, 0, 1, 0], [.8, .8, .5, .2]) == pytest.approx(2.5 / 4)
    assert average_precision([1, 0, 1, 0], [.8, .8, .5, .2]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert auroc([1, 1, 0], [.5, .5, .5]) == pytest.approx(0.5)
    assert auroc([1, 1], [.2, .3]) is None and average_precision([0, 0], [.2, .3]) is None
    assert auroc([], []) is None


def test_bootstrap_is_seeded_skips_one_class_resamples_and_is_degenerate_when_perfect() -> None:
    y = np.array([1, 1, 0, 0, 0, 0], bool)
    score = np.array([.9, .4, .5, .3, .2, .1])
    groups = np.array([0, 0, 0, 1, 1, 1])  # patient 1 has no positive: a resample of it alone is skipped
    a = bootstrap_ranking(y, score, groups, resamples=400, confidence=0.95, seed=7)
    b = bootstrap_ranking(y, score, groups, resamples=400, confidence=0.95, seed=7)
    assert a == b
    assert a["auroc"]["value"] == pytest.approx(7 / 8)
    assert 250 < a["auroc"]["resamples"] < 350  # about 3/4 of the resamples contain patient 0
    lo, hi = a["auroc"]["ci"]
    assert 0 <= lo <= hi <= 1
    perfect = bootstrap_ranking(y, np.where(y, 1.0, 0.0), np.arange(6), resamples=100, confidence=0.95, seed=0)
    assert perfect["auroc"]["ci"] == [1.0, 1.0] and perfect["auprc"]["ci"] == [1.0, 1.0]
    absent = bootstrap_ranking(np.zeros(3, bool), np.ones(3), np.arange(3), resamples=100, confidence=0.95, seed=0)
    assert absent["auroc"] == {"value": None, "ci": None, "n_pos": 0, "n_neg": 3, "resamples": 0}


def test_bootstrap_over_patients_equals_slice_weights() -> None:
    """A resample drawing a patient twice counts its slices twice: check one resample by hand."""
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.3
    score = rng.random(60).round(1)  # many ties
    groups = np.arange(60) // 6
    counts = np.random.default_rng(5).multinomial(10, np.full(10, 0.1), size=1)[0]
    weights = counts[groups]
    expanded_y, expanded_s = np.repeat(y, weights), np.repeat(score, weights)
    out = bootstrap_ranking(y, score, groups, resamples=1, confidence=0.5, seed=5)
    assert out["auroc"]["ci"][0] == pytest.approx(auroc(expanded_y, expanded_s))
    assert out["auprc"]["ci"][0] == pytest.approx(average_precision(expanded_y, expanded_s))


def test_curves_start_and_end_at_the_corners_and_are_downsampled() -> None:
    c = curves(np.array([1, 0, 1, 0], bool), np.array([.9, .8, .7, .6]))
    assert c is not None
    assert c["roc"]["fpr"] == [0.0, 0.0, 0.5, 0.5, 1.0] and c["roc"]["tpr"] == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert c["pr"]["recall"][-1] == 1.0 and c["pr"]["precision"][0] == 1.0
    rng = np.random.default_rng(0)
    big = curves(rng.random(5000) < 0.5, rng.random(5000))
    assert big is not None and len(big["roc"]["fpr"]) <= 200 and big["roc"]["fpr"][-1] == 1.0
    assert curves(np.ones(3, bool), np.ones(3)) is None


# ----------------------------------------------------------------------------- per slice

def test_stage1_per_slice_by_hand() -> None:
    s1 = evaluate()["slice"]["stage1"]
    assert s1["confusion"]["matrix"] == [[7, 1], [2, 4]]  # [[tn, fp], [fn, tp]]
    assert kn(s1["accuracy"]) == (11, 14)
    assert kn(s1["sensitivity"]) == (4, 6) and kn(s1["class_sensitivity"]["disease"]) == (4, 6)
    assert kn(s1["specificity"]) == (7, 8) and kn(s1["class_sensitivity"]["wnl"]) == (7, 8)
    assert kn(s1["ppv"]) == (4, 5) and kn(s1["npv"]) == (7, 9)
    assert s1["accuracy"]["ci"] == pytest.approx(list(wilson_interval(11, 14)))
    assert s1["auroc"]["value"] == pytest.approx(41.5 / 48)  # two positive/negative ties (0.4, 0.2)
    assert s1["auprc"]["value"] == pytest.approx(73 / 84)
    lo, hi = s1["auroc"]["ci"]
    assert lo <= s1["auroc"]["value"] <= hi


def test_stage2_per_slice_uses_only_true_disease_slices() -> None:
    s2 = evaluate()["slice"]["stage2"]
    assert s2["n"] == 6 and s2["classes"] == ["other", "pe"]
    assert s2["confusion"]["matrix"] == [[2, 1], [1, 2]]
    assert kn(s2["accuracy"]) == (4, 6) and kn(s2["sensitivity"]) == (2, 3) and kn(s2["specificity"]) == (2, 3)
    assert s2["auroc"]["value"] == pytest.approx(8 / 9)
    assert s2["auprc"]["value"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 4)


def test_cascade_per_slice_by_hand_and_counts_add_up() -> None:
    m = evaluate()
    c = m["slice"]["cascade"]
    assert c["labels"] == ["wnl", "other", "pe"]
    assert c["confusion"]["matrix"] == [[7, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert kn(c["accuracy"]) == (9, 14)
    assert kn(c["class_ppv"]["wnl"]) == (7, 9) and kn(c["class_ppv"]["pe"]) == (1, 2)
    assert np.sum(c["confusion"]["matrix"]) == m["summary"]["slices"] == 14
    assert list(cascade_labels([.4, .5, .5], [.9, .5, .49], 0.5, 0.5)) == ["wnl", "pe", "other"]


# ----------------------------------------------------------------------------- per patient

def test_patient_rule_any_by_hand() -> None:
    pt = patient_predictions(cohort(), threshold_stage1=T1, threshold_stage2=T2, config=EvalConfig())
    assert list(pt["patient_id"]) == ["a1", "a2", "b1", "b2"]
    assert list(pt["truth"]) == ["pe", "wnl", "other", "wnl"]
    assert list(pt["disease_score"]) == pytest.approx([.9, .6, .9, .4])
    assert list(pt["pe_score"]) == pytest.approx([.7, .2, .6, -np.inf])  # b2: no slice passes stage 1
    assert list(pt["predicted"]) == ["pe", "other", "pe", "wnl"]
    pa = evaluate()["patient"]
    assert pa["rule"] == {"name": "any", "k": None}
    assert kn(pa["disease"]["accuracy"]) == (3, 4)
    assert kn(pa["disease"]["sensitivity"]) == (2, 2) and kn(pa["disease"]["specificity"]) == (1, 2)
    assert kn(pa["pe"]["sensitivity"]) == (1, 1) and kn(pa["pe"]["specificity"]) == (2, 3)
    assert pa["cascade"]["confusion"]["matrix"] == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert kn(pa["cascade"]["accuracy"]) == (2, 4)
    assert kn(pa["wnl_slice_sensitivity"]) == (4, 5)  # WNL slices of the WNL patients a2, b2
    assert kn(pa["by_class"]["wnl"]["correct"]) == (1, 2)
    assert kn(pa["by_class"]["pe"]["wnl_slice_sensitivity"]) == (2, 2)
    assert pa["disease"]["auroc"]["value"] == 1.0


def test_patient_rule_k_consecutive_stays_inside_a_series() -> None:
    pt = patient_predictions(cohort(), threshold_stage1=T1, threshold_stage2=T2,
                             config=EvalConfig(patient_rule="k_consecutive", k=2))
    # b1's positive slices 0.7 (end of series 1) and 0.9 (start of series 2) are not a run
    assert list(pt["disease_score"]) == pytest.approx([.8, .3, .3, .2])
    # a1's two stage-1-positive slices have P(PE) 0.7 and 0.35: no run of two PE slices
    assert pt["pe_score"].iloc[0] == pytest.approx(.35)
    assert list(pt["predicted"]) == ["other", "wnl", "wnl", "wnl"]
    pa = evaluate(patient_rule="k_consecutive", k=2)["patient"]
    assert pa["rule"] == {"name": "k_consecutive", "k": 2}
    assert kn(pa["disease"]["sensitivity"]) == (1, 2) and kn(pa["pe"]["sensitivity"]) == (0, 1)
    assert pa["cascade"]["confusion"]["matrix"] == [[2, 0, 0], [1, 0, 0], [0, 1, 0]]
    # k = 1 is the study's rule; a series shorter than k never fires
    any_rule = patient_predictions(cohort(), threshold_stage1=T1, threshold_stage2=T2, config=EvalConfig())
    k1 = patient_predictions(cohort(), threshold_stage1=T1, threshold_stage2=T2,
                             config=EvalConfig(patient_rule="k_consecutive", k=1))
    pd.testing.assert_frame_equal(any_rule, k1)
    k9 = patient_predictions(cohort(), threshold_stage1=T1, threshold_stage2=T2,
                             config=EvalConfig(patient_rule="k_consecutive", k=9))
    assert np.isneginf(k9["disease_score"]).all() and (k9["predicted"] == "wnl").all()


def test_patient_rule_top_k_mean() -> None:
    pt = patient_predictions(cohort(), threshold_stage1=T1, threshold_stage2=T2,
                             config=EvalConfig(patient_rule="top_k_mean", k=2))
    assert list(pt["disease_score"]) == pytest.approx([.85, .45, .8, .3])
    # P(PE) averaged over the stage-1-positive slices only: a1 (0.7 + 0.35) / 2, b1 (0.6 + 0.3) / 2
    assert list(pt["pe_score"]) == pytest.approx([.525, -np.inf, .45, -np.inf])
    assert list(pt["predicted"]) == ["pe", "wnl", "other", "wnl"]
    assert kn(evaluate(patient_rule="top_k_mean", k=2)["patient"]["cascade"]["accuracy"]) == (4, 4)
    # fewer slices than k: the mean of those there are
    one = pd.DataFrame(_slices("A", "p", "s", ["pe"], [.8], [.9]))
    pt1 = patient_predictions(one, threshold_stage1=T1, threshold_stage2=T2, config=EvalConfig(patient_rule="top_k_mean", k=3))
    assert pt1["disease_score"].iloc[0] == pytest.approx(.8) and pt1["predicted"].iloc[0] == "pe"


def test_patient_with_no_positive_slice_and_counts_add_up_per_patient() -> None:
    only = pd.DataFrame(_slices("A", "x", "s", ["wnl"] * 4, [.1, .2, .3, .4], [.9, .9, .9, .9]))
    m = evaluate(only)
    pa = m["patient"]
    assert pa["cascade"]["confusion"]["matrix"] == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert kn(pa["disease"]["specificity"]) == (1, 1)
    assert pa["disease"]["sensitivity"]["value"] is None and pa["pe"]["sensitivity"]["value"] is None
    assert m["summary"]["patient_pe_sensitivity"] is None and m["summary"]["patient_wnl_sensitivity"] == 1.0
    full = evaluate()
    assert np.sum(full["patient"]["cascade"]["confusion"]["matrix"]) == full["summary"]["patients"] == 4


@pytest.mark.parametrize("rule", ["any", "k_consecutive", "top_k_mean"])
def test_decisions_need_no_truth_and_are_the_evaluations(rule: str) -> None:
    config = EvalConfig(patient_rule=rule, k=2)
    unlabelled = cohort().drop(columns=["label"])
    decided = patient_decisions(unlabelled, threshold_stage1=T1, threshold_stage2=T2, config=config)
    evaluated = patient_predictions(cohort(), threshold_stage1=T1, threshold_stage2=T2, config=config)
    pd.testing.assert_frame_equal(decided, evaluated[list(decided.columns)])
    assert list(evaluated.columns) == ["site", "patient_id", "truth", *decided.columns[2:], "wnl_slices", "wnl_slices_correct"]
    with pytest.raises(ValueError, match="lack column"):
        patient_predictions(unlabelled, threshold_stage1=T1, threshold_stage2=T2, config=config)


@pytest.mark.parametrize("rule", ["any", "k_consecutive", "top_k_mean"])
def test_a_pe_positive_patient_is_always_disease_positive(rule: str) -> None:
    pt = patient_predictions(cohort(), threshold_stage1=T1, threshold_stage2=T2, config=EvalConfig(patient_rule=rule, k=2))
    assert not (pt["pe_positive"] & ~pt["disease_positive"]).any()


# ----------------------------------------------------------------------------- whole evaluation

def test_summary_has_exactly_the_gate_keys() -> None:
    m = evaluate()
    assert tuple(m["summary"]) == SUMMARY_KEYS
    assert set(m["summary"]) == {
        "slice_stage1_accuracy", "slice_disease_sensitivity", "slice_wnl_sensitivity", "slice_stage1_auroc",
        "slice_stage1_auroc_ci_low", "slice_stage2_accuracy", "slice_pe_sensitivity", "slice_pe_specificity",
        "slice_stage2_auroc", "slice_stage2_auroc_ci_low", "slice_cascade_accuracy",
        "patient_accuracy", "patient_disease_sensitivity", "patient_wnl_sensitivity", "patient_pe_sensitivity",
        "patient_pe_specificity", "patient_cascade_accuracy", "slices", "patients"}
    s = m["summary"]
    assert s["slice_stage1_accuracy"] == pytest.approx(11 / 14) and s["slice_pe_sensitivity"] == pytest.approx(2 / 3)
    assert s["patient_accuracy"] == pytest.approx(3 / 4) and s["patient_pe_sensitivity"] == 1.0
    assert s["slices"] == 14 and s["patients"] == 4
    # b1's other slice at p_pe .6 is called PE, and flags b1 (with a2 and b2, the non-PE patients)
    assert s["slice_pe_specificity"] == pytest.approx(2 / 3) and s["patient_pe_specificity"] == pytest.approx(2 / 3)
    assert s["slice_stage1_auroc_ci_low"] == m["slice"]["stage1"]["auroc"]["ci"][0]
    assert s["slice_stage2_auroc_ci_low"] == m["slice"]["stage2"]["auroc"]["ci"][0]
    assert set(m) == {"schema_version", "thresholds", "config", "counts", "summary", "slice", "patient", "per_site", "curves"}
    assert m["counts"] == {"slices": {"wnl": 8, "other": 3, "pe": 3, "indeterminate": 0},
                           "patients": {"wnl": 2, "other": 1, "pe": 1, "indeterminate": 0},
                           "series": 5, "sites": 2}
    json.dumps(m, allow_nan=False)


def test_per_site_breakdown_adds_up() -> None:
    m = evaluate()
    assert list(m["per_site"]) == ["A", "B"]
    a, b = m["per_site"]["A"], m["per_site"]["B"]
    assert a["slice"]["stage1"]["confusion"]["matrix"] == [[4, 1], [1, 2]]
    assert b["slice"]["stage1"]["confusion"]["matrix"] == [[3, 0], [1, 2]]
    assert np.array_equal(np.add(a["slice"]["cascade"]["confusion"]["matrix"], b["slice"]["cascade"]["confusion"]["matrix"]),
                          m["slice"]["cascade"]["confusion"]["matrix"])
    assert a["summary"]["patients"] + b["summary"]["patients"] == 4
    assert tuple(a["summary"]) == SUMMARY_KEYS
    assert b["slice"]["stage2"]["n"] == 3 and b["slice"]["stage2"]["sensitivity"]["value"] is None  # site B: no PE


def test_empty_classes_give_none_not_errors() -> None:
    wnl_only = pd.DataFrame(_slices("A", "x", "s", ["wnl"] * 3, [.1, .7, .2], [.2, .2, .2])
                            + _slices("A", "y", "t", ["wnl"] * 2, [.1, .2], [.6, .2]))
    m = evaluate(wnl_only)
    s = m["summary"]
    assert s["slice_disease_sensitivity"] is None and s["slice_stage1_auroc"] is None
    assert s["slice_stage2_accuracy"] is None and s["slice_stage2_auroc"] is None and s["slice_pe_sensitivity"] is None
    assert s["slice_wnl_sensitivity"] == pytest.approx(4 / 5) and s["slice_stage1_auroc_ci_low"] is None
    assert m["slice"]["stage2"]["auroc"]["ci"] is None and m["curves"] == {"stage1": None, "stage2": None}
    json.dumps(m, allow_nan=False)
    empty = evaluate(pd.DataFrame(columns=["site", "patient_id", "series_uid", "slice_index", "label", "p_disease", "p_pe"]))
    assert empty["summary"]["slices"] == 0 and empty["summary"]["patient_accuracy"] is None and empty["per_site"] == {}


def with_indeterminate() -> pd.DataFrame:
    """The cohort plus an indeterminate slice of a1 that scores highest on both stages, and c1, a
    patient whose only finding (two slices) is indeterminate."""
    extra = (_slices("A", "a1", "a1s", ["wnl"] * 5 + ["indeterminate"], [0] * 5 + [.95], [0] * 5 + [.95])[5:]
             + _slices("B", "c1", "c1s", ["indeterminate"] * 2, [.8, .3], [.7, .1]))
    return pd.concat([cohort(), pd.DataFrame(extra)], ignore_index=True)


def test_indeterminate_slices_are_counted_left_out_of_the_tables_and_feed_the_decision() -> None:
    base, m = evaluate(), evaluate(with_indeterminate())
    assert m["config"]["indeterminate"] == "exclude"
    assert m["counts"]["slices"] == {"wnl": 8, "other": 3, "pe": 3, "indeterminate": 3}
    assert m["counts"]["patients"] == {"wnl": 2, "other": 1, "pe": 1, "indeterminate": 1}
    assert m["per_site"]["B"]["counts"]["slices"]["indeterminate"] == 2
    assert m["per_site"]["B"]["counts"]["patients"]["indeterminate"] == 1
    assert m["slice"] == base["slice"] and m["curves"] == base["curves"]
    assert m["summary"]["slices"] == 14 and m["summary"]["patients"] == 4
    assert m["patient"]["n"] == 4 and sum(b["patients"] for b in m["patient"]["by_class"].values()) == 4
    pt = patient_predictions(with_indeterminate(), threshold_stage1=T1, threshold_stage2=T2, config=EvalConfig())
    by_id = pt.set_index("patient_id")
    # a1's indeterminate slice decides its PE score
    assert by_id.loc["a1", "truth"] == "pe" and by_id.loc["a1", "pe_score"] == pytest.approx(.95)
    assert by_id.loc["c1", "truth"] == "indeterminate" and by_id.loc["c1", "predicted"] == "pe"
    json.dumps(m, allow_nan=False)


def test_indeterminate_slices_can_be_scored_as_a_class() -> None:
    m = evaluate(with_indeterminate(), indeterminate="pe")
    assert m["config"]["indeterminate"] == "pe"
    assert m["slice"]["stage1"]["n"] == 17 and m["slice"]["stage2"]["n"] == 9 and m["slice"]["cascade"]["n"] == 17
    assert kn(m["slice"]["stage2"]["sensitivity"]) == (2 + 2, 3 + 3)  # .95 and .7 reach t2, .1 does not
    assert m["summary"]["slices"] == 17 and m["patient"]["n"] == 4  # c1 stays out of the patient tables
    assert m["counts"]["slices"]["indeterminate"] == 3 and m["counts"]["patients"]["indeterminate"] == 1
    as_wnl = evaluate(with_indeterminate(), indeterminate="wnl")
    assert as_wnl["slice"]["stage1"]["confusion"]["matrix"] == [[7 + 1, 1 + 2], [2, 4]]
    with pytest.raises(ConfigError, match="EvalConfig.indeterminate: 'maybe' is not one of"):
        evaluate(with_indeterminate(), indeterminate="maybe")


def test_the_indeterminate_modes_are_exclude_and_the_cascade_classes() -> None:
    assert typing.get_args(IndeterminateMode) == ("exclude", *CLASSES)


def test_decisions_without_labels_ignore_the_indeterminate_mode() -> None:
    unlabelled = with_indeterminate().drop(columns=["label"])
    decided = patient_decisions(unlabelled, threshold_stage1=T1, threshold_stage2=T2, config=EvalConfig(indeterminate="pe"))
    assert list(decided["patient_id"]) == ["a1", "a2", "b1", "b2", "c1"]
    pd.testing.assert_frame_equal(decided, patient_decisions(unlabelled, threshold_stage1=T1, threshold_stage2=T2,
                                                             config=EvalConfig()))


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.assign(label=d["label"].replace("pe", "PE")), "labels"),
    (lambda d: d.assign(p_pe=np.nan), "p_pe"),
    (lambda d: d.drop(columns="series_uid"), "series_uid"),
])
def test_bad_input_is_rejected(change, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        evaluate(change(cohort()))
    with pytest.raises(ValueError, match="rule"):
        evaluate(patient_rule="majority")


def test_leave_one_site_out_summary() -> None:
    pred = cohort()
    folds = {site: evaluate(pred[pred["site"] == site]) for site in ("B", "A")}
    loso = leave_one_site_out_summary(folds)
    assert list(loso["folds"]) == ["A", "B"]
    assert loso["folds"]["A"]["slice_stage1_accuracy"] == pytest.approx(6 / 8)
    assert loso["mean"]["slice_stage1_accuracy"] == pytest.approx((6 / 8 + 5 / 6) / 2)
    assert loso["std"]["slice_stage1_accuracy"] == pytest.approx(np.std([6 / 8, 5 / 6], ddof=1))
    assert loso["mean"]["slice_pe_sensitivity"] == pytest.approx(2 / 3)  # site B has no PE slice: left out
    assert loso["std"]["slice_pe_sensitivity"] is None
    assert loso["total"] == {"slices": 14, "patients": 4}
    json.dumps(loso, allow_nan=False)


def test_bootstrap_is_fast_enough_for_thousands_of_slices() -> None:
    import time

    rng = np.random.default_rng(0)
    y = rng.random(3000) < 0.2
    start = time.perf_counter()
    bootstrap_ranking(y, rng.random(3000) + y, np.arange(3000) // 60, resamples=1000, confidence=0.95, seed=0)
    assert time.perf_counter() - start < 5.0  # about 0.2 s on a 2-core CPU; a per-resample loop is far slower


def _fold_folder(root: Path, site: str, metrics: dict, **test_data: str) -> str:
    folder = root / f"eval-{site}"
    folder.mkdir()
    data = {"fold": site, "split": "test", "windows_digest": "w1", "splits_digest": "s1", **test_data}
    (folder / "metrics.json").write_text(json.dumps({**metrics, "test_data": data}))
    return str(folder)


def test_summarize_site_folds_writes_the_table_and_refuses_unlike_folds(tmp_path: Path) -> None:
    pred = cohort()
    a, b = (evaluate(pred[pred["site"] == s]) for s in ("A", "B"))
    folders = [_fold_folder(tmp_path, "A", a), _fold_folder(tmp_path, "B", b)]
    assert main(["summarize-folds", *folders, "--out", str(tmp_path / "loso")]) == 0
    written = json.loads((tmp_path / "loso" / "leave_one_site_out.json").read_text())
    assert written["mean"]["slice_stage1_accuracy"] == pytest.approx((6 / 8 + 5 / 6) / 2)
    assert written["evaluations"]["B"]["path"].endswith("eval-B/metrics.json")
    md = (tmp_path / "loso" / "leave_one_site_out.md").read_text()
    assert "| A | 8 | 2 |" in md and "Mean ± SD" in md
    assert "<table" in (tmp_path / "loso" / "leave_one_site_out.html").read_text()

    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(EvaluationError, match="folds differ in splits_digest"):
        summarize_site_folds([folders[0], _fold_folder(other, "B", b, splits_digest="s2")], str(tmp_path / "x"))
    with pytest.raises(EvaluationError, match="fold 'A' appears twice"):
        summarize_site_folds([folders[0], folders[0]], str(tmp_path / "x"))
    with pytest.raises(EvaluationError, match="not a site fold"):
        summarize_site_folds([folders[0], _fold_folder(other, "default", b)], str(tmp_path / "x"))
    with pytest.raises(EvaluationError, match="at least two site folds"):
        summarize_site_folds([folders[0]], str(tmp_path / "x"))
    with pytest.raises(EvaluationError, match="no metrics.json"):
        summarize_site_folds([folders[0], str(tmp_path)], str(tmp_path / "x"))

"""Per-slice, per-patient, cascade and per-site metrics of the two-stage triage.

Input: one row per slice with ``site``, ``patient_id``, ``series_uid``, ``slice_index``, ``label``
(``wnl`` | ``other`` | ``pe`` | ``indeterminate``), ``p_disease`` (stage 1) and ``p_pe`` (stage 2,
computed for every slice so the cascade can be formed). A slice is positive when ``p >= threshold``.

Definitions (the study's, made explicit):

* **indeterminate slices** (``EvalConfig.indeterminate``): left out of every slice table and curve
  (``exclude``, the default: nobody can say what the model should have answered), or scored as the
  class named (``wnl`` / ``other`` / ``pe``: a sensitivity analysis). Either way they are counted,
  and every slice, indeterminate ones included, feeds its patient's decision.
* **stage 1, per slice**: every slice; disease (other or PE) vs WNL.
* **stage 2, per slice**: only slices whose *true* label is disease; PE vs other (the study reports
  stage 2 on disease slices, i.e. as if stage 1 were perfect).
* **cascade, per slice**: predicted ``wnl`` if ``p_disease < t1``, else ``pe`` if ``p_pe >= t2``,
  else ``other``; a 3x3 confusion (true x predicted) over every slice: what the triage delivers.
* **patient truth**: ``pe`` if any PE slice, else ``other`` if any other-disease slice, else
  ``indeterminate`` if any indeterminate slice, else ``wnl`` (``schema.patient_class``). Patients
  whose truth is indeterminate are counted and left out of the patient tables, whatever the mode.
* **patient rule** (``EvalConfig.patient_rule``) turns slice scores into one patient score, and the
  patient is positive when that score reaches the threshold:

  - ``any`` (the study): the highest slice score (positive iff any slice is positive);
  - ``k_consecutive``: the best run of ``k`` adjacent slices (in ``slice_index`` order within one
    series) scored by its lowest slice (positive iff ``k`` consecutive slices are positive; a
    series shorter than ``k`` never is);
  - ``top_k_mean``: the mean of the ``k`` highest slice scores (all of them when fewer).

  Disease-positive: the rule over ``p_disease`` with ``t1``. PE-positive: the rule over ``p_pe``
  restricted to stage-1-positive slices (a stage-1-negative slice never reaches stage 2 and breaks a
  run), with ``t2``, and only for disease-positive patients (implied for ``any`` and
  ``k_consecutive``; for ``top_k_mean`` it keeps the cascade's order). Predicted class: pe > other > wnl.

Every proportion is ``{"value", "k", "n", "ci"}`` (Wilson interval; ``value``/``ci`` None when
``n == 0``). AUROC (Mann-Whitney, ties count half) and AUPRC (step-wise average precision) come with
a percentile bootstrap CI over patients (slices of a patient move together; resamples lacking a class
are skipped; None when a class is absent).

``evaluate_predictions`` returns (the layout of ``metrics.json``)::

    schema_version, thresholds{stage1, stage2}, config{patient_rule, k, bootstrap, confidence, seed, indeterminate},
    counts{slices{wnl, other, pe, indeterminate}, patients{wnl, other, pe, indeterminate}, series, sites},
                                                # as labelled, before the indeterminate mode applies
    summary{SUMMARY_KEYS},                      # flat numbers: what promotion gates read
    slice{stage1, stage2: BINARY, cascade: CASCADE},
    patient{rule{name, k}, n, disease: BINARY, pe: BINARY, cascade: CASCADE,
            wnl_slice_sensitivity: PROP, by_class{wnl, other, pe: {patients, disease_positive,
            pe_positive, correct, wnl_slice_sensitivity}}},
    per_site{site: {counts, summary, slice, patient}},
    curves{stage1, stage2: {roc{fpr, tpr, threshold}, pr{recall, precision, threshold}}}   # per slice

    BINARY  = {classes[neg, pos], n, threshold, accuracy, sensitivity, specificity, ppv, npv,
               class_sensitivity{neg, pos}, confusion{labels, matrix[[tn, fp], [fn, tp]]},
               auroc, auprc: {value, ci, n_pos, n_neg, resamples}}
    CASCADE = {labels[wnl, other, pe], n, accuracy, class_sensitivity{..}, class_ppv{..},
               confusion{labels, matrix (rows true, columns predicted)}}

Summary keys: ``slice_*`` from the slice tables; ``patient_accuracy`` / ``patient_disease_sensitivity``
/ ``patient_wnl_sensitivity`` from ``patient.disease``; ``patient_pe_sensitivity`` / ``patient_pe_specificity``
from ``patient.pe`` (the cascade flags the PE patient / leaves a non-PE patient unflagged);
``*_cascade_accuracy`` from the three-class tables; ``slice_stage*_auroc_ci_low`` the lower end of the
AUROC's bootstrap interval (None without one), what the discrimination gates judge; ``slices`` and
``patients`` the slices and patients the slice and patient tables score.
"""

from __future__ import annotations

import math
import typing
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from pe_triage.config import EvalConfig, PatientRule
from pe_triage.schema import P_DISEASE, P_PE, PREDICTION_COLUMNS, STAGES, Label, patient_class
from pe_triage.stats import bootstrap_ranking

SCHEMA_VERSION = 1
#: the cascade's classes, in the order of its tables
CLASSES = (Label.WNL.value, Label.OTHER.value, Label.PE.value)
_WNL, _OTHER, _PE = CLASSES
INDETERMINATE = Label.INDETERMINATE.value
#: every label a prediction row may carry
LABELS = (*CLASSES, INDETERMINATE)
#: the patient rules (``EvalConfig.patient_rule``), for code that takes a rule from elsewhere (a stored model)
RULES: tuple[PatientRule, ...] = typing.get_args(PatientRule)
SUMMARY_KEYS = (
    "slice_stage1_accuracy", "slice_disease_sensitivity", "slice_wnl_sensitivity", "slice_stage1_auroc",
    "slice_stage1_auroc_ci_low", "slice_stage2_accuracy", "slice_pe_sensitivity", "slice_pe_specificity",
    "slice_stage2_auroc", "slice_stage2_auroc_ci_low", "slice_cascade_accuracy",
    "patient_accuracy", "patient_disease_sensitivity", "patient_wnl_sensitivity", "patient_pe_sensitivity",
    "patient_pe_specificity", "patient_cascade_accuracy", "slices", "patients",
)
#: the summary values that are rates (the rest are counts)
RATE_KEYS = tuple(k for k in SUMMARY_KEYS if k not in ("slices", "patients"))
MAX_CURVE_POINTS = 200


# ----------------------------------------------------------------------------- proportions

def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval: stays inside [0, 1] and is not degenerate at 0/n or n/n (a bare 100%
    on a small test set misleads)."""
    if n == 0:
        return None
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """``{"value", "k", "n", "ci"}``; value and ci are None for an empty denominator."""
    ci = wilson_interval(int(k), int(n), confidence)
    return {"value": k / n if n else None, "k": int(k), "n": int(n), "ci": list(ci) if ci else None}


def format_proportion(p: dict[str, Any], *, ci: bool = False, digits: int = 1) -> str:
    """The study's format, ``96.8% (525/542)``; ``— (0/0)`` when undefined; ``ci=True`` appends the
    interval in percent, ``[94.9–98.0]``."""
    if p["n"] == 0 or p["value"] is None:
        return f"— ({p['k']}/{p['n']})"
    text = f"{100 * p['value']:.{digits}f}% ({p['k']}/{p['n']})"
    if ci and p.get("ci"):
        lo, hi = p["ci"]
        text += f" [{100 * lo:.{digits}f}–{100 * hi:.{digits}f}]"
    return text


# ----------------------------------------------------------------------------- curves

def _downsample(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).round().astype(int)) if n > MAX_CURVE_POINTS else np.arange(n)


def curves(y: np.ndarray, score: np.ndarray) -> dict[str, dict[str, list[float]]] | None:
    """ROC and precision-recall points (one per distinct threshold, at most ``MAX_CURVE_POINTS``,
    end points kept) for plots; None when a class is absent."""
    y, score = np.asarray(y, bool), np.asarray(score, float)
    if y.all() or not y.any():
        return None
    order = np.argsort(-score, kind="stable")
    s, ys = score[order], y[order]
    last = np.append(s[1:] != s[:-1], True)  # the end of each tie group
    tp, fp = np.cumsum(ys)[last], np.cumsum(~ys)[last]
    thr = s[last]
    fpr, tpr = np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]
    recall, precision = np.r_[0.0, tp / tp[-1]], np.r_[1.0, tp / (tp + fp)]
    thr = np.r_[np.inf, thr]
    keep = _downsample(fpr.size)

    def r(a: np.ndarray) -> list[float]:
        return [round(float(v), 5) if np.isfinite(v) else None for v in a[keep]]  # type: ignore[misc]

    return {"roc": {"fpr": r(fpr), "tpr": r(tpr), "threshold": r(thr)},
            "pr": {"recall": r(recall), "precision": r(precision), "threshold": r(thr)}}


# ----------------------------------------------------------------------------- tables

def _binary_table(truth: np.ndarray, predicted: np.ndarray, score: np.ndarray, groups: np.ndarray, *,
                  classes: tuple[str, str], threshold: float, config: EvalConfig) -> dict[str, Any]:
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    tp = int((truth & predicted).sum())
    fn = int((truth & ~predicted).sum())
    fp = int((~truth & predicted).sum())
    tn = int((~truth & ~predicted).sum())
    c = config.confidence
    sens, spec = proportion(tp, tp + fn, c), proportion(tn, tn + fp, c)
    neg, pos = classes
    return {
        "classes": [neg, pos], "n": int(truth.size), "threshold": float(threshold),
        "accuracy": proportion(tp + tn, truth.size, c), "sensitivity": sens, "specificity": spec,
        "ppv": proportion(tp, tp + fp, c), "npv": proportion(tn, tn + fn, c),
        "class_sensitivity": {neg: spec, pos: sens},
        "confusion": {"labels": [neg, pos], "matrix": [[tn, fp], [fn, tp]]},
        **bootstrap_ranking(truth, score, groups, resamples=config.bootstrap, confidence=c, seed=config.seed),
    }


def _cascade_table(truth: np.ndarray, predicted: np.ndarray, confidence: float) -> dict[str, Any]:
    t = pd.Categorical(truth, categories=CLASSES).codes
    p = pd.Categorical(predicted, categories=CLASSES).codes
    matrix = np.bincount(t * 3 + p, minlength=9).reshape(3, 3) if t.size else np.zeros((3, 3), int)
    diag = np.diag(matrix)
    return {
        "labels": list(CLASSES), "n": int(matrix.sum()),
        "accuracy": proportion(int(diag.sum()), int(matrix.sum()), confidence),
        "class_sensitivity": {c: proportion(int(diag[i]), int(matrix[i].sum()), confidence) for i, c in enumerate(CLASSES)},
        "class_ppv": {c: proportion(int(diag[i]), int(matrix[:, i].sum()), confidence) for i, c in enumerate(CLASSES)},
        "confusion": {"labels": list(CLASSES), "matrix": matrix.tolist()},
    }


def cascade_labels(p_disease: np.ndarray, p_pe: np.ndarray, threshold_stage1: float, threshold_stage2: float) -> np.ndarray:
    """Per-slice cascade class: wnl below t1, else pe at or above t2, else other."""
    p_disease, p_pe = np.asarray(p_disease, float), np.asarray(p_pe, float)
    return np.where(p_disease < threshold_stage1, _WNL, np.where(p_pe >= threshold_stage2, _PE, _OTHER))


# ----------------------------------------------------------------------------- patient rules

def _rule_scores(score: np.ndarray, patient: np.ndarray, series: np.ndarray, n_patients: int, *, rule: PatientRule,
                 k: int) -> np.ndarray:
    """One score per patient (``-inf`` when the rule finds nothing); slices sorted by patient, series
    and slice_index, ``-inf`` marks a slice that cannot count (and breaks a run)."""
    out = np.full(n_patients, -np.inf)
    if score.size == 0:
        return out
    if rule == "any":
        np.maximum.at(out, patient, score)
    elif rule == "k_consecutive":
        if score.size >= k:
            runs = sliding_window_view(score, k).min(1)
            same = series[: score.size - k + 1] == series[k - 1:]  # sorted: both ends in a series => all
            np.maximum.at(out, patient[: score.size - k + 1][same], runs[same])
    elif rule == "top_k_mean":
        order = np.lexsort((-score, patient))
        s, p = score[order], patient[order]
        first = np.searchsorted(p, p)  # index of the patient's first (highest) slice
        keep = (np.arange(s.size) - first < k) & np.isfinite(s)
        total = np.bincount(p[keep], s[keep], minlength=n_patients)
        n = np.bincount(p[keep], minlength=n_patients)
        np.divide(total, n, out=out, where=n > 0)
    else:
        typing.assert_never(rule)
    return out


def _sorted(pred: pd.DataFrame) -> pd.DataFrame:
    return pred.sort_values(["site", "patient_id", "series_uid", "slice_index"], kind="stable").reset_index(drop=True)


def _run_codes(s: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """0, 1, 2, ... per run of equal ``keys`` in a sorted frame (a patient, or a series of one)."""
    if s.empty:
        return np.zeros(0, int)
    change = np.zeros(len(s), bool)
    for key in keys:
        v = s[key].to_numpy(object)
        change[1:] |= v[1:] != v[:-1]
    return np.cumsum(change)


def _validate(pred: pd.DataFrame, config: EvalConfig, *, labelled: bool = True) -> None:
    missing = [c for c in PREDICTION_COLUMNS if c not in pred.columns and (labelled or c != "label")]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}")
    if labelled:
        bad = sorted(set(pred["label"].dropna().unique()) - set(LABELS)) + (["<null>"] if pred["label"].isna().any() else [])
        if bad:
            raise ValueError(f"labels must be one of {list(LABELS)}, found {bad}")
    for col in (P_DISEASE, P_PE):
        v = pred[col].to_numpy(float)
        if not np.all((v >= 0) & (v <= 1)):
            raise ValueError(f"{col} must be probabilities in [0, 1] (NaN is not allowed)")
    if config.k < 1:
        raise ValueError(f"k must be >= 1, got {config.k}")


def _decisions(s: pd.DataFrame, t1: float, t2: float, config: EvalConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """The per-patient decisions of a ``_sorted`` frame and each slice's patient code (row of the result)."""
    patient, series = _run_codes(s, ["site", "patient_id"]), _run_codes(s, ["site", "patient_id", "series_uid"])
    n = int(patient.max()) + 1 if patient.size else 0
    p_d, p_pe = s[P_DISEASE].to_numpy(float), s[P_PE].to_numpy(float)
    rule = config.patient_rule
    if rule == "exam":
        raise ValueError('patient rule "exam" is decided by an exam model, not over slice scores: give a slice rule')
    disease_score = _rule_scores(p_d, patient, series, n, rule=rule, k=config.k)
    disease_positive = disease_score >= t1
    gated = np.where(p_d >= t1, p_pe, -np.inf)
    pe_score = np.where(disease_positive, _rule_scores(gated, patient, series, n, rule=rule, k=config.k), -np.inf)
    pe_positive = pe_score >= t2
    first = s.loc[np.r_[True, patient[1:] != patient[:-1]] if n else [], ["site", "patient_id"]]
    return pd.DataFrame({
        "site": first["site"].to_numpy(object), "patient_id": first["patient_id"].to_numpy(object),
        "disease_score": disease_score, "pe_score": pe_score,
        "disease_positive": disease_positive, "pe_positive": pe_positive,
        "predicted": np.where(pe_positive, _PE, np.where(disease_positive, _OTHER, _WNL)),
        "slices": np.bincount(patient, minlength=n),
    }), patient


def patient_decisions(pred: pd.DataFrame, *, threshold_stage1: float, threshold_stage2: float,
                      config: EvalConfig) -> pd.DataFrame:
    """One row per patient from the probabilities alone (``label`` is not read), for prediction
    where there is no truth: ``site``, ``patient_id``, ``disease_score``, ``pe_score`` (``-inf``:
    nothing the rule can count), ``disease_positive``, ``pe_positive``, ``predicted``, ``slices``."""
    _validate(pred, config, labelled=False)
    return _decisions(_sorted(pred), threshold_stage1, threshold_stage2, config)[0]


def patient_predictions(pred: pd.DataFrame, *, threshold_stage1: float, threshold_stage2: float,
                        config: EvalConfig) -> pd.DataFrame:
    """:func:`patient_decisions` with the truth beside them: ``truth`` (after ``patient_id``; may be
    ``indeterminate``), ``wnl_slices`` and ``wnl_slices_correct`` (stage 1 called them WNL)."""
    _validate(pred, config)
    s = _sorted(pred)
    out, patient = _decisions(s, threshold_stage1, threshold_stage2, config)
    n = len(out)
    label = s["label"].to_numpy(object)
    groups = np.split(label, np.flatnonzero(np.diff(patient)) + 1) if n else []
    out.insert(2, "truth", np.array([patient_class(g) for g in groups], object))
    wnl = label == _WNL
    out["wnl_slices"] = np.bincount(patient, wnl.astype(float), minlength=n).astype(int)
    correct = wnl & (s[P_DISEASE].to_numpy(float) < threshold_stage1)
    out["wnl_slices_correct"] = np.bincount(patient, correct.astype(float), minlength=n).astype(int)
    return out


# ----------------------------------------------------------------------------- evaluation

def _scored(s: pd.DataFrame, config: EvalConfig) -> pd.DataFrame:
    """The slices the slice tables score: indeterminate ones left out, or relabelled (the mode)."""
    indeterminate = s["label"] == INDETERMINATE
    if config.indeterminate == "exclude":
        return s[~indeterminate]
    return s.assign(label=s["label"].mask(indeterminate, config.indeterminate))


def _slice_tables(s: pd.DataFrame, t1: float, t2: float, config: EvalConfig) -> dict[str, Any]:
    one, two = STAGES[1], STAGES[2]
    label = s["label"].to_numpy(object)
    p_d, p_pe = s[one.column].to_numpy(float), s[two.column].to_numpy(float)
    groups = (s["site"].astype(str) + "\x00" + s["patient_id"].astype(str)).to_numpy(object)
    disease = np.isin(label, one.positive_labels)
    return {
        one.name: _binary_table(disease, p_d >= t1, p_d, groups, classes=(one.negative_name, one.positive_name), threshold=t1,
                                config=config),
        two.name: _binary_table(np.isin(label[disease], two.positive_labels), p_pe[disease] >= t2, p_pe[disease],
                                groups[disease], classes=(two.negative_name, two.positive_name), threshold=t2, config=config),
        "cascade": _cascade_table(label, cascade_labels(p_d, p_pe, t1, t2), config.confidence),
    }


def _patient_tables(pt: pd.DataFrame, t1: float, t2: float, config: EvalConfig) -> dict[str, Any]:
    one, two = STAGES[1], STAGES[2]
    truth = pt["truth"].to_numpy(object)
    ids = np.arange(len(pt))
    c = config.confidence
    wnl_patients = pt[truth == _WNL]
    by_class = {}
    for cls in CLASSES:
        g = pt[truth == cls]
        by_class[cls] = {
            "patients": len(g),
            "disease_positive": proportion(int(g["disease_positive"].sum()), len(g), c),
            "pe_positive": proportion(int(g["pe_positive"].sum()), len(g), c),
            "correct": proportion(int((g["predicted"] == cls).sum()), len(g), c),
            "wnl_slice_sensitivity": proportion(int(g["wnl_slices_correct"].sum()), int(g["wnl_slices"].sum()), c),
        }
    return {
        "rule": {"name": config.patient_rule, "k": None if config.patient_rule == "any" else config.k},
        "n": len(pt),
        "disease": _binary_table(np.isin(truth, one.positive_labels), pt["disease_positive"].to_numpy(bool),
                                 pt["disease_score"].to_numpy(float), ids, classes=(one.negative_name, one.positive_name),
                                 threshold=t1, config=config),
        # every patient without PE is a negative here, other disease and WNL alike
        "pe": _binary_table(np.isin(truth, two.positive_labels), pt["pe_positive"].to_numpy(bool), pt["pe_score"].to_numpy(float),
                            ids, classes=("no_pe", two.positive_name), threshold=t2, config=config),
        "cascade": _cascade_table(truth, pt["predicted"].to_numpy(object), c),
        # the study's "WNL per-slice sensitivity" column: WNL slices of WNL patients that stage 1 kept WNL
        "wnl_slice_sensitivity": proportion(int(wnl_patients["wnl_slices_correct"].sum()),
                                            int(wnl_patients["wnl_slices"].sum()), c),
        "by_class": by_class,
    }


def _summary(sl: dict[str, Any], pa: dict[str, Any], slices: int, patients: int) -> dict[str, Any]:
    return {
        "slice_stage1_accuracy": sl["stage1"]["accuracy"]["value"],
        "slice_disease_sensitivity": sl["stage1"]["sensitivity"]["value"],
        "slice_wnl_sensitivity": sl["stage1"]["specificity"]["value"],
        "slice_stage1_auroc": sl["stage1"]["auroc"]["value"],
        "slice_stage1_auroc_ci_low": (sl["stage1"]["auroc"]["ci"] or [None])[0],
        "slice_stage2_accuracy": sl["stage2"]["accuracy"]["value"],
        "slice_pe_sensitivity": sl["stage2"]["sensitivity"]["value"],
        "slice_pe_specificity": sl["stage2"]["specificity"]["value"],
        "slice_stage2_auroc": sl["stage2"]["auroc"]["value"],
        "slice_stage2_auroc_ci_low": (sl["stage2"]["auroc"]["ci"] or [None])[0],
        "slice_cascade_accuracy": sl["cascade"]["accuracy"]["value"],
        "patient_accuracy": pa["disease"]["accuracy"]["value"],
        "patient_disease_sensitivity": pa["disease"]["sensitivity"]["value"],
        "patient_wnl_sensitivity": pa["disease"]["specificity"]["value"],
        "patient_pe_sensitivity": pa["pe"]["sensitivity"]["value"],
        "patient_pe_specificity": pa["pe"]["specificity"]["value"],
        "patient_cascade_accuracy": pa["cascade"]["accuracy"]["value"],
        "slices": int(slices), "patients": int(patients),
    }


def _counts(s: pd.DataFrame, pt: pd.DataFrame) -> dict[str, Any]:
    return {
        "slices": {c: int((s["label"] == c).sum()) for c in LABELS},
        "patients": {c: int((pt["truth"] == c).sum()) for c in LABELS},
        "series": int(s[["site", "patient_id", "series_uid"]].drop_duplicates().shape[0]),
        "sites": int(s["site"].nunique()),
    }


def _evaluate_subset(s: pd.DataFrame, pt: pd.DataFrame, t1: float, t2: float, config: EvalConfig) -> dict[str, Any]:
    scored, scored_pt = _scored(s, config), pt[pt["truth"] != INDETERMINATE]
    sl = _slice_tables(scored, t1, t2, config)
    pa = _patient_tables(scored_pt, t1, t2, config)
    return {"counts": _counts(s, pt), "summary": _summary(sl, pa, len(scored), len(scored_pt)), "slice": sl, "patient": pa}


def evaluate_predictions(pred: pd.DataFrame, *, threshold_stage1: float, threshold_stage2: float,
                         config: EvalConfig) -> dict[str, Any]:
    """Every table of the evaluation, overall and per site, as a JSON-serialisable dict (layout in
    the module docstring)."""
    t1, t2 = float(threshold_stage1), float(threshold_stage2)
    pt = patient_predictions(pred, threshold_stage1=t1, threshold_stage2=t2, config=config)
    s = _sorted(pred)
    out = _evaluate_subset(s, pt, t1, t2, config)
    scored = _scored(s, config)
    label = scored["label"].to_numpy(object)
    one, two = STAGES[1], STAGES[2]
    disease = np.isin(label, one.positive_labels)
    return {
        "schema_version": SCHEMA_VERSION,
        "thresholds": {"stage1": t1, "stage2": t2},
        "config": {"patient_rule": config.patient_rule, "k": config.k, "bootstrap": config.bootstrap,
                   "confidence": config.confidence, "seed": config.seed, "indeterminate": config.indeterminate},
        **out,
        "per_site": {str(site): _evaluate_subset(s[s["site"] == site], pt[pt["site"] == site], t1, t2, config)
                     for site in sorted(s["site"].unique(), key=str)},
        "curves": {one.name: curves(disease, scored[one.column].to_numpy(float)),
                   two.name: curves(np.isin(label[disease], two.positive_labels), scored[two.column].to_numpy(float)[disease])},
    }


def leave_one_site_out_summary(per_fold: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Site folds (fold name = held-out site, value = ``evaluate_predictions`` on its test data) as one
    table: each fold's summary, plus the mean and sample SD over folds of every rate (None values are
    left out) and the total slices and patients."""
    folds = {str(site): dict(m["summary"]) for site, m in sorted(per_fold.items(), key=lambda kv: str(kv[0]))}
    mean: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    for key in RATE_KEYS:
        values = [f[key] for f in folds.values() if f.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
        std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    total = {k: int(sum(f[k] for f in folds.values())) for k in ("slices", "patients")}
    return {"folds": folds, "mean": mean, "std": std, "total": total, "keys": list(RATE_KEYS)}

"""The operating point: the two thresholds the triage runs at, chosen per exam on the validation split.

Each stage's training sets a threshold for 95% of its validation *slices*. The triage flags exams,
though, and the study's rule calls an exam positive when any slice is: with slice-level thresholds
every extra slice is another chance of a false alarm (at 8 slices per exam and 36% slice
specificity, 0-12% of WNL exams stayed WNL; on a 300-slice scan none would), while a PE exam is
caught when any of its clot slices is. So the thresholds are set where the decision is made, on the
validation exams under the evaluation's patient rule: stage 1 keeps ``patient_disease_sensitivity``
of the disease exams, and for each stage 1 threshold from the highest that does down to lower ones,
stage 2 takes the highest threshold that keeps ``patient_pe_sensitivity`` of the PE exams through
the whole cascade (so the two stages' misses do not compound unseen); the pair that leaves the most
exams correctly unflagged wins. Sensitivity cannot rise with a threshold, so each stage 2 threshold
is a binary search over the observed scores.

The calibrated models are copies of the trained ones with the new threshold and a record of how it
was chosen (``operating_point`` in ``model.json``, beside the stage's own ``slice_threshold``): what
is evaluated, registered and deployed is one consistent pair.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from pe_triage import schema as S
from pe_triage.artifact import load_model, rethreshold
from pe_triage.config import Config, EvalConfig, OperatingPointConfig
from pe_triage.evaluation.metrics import patient_decisions, patient_predictions
from pe_triage.evaluation.scoring import EvaluationError, predict_split

log = logging.getLogger(__name__)


#: stage 1 thresholds tried at and below the one that just meets the disease target (quantiles of the
#: scores below it): enough to find the trade-off, few enough to stay in seconds
_STAGE1_TRIES = 40


def _highest(candidates: np.ndarray, ok: Callable[[float], bool]) -> float | None:
    """The highest candidate (sorted ascending) where ``ok`` holds, ``ok`` being true up to some point."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(float(candidates[mid])):
            best, lo = float(candidates[mid]), mid + 1
        else:
            hi = mid - 1
    return best


def choose_thresholds(pred: pd.DataFrame, *, disease_sensitivity: float, pe_sensitivity: float,
                      config: EvalConfig) -> dict[str, Any]:
    """Thresholds ``(stage1, stage2)`` for the patient targets on labelled slice predictions (the
    layout of ``metrics``), and what they reach there: ``{"stage1", "stage2", "achieved": {...}}``."""
    one, two = S.STAGES[1], S.STAGES[2]
    wnl, other = S.Label.WNL.value, S.Label.OTHER.value
    truth = patient_predictions(pred, threshold_stage1=0.5, threshold_stage2=0.5, config=config)["truth"].to_numpy(object)
    disease, pe = np.isin(truth, one.positive_labels), np.isin(truth, two.positive_labels)
    if not pe.any():
        raise EvaluationError("the calibration split has no PE patient: no patient-level operating point can be set")
    c1 = np.unique(np.r_[pred[one.column].to_numpy(float), 0.0])
    c2 = np.unique(np.r_[pred[two.column].to_numpy(float), 0.0])

    def rates(t1: float, t2: float) -> pd.DataFrame:
        return patient_decisions(pred, threshold_stage1=t1, threshold_stage2=t2, config=config)

    def disease_ok(t1: float) -> bool:
        return rates(t1, 0.0)["disease_positive"].to_numpy(bool)[disease].mean() >= disease_sensitivity

    def pe_ok_at(t1: float) -> Callable[[float], bool]:
        return lambda t2: rates(t1, t2)["pe_positive"].to_numpy(bool)[pe].mean() >= pe_sensitivity

    top = _highest(c1, disease_ok) or 0.0
    if not pe_ok_at(top)(0.0):  # stage 1 alone already drops too many PE exams: lower it for them
        top = _highest(c1, lambda t: pe_ok_at(t)(0.0)) or 0.0
    # A stage 1 threshold just at its target leaves stage 2 no room (every PE exam it keeps is needed,
    # so stage 2 must pass them all and flags most other disease as PE): try lower ones too and keep
    # the pair that leaves the most exams correctly unflagged (non-PE not called PE, WNL not called
    # disease), ties to the higher stage 1 threshold.
    below = c1[c1 <= top]
    best: tuple[int, float, float, pd.DataFrame] | None = None
    for t1 in dict.fromkeys([top, *np.quantile(below, np.linspace(1, 0, _STAGE1_TRIES))[1:].tolist()]):
        t2 = _highest(c2, pe_ok_at(float(t1))) or 0.0
        d = rates(float(t1), t2)
        kept = int((~d["pe_positive"].to_numpy(bool))[~pe].sum() + (~d["disease_positive"].to_numpy(bool))[truth == wnl].sum())
        if best is None or kept > best[0]:
            best = (kept, float(t1), t2, d)
    assert best is not None
    _, t1, t2, d = best
    flagged, pe_flagged = d["disease_positive"].to_numpy(bool), d["pe_positive"].to_numpy(bool)
    label, p_disease = pred[S.LABEL].to_numpy(object), pred[one.column].to_numpy(float)

    def share(hit: np.ndarray, where: np.ndarray) -> float | None:
        return float(hit[where].mean()) if where.any() else None

    return {"stage1": t1, "stage2": t2, "achieved": {
        "patient_disease_sensitivity": share(flagged, disease), "patient_wnl_specificity": share(~flagged, truth == wnl),
        "patient_pe_sensitivity": share(pe_flagged, pe),
        "patient_pe_specificity": share(~pe_flagged, np.isin(truth, [wnl, other])),
        "slice_disease_sensitivity": share(p_disease >= t1, np.isin(label, one.positive_labels)),
        "slice_disease_specificity": share(p_disease < t1, np.isin(label, one.negative_labels)),
        "patients": {wnl: int((truth == wnl).sum()), other: int((truth == other).sum()), S.Label.PE.value: int(pe.sum())},
    }}


def calibrate(stage1: str, stage2: str, windows: str, splits: str, out_stage1: str, out_stage2: str, *,
              split: str = "val", fold: str = S.DEFAULT_FOLD, config: Config = Config()) -> dict[str, Any]:
    """Set both stages' thresholds on ``split`` (``operating_point.level`` "patient") or keep each
    stage's own (``"slice"``); write the models with their operating point to ``out_stage*``."""
    op: OperatingPointConfig = config.operating_point
    for name in ("patient_disease_sensitivity", "patient_pe_sensitivity"):
        if not 0 < getattr(op, name) <= 1:
            raise EvaluationError(f"operating_point.{name} {getattr(op, name)}: expected a value in (0, 1]")
    models = {1: load_model(stage1), 2: load_model(stage2)}
    # under rule "exam" the exam model decides at thresholds of its own (``evaluation.exam.calibrate_exam``);
    # the pair still flags slices, and is chosen as under the study's rule
    slice_rule = "any" if config.evaluate.patient_rule == "exam" else config.evaluate.patient_rule
    chosen: dict[str, Any]
    if op.level == "slice":
        chosen = {"stage1": models[1].meta.threshold, "stage2": models[2].meta.threshold, "achieved": None}
    else:
        pred = predict_split(models, windows, splits, split=split, fold=fold, config=config)
        chosen = choose_thresholds(pred, disease_sensitivity=op.patient_disease_sensitivity,
                                   pe_sensitivity=op.patient_pe_sensitivity,
                                   config=replace(config.evaluate, bootstrap=0, patient_rule=slice_rule))
    record = {"level": op.level, "split": split, "fold": fold, "patient_rule": config.evaluate.patient_rule,
              "slice_rule": slice_rule, "k": config.evaluate.k,
              "patient_disease_sensitivity": op.patient_disease_sensitivity, "patient_pe_sensitivity": op.patient_pe_sensitivity,
              "thresholds": {"stage1": chosen["stage1"], "stage2": chosen["stage2"]}, "achieved": chosen["achieved"]}
    for stage, src, dst in ((1, stage1, out_stage1), (2, stage2, out_stage2)):
        rethreshold(src, dst, chosen[f"stage{stage}"], record)
    log.info("operating point (%s, %s split): stage 1 %.4f, stage 2 %.4f; reached %s", op.level, split, chosen["stage1"],
             chosen["stage2"], chosen["achieved"])
    return record

"""The exam model beside the slice rules: per-patient figures of each on the same patients.

Every rule (``metrics.RULES``: any, k_consecutive, top_k_mean) and the exam model get their
operating point the same way, on the calibration split's patients (``operating_point.choose_thresholds``
at the ``operating_point`` targets), and are then measured on the evaluated split: per-patient AUROC
with its patient bootstrap CI, sensitivity and specificity, for disease and for PE. An exam
probability is a one-slice patient to the metrics (``exam_frame``), so the exam model's cascade
(PE only for a disease-flagged exam) and its tables are the rules' own code.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pe_triage import schema as S
from pe_triage.artifact import StageModel, load_model
from pe_triage.config import Config, EvalConfig
from pe_triage.evaluation.metrics import RULES, evaluate_predictions
from pe_triage.evaluation.operating_point import choose_thresholds
from pe_triage.evaluation.scoring import EvaluationError
from pe_triage.models.exam import ExamModel, load_exam_model, save_exam_model
from pe_triage.provenance import file_digest
from pe_triage.training.exam import embed_split, exams

#: the row name of the exam model in :func:`compare_rules`
EXAM = "exam_model"
#: the exam model's flat summary keys (``exam_summary``), named as the rules' ``patient_*`` keys of
#: ``metrics.SUMMARY_KEYS`` (``wnl_sensitivity``: WNL patients kept disease-negative)
EXAM_SUMMARY_KEYS = (
    "exam_patient_disease_sensitivity", "exam_patient_wnl_sensitivity", "exam_patient_disease_auroc",
    "exam_patient_disease_auroc_ci_low", "exam_patient_pe_sensitivity", "exam_patient_pe_specificity",
    "exam_patient_pe_auroc", "exam_patient_pe_auroc_ci_low",
)


def exam_frame(keys: list[tuple[str, str]], truth: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Exam probabilities ``[N, 2]`` as a prediction frame of one slice per patient (its truth as label)."""
    site, patient = ([k[i] for k in keys] for i in (0, 1))
    return pd.DataFrame({S.SITE: site, S.PATIENT_ID: patient, S.SERIES_UID: "exam", S.SLICE_INDEX: 0,
                         S.LABEL: truth, S.STAGES[1].column: probs[:, 0].astype(float),
                         S.STAGES[2].column: probs[:, 1].astype(float)})


def _row(calibration: pd.DataFrame, evaluated: pd.DataFrame, ec: EvalConfig, config: Config) -> dict[str, Any]:
    op = config.operating_point
    chosen = choose_thresholds(calibration, disease_sensitivity=op.patient_disease_sensitivity,
                               pe_sensitivity=op.patient_pe_sensitivity, config=ec)
    patient = evaluate_predictions(evaluated, threshold_stage1=chosen["stage1"], threshold_stage2=chosen["stage2"],
                                   config=ec)["patient"]
    row: dict[str, Any] = {"thresholds": {"stage1": chosen["stage1"], "stage2": chosen["stage2"]}, "patients": patient["n"]}
    for target in ("disease", "pe"):
        t = patient[target]
        row[target] = {"auroc": t["auroc"]["value"], "auroc_ci": t["auroc"]["ci"],
                       "sensitivity": t["sensitivity"], "specificity": t["specificity"]}
    return row


def compare_rules(slices: dict[str, pd.DataFrame], exam: dict[str, pd.DataFrame], *, config: Config = Config(),
                  calibration: str = "val", evaluated: str = "test") -> dict[str, dict[str, Any]]:
    """A row per slice rule and one for the exam model: thresholds chosen on ``calibration``, figures
    on ``evaluated``. ``slices``/``exam`` map split names to slice predictions / :func:`exam_frame`s."""
    rows: dict[str, dict[str, Any]] = {}
    for rule in RULES:
        ec = replace(config.evaluate, patient_rule=rule)
        rows[rule] = {"k": None if rule == "any" else ec.k, **_row(slices[calibration], slices[evaluated], ec, config)}
    rows[EXAM] = {"k": None, **_row(exam[calibration], exam[evaluated], replace(config.evaluate, patient_rule="any"), config)}
    return rows


def exam_summary(row: dict[str, Any]) -> dict[str, float | None]:
    """The exam model's row of :func:`compare_rules` as flat numbers (:data:`EXAM_SUMMARY_KEYS`), what
    the promotion gates and MLflow read beside the rules' summary."""
    out: dict[str, float | None] = {}
    for target, negative in (("disease", "wnl_sensitivity"), ("pe", "pe_specificity")):
        t = row[target]
        out[f"exam_patient_{target}_sensitivity"] = t["sensitivity"]["value"]
        out[f"exam_patient_{negative}"] = t["specificity"]["value"]
        out[f"exam_patient_{target}_auroc"] = t["auroc"]
        out[f"exam_patient_{target}_auroc_ci_low"] = (t["auroc_ci"] or [None])[0]
    return {k: out[k] for k in EXAM_SUMMARY_KEYS}


def check_pair(exam_model: ExamModel, stage1: str, stage2: str) -> None:
    """The exam model reads the features of the stage models it was trained on, and no others."""
    for n, path in ((1, stage1), (2, stage2)):
        want = exam_model.meta.get("stages", {}).get(str(n), {})
        if want.get("weights") != file_digest(Path(path) / "model.pt"):
            raise EvaluationError(f"the exam model was trained on another stage {n} model than {path}")


def score_split(models: dict[int, StageModel], exam_model: ExamModel, windows: str, splits: str, *, split: str,
                config: Config, fold: str = S.DEFAULT_FOLD) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(slice predictions, exam frame) of every patient of ``split``, from one embedding pass."""
    pred, x = embed_split(models, windows, splits, split=split, fold=fold, features=exam_model.meta["features"],
                          config=config)
    data = exams(pred, x)
    return pred, exam_frame(data.keys, data.truth, exam_model.predict_proba(data.sequences))


def evaluate_exam(stage1: str, stage2: str, exam_path: str, windows: str, splits: str, *, split: str = "test",
                  calibration: str = "val", fold: str = S.DEFAULT_FOLD,
                  config: Config = Config()) -> dict[str, dict[str, Any]]:
    """:func:`compare_rules` for stored models: the exam model and the rules on the same patients."""
    models, exam_model = {1: load_model(stage1), 2: load_model(stage2)}, load_exam_model(exam_path)
    check_pair(exam_model, stage1, stage2)
    scored = {s: score_split(models, exam_model, windows, splits, split=s, config=config, fold=fold)
              for s in (calibration, split)}
    return compare_rules({s: v[0] for s, v in scored.items()}, {s: v[1] for s, v in scored.items()}, config=config,
                         calibration=calibration, evaluated=split)


def calibrate_exam(stage1: str, stage2: str, exam_path: str, windows: str, splits: str, out: str, *,
                   split: str = "val", config: Config = Config()) -> dict[str, float]:
    """Copy the exam model to ``out`` with its two thresholds chosen jointly on ``split``'s exams, as
    ``operating_point.calibrate`` chooses the stages' (the training's are per output)."""
    models, exam_model = {1: load_model(stage1), 2: load_model(stage2)}, load_exam_model(exam_path)
    check_pair(exam_model, stage1, stage2)
    frame = score_split(models, exam_model, windows, splits, split=split, config=config)[1]
    op = config.operating_point
    chosen = choose_thresholds(frame, disease_sensitivity=op.patient_disease_sensitivity,
                               pe_sensitivity=op.patient_pe_sensitivity, config=replace(config.evaluate, patient_rule="any"))
    thresholds = {"disease": chosen["stage1"], "pe": chosen["stage2"]}
    meta = {**exam_model.meta, "thresholds": thresholds, "operating_point": {"split": split, **chosen}}
    save_exam_model(out, exam_model.net, meta)
    return thresholds

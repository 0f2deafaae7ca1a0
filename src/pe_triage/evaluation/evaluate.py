"""The evaluation step: apply both stage models to one split, compute every table, render the report.

Both stages are applied to every slice of the split (stage 2's probability exists for all slices so
the cascade can be formed; its own table uses true disease slices, as the study reports it),
indeterminate slices included: they feed their patient's decision, and the metrics decide what the
slice tables make of them.
Evidence-map overlays (``evaluate.attribution``) are drawn for a seeded sample of true positives,
false positives and false negatives of each stage; when the generator's ground truth is given
(synthetic cohorts), the lesion mask is carried through the same crop and resize as the pixels and
the maps are measured against it (pointing game, mass inside).
Given the exam-level model, the metrics also hold the per-patient rows of every slice rule and of
the exam model on the same patients (``patient_rules``) and its flat ``exam_patient_*`` summary keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch

from pe_triage import schema as S
from pe_triage.artifact import StageModel, load_model
from pe_triage.config import Config
from pe_triage.dataset import WindowsDataset
from pe_triage.evaluation.exam import EXAM, check_pair, evaluate_exam, exam_summary
from pe_triage.evaluation.gradcam import (
    Attribution,
    cam_level,
    gradcam_samples,
    inside_fraction,
    overlay_png,
    peak_on_lesion,
    pointing_game,
)
from pe_triage.evaluation.metrics import evaluate_predictions, leave_one_site_out_summary, proportion
from pe_triage.evaluation.report import write_loso_report, write_report
from pe_triage.evaluation.scoring import EvaluationError, batch_images, open_split, score_slices
from pe_triage.evaluation.scoring import predict_split as predict_split  # its home before scoring.py
from pe_triage.models.exam import ExamArtifactError, load_exam_model
from pe_triage.provenance import dataset_digest, file_digest, git_commit, package_version
from pe_triage.tracking import start_run
from pe_triage.training.train import torch_threads
from pe_triage.windows import uint8_to_centred

log = logging.getLogger(__name__)


def lesion_masks(truth: str, boxes: pd.DataFrame, size: int) -> dict[int, np.ndarray]:
    """Row of ``boxes`` (see :func:`slice_boxes`) -> its lesion mask in model-input pixels (crop box
    + resize, as the pixels), from the synthetic cohort's truth; rows without a truth entry are absent."""
    files = sorted(str(p) for p in Path(truth).glob("*.parquet")) if Path(truth).is_dir() else [truth]
    table = pads.dataset(files, format="parquet").to_table(columns=[S.SOURCE_HMAC, S.ROWS, S.COLS, S.T_MASK])
    wanted = set(boxes[S.SOURCE_HMAC])
    table = table.filter(pc.is_in(table[S.SOURCE_HMAC], value_set=pa.array(sorted(wanted))))
    if wanted and not table.num_rows:  # the digests are keyed: a cohort generated with another key matches nothing
        raise EvaluationError(f"{truth}: no evaluated slice is in this truth (generate the cohort with the pseudonym "
                              "key it is ingested with)")
    by_digest = {r[S.SOURCE_HMAC]: r for r in table.to_pylist()}
    out = {}
    for i, row in boxes.iterrows():
        found = by_digest.get(row[S.SOURCE_HMAC])
        if found is None:
            continue
        mask = np.frombuffer(found[S.T_MASK], np.uint8).reshape(found[S.ROWS], found[S.COLS])
        patch = mask[row[S.CROP_Y0] : row[S.CROP_Y1], row[S.CROP_X0] : row[S.CROP_X1]].astype(np.float32)
        out[int(i)] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA) > 0
    return out


def _gradcam(models: dict[int, StageModel], channels: dict[int, list[int]], ds: WindowsDataset, pred: pd.DataFrame,
             masks: dict[int, np.ndarray] | None, out: Path, config: Config) -> list[dict[str, Any]]:
    items = []
    folder = out / "gradcam"
    tolerance = config.evaluate.gradcam_pointing_tolerance_px
    folder.mkdir(parents=True, exist_ok=True)
    batch = batch_images(config, ds.shape)
    attribution = Attribution.of(config.evaluate)
    for stage, model in models.items():
        sample = gradcam_samples(pred.reset_index(), stage=stage, threshold=model.meta.threshold,
                                 per_category=config.evaluate.gradcam_per_category, seed=config.evaluate.seed)
        cams = _cams(model, ds, [int(i) for i in sample["index"]], channels[stage], batch, attribution)
        for n, (row, (_, image, cam)) in enumerate(zip(sample.itertuples(index=False), cams, strict=True)):
            mask = None if masks is None else masks.get(int(row.index))
            lesion = mask if mask is not None and mask.any() else None
            fraction = max((inside_fraction(c, lesion) or 0.0) for c in cam) if lesion is not None else None
            on_lesion = any(peak_on_lesion(c, lesion, tolerance) for c in cam) if lesion is not None else None
            path = folder / f"stage{stage}-{row.category}-{n:02d}.png"
            overlay_png(image, cam, path, mask=lesion, titles=model.meta.window_names,
                        caption=f"stage {stage} {row.category}: {row.site}, slice {row.slice_index}, label {row.label}")
            items.append({"stage": stage, "category": row.category, "png": str(path), "inside_fraction": fraction,
                          "lesion_area_fraction": float(lesion.mean()) if lesion is not None else None,
                          "peak_on_lesion": on_lesion, "site": row.site, "slice_index": int(row.slice_index),
                          "method": attribution.label})
    return items


def _check_gradcam_layer(models: dict[int, StageModel], config: Config) -> None:
    """A Grad-CAM level a backbone lacks fails before the scoring, not minutes later."""
    layer = config.evaluate.gradcam_layer
    if config.evaluate.attribution != "gradcam":
        return
    for stage, model in models.items():
        for branch in model.model.branches:
            try:
                cam_level(branch, layer)
            except ValueError as e:
                raise EvaluationError(f"stage {stage} model, evaluate.gradcam_layer: {e}") from None


def _cams(model: StageModel, ds: WindowsDataset, rows: list[int], channels: list[int],
          batch: int, attribution: Attribution) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(row, its window stack, its evidence maps) for ``rows`` of ``ds``, a batch at a time on one
    thread (as ``scoring.score_slices``); the stack shown is the slice itself, without the neighbours a 2.5-D model
    also reads."""
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        images = ds.inputs(chunk, channels, 0)
        inputs = ds.inputs(chunk, channels, model.meta.model.context)
        with torch_threads(1):
            cams = attribution.maps(model.model, torch.from_numpy(uint8_to_centred(inputs)))
        yield from zip(chunk, images, cams, strict=True)


def _localisation(models: dict[int, StageModel], channels: dict[int, list[int]], ds: WindowsDataset, pred: pd.DataFrame,
                  masks: dict[int, np.ndarray], config: Config) -> dict[str, Any]:
    """Evidence maps of a seeded sample of each stage's true positives against their lesion masks: how often
    the map's peak is on the lesion (with its Wilson interval; a blank map, no positive evidence
    anywhere, is a miss), and the mean mass inside it."""
    ev = config.evaluate
    attribution = Attribution.of(ev)
    out = {}
    for stage, model in models.items():
        tp = gradcam_samples(pred.reset_index(), stage=stage, threshold=model.meta.threshold,
                             per_category=ev.gradcam_localisation, seed=ev.seed).query("category == 'tp'")
        rows = [int(i) for i in tp["index"] if int(i) in masks and masks[int(i)].any()]
        with torch_threads(1):
            game = pointing_game(model.model, ds.inputs(rows, channels[stage], model.meta.model.context),
                                 [masks[i] for i in rows], tolerance=ev.gradcam_pointing_tolerance_px,
                                 attribution=attribution, batch=batch_images(config, ds.shape))
        area = [float(masks[i].mean()) for i in rows]
        out[f"stage{stage}"] = {"true_positives": int(len(tp)),
                                "peak_on_lesion": proportion(game.hits, game.slices, ev.confidence),
                                "blank_maps": game.blank,  # no positive evidence anywhere: counted as a miss
                                "mean_inside_fraction": game.mean_inside_fraction,
                                "mean_lesion_area_fraction": float(np.mean(area)) if area else None,
                                "tolerance_px": ev.gradcam_pointing_tolerance_px, "method": attribution.label}
    return out


def evaluate(
    stage1: str,
    stage2: str,
    windows: str,
    splits: str,
    out: str,
    *,
    split: str = "test",
    fold: str = S.DEFAULT_FOLD,
    config: Config = Config(),
    truth: str | None = None,
    tracking_uri: str | None = None,
    exam: str | None = None,
) -> dict[str, Any]:
    """Evaluate the stage models on ``split`` of ``fold``; write metrics.json, report.md, report.html,
    plots and evidence-map overlays to ``out``; return the metrics. With the ``exam`` model folder,
    the metrics also compare it with every slice rule (:func:`_exam_comparison`)."""
    models = {1: load_model(stage1), 2: load_model(stage2)}
    _check_gradcam_layer(models, config)
    triage_rule = config.evaluate.patient_rule
    config = _slice_rule_config(config, exam)
    if exam is not None:
        _check_exam(exam, stage1, stage2)
    out_dir = Path(out)
    with open_split(models, windows, splits, split, fold, config) as ds:
        pred, channels = score_slices(models, ds, f"evaluate {split}", config)
        t1, t2 = models[1].meta.threshold, models[2].meta.threshold
        metrics = evaluate_predictions(pred, threshold_stage1=t1, threshold_stage2=t2, config=config.evaluate)
        metrics["test_data"] = {"windows_digest": dataset_digest(windows), "splits_digest": file_digest(splits), "split": split,
                                "fold": fold, "slices": len(pred),
                                "patients": int(pred[[S.SITE, S.PATIENT_ID]].drop_duplicates().shape[0])}
        kept = ("model", "threshold", "target_sensitivity", "operating_point", "val", "git_commit", "config_hash",
                "mlflow_run_id", "data")
        metrics["models"] = {S.STAGES[s].name: {k: m.meta.raw.get(k) for k in kept} for s, m in models.items()}
        masks = None
        if truth is not None:
            masks = lesion_masks(truth, slice_boxes(windows, ds.index), ds.shape[-1])
            metrics["synthetic"] = synthetic_cohort(truth)
            if config.evaluate.gradcam_localisation:
                metrics["localisation"] = _localisation(models, channels, ds, pred, masks, config)
        gradcam = _gradcam(models, channels, ds, pred, masks, out_dir, config) if config.evaluate.gradcam_per_category else []
    if exam is not None:
        metrics["patient_rules"] = _exam_comparison(stage1, stage2, exam, windows, splits, split, fold, config, triage_rule)
        metrics["summary"].update(exam_summary(metrics["patient_rules"]["rows"][EXAM]))
    paths = write_report(metrics, pred, out_dir, gradcam=gradcam or None)
    pred.to_parquet(out_dir / "predictions.parquet", index=False)
    with start_run(experiment=config.registry.experiment, run_name=f"evaluate-{split}", uri=tracking_uri,
                   tags={"step": "evaluate", "split": split, "fold": fold, "git_commit": git_commit(),
                         "package_version": package_version(), "windows_digest": metrics["test_data"]["windows_digest"],
                         "stage1_run_id": models[1].meta.raw.get("mlflow_run_id"),
                         "stage2_run_id": models[2].meta.raw.get("mlflow_run_id")}) as tracker:
        tracker.log_metrics({k: v for k, v in metrics["summary"].items() if isinstance(v, (int, float))})
        tracker.log_artifacts(out_dir, "evaluation")
        metrics["mlflow_run_id"] = tracker.run_id
    log.info("evaluate: report at %s", paths["report_html"])
    return metrics


def _slice_rule_config(config: Config, exam: str | None) -> Config:
    """The configuration of the slice-rule tables: under patient rule "exam" the exam model decides,
    and the tables keep the study's "any" rule (a rule over slice scores) beside its comparison."""
    if config.evaluate.patient_rule != "exam":
        return config
    if exam is None:
        raise EvaluationError('evaluate.patient_rule "exam": the triage decides with the exam model; give the exam model '
                              "to evaluate it")
    return replace(config, evaluate=replace(config.evaluate, patient_rule="any"))


def _check_exam(exam: str, stage1: str, stage2: str) -> None:
    """An unreadable exam model, or one of other stage models, fails before the scoring, not after it."""
    try:
        check_pair(load_exam_model(exam), stage1, stage2)
    except ExamArtifactError as e:
        raise EvaluationError(str(e)) from None


def _exam_comparison(stage1: str, stage2: str, exam: str, windows: str, splits: str, split: str, fold: str,
                     config: Config, triage_rule: str) -> dict[str, Any]:
    """Per-patient rows of every slice rule and of the exam model (``evaluation.exam.compare_rules``):
    thresholds chosen on the val patients, figures on ``split``. It costs one more pass of both stage
    models over val and ``split`` (the exam model reads their embeddings, which the scoring does not keep)."""
    rows = evaluate_exam(stage1, stage2, exam, windows, splits, split=split, calibration="val", fold=fold, config=config)
    return {"calibration": "val", "evaluated": split, "triage_rule": triage_rule, "rows": rows}


def summarize_site_folds(evaluations: list[str], out: str) -> dict[str, Any]:
    """Leave-one-site-out summary of the evaluation folders of site folds (``evaluate --fold SITE``
    of models trained with ``--fold SITE``): per-fold table, mean and SD, written to ``out``."""
    summary = site_fold_summary(evaluations)
    paths = write_loso_report(summary, out)
    log.info("leave one site out: %d folds, report at %s", len(summary["folds"]), paths["leave_one_site_out_html"])
    return summary


def site_fold_summary(evaluations: list[str]) -> dict[str, Any]:
    """The summary :func:`summarize_site_folds` writes, unwritten.

    The folds must come from one splits file and one windows dataset, each site once: a summary
    mixing data versions would compare unlike things.
    """
    per_fold: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, Any]] = {}
    for folder in evaluations:
        path = Path(folder) / "metrics.json" if Path(folder).is_dir() else Path(folder)
        if not path.is_file():
            raise EvaluationError(f"{folder}: no metrics.json (not an evaluate output folder)")
        metrics = json.loads(path.read_text())
        data = metrics.get("test_data", {})
        fold = data.get("fold")
        if fold is None or fold == S.DEFAULT_FOLD:
            raise EvaluationError(f"{folder}: evaluated on fold {fold!r}, not a site fold (split with --by-site leave-one-out)")
        if fold in per_fold:
            raise EvaluationError(f"{folder}: fold {fold!r} appears twice ({sources[fold]['path']})")
        per_fold[fold] = metrics
        sources[fold] = {"path": str(path), **{k: data.get(k) for k in ("windows_digest", "splits_digest", "split")}}
    if len(per_fold) < 2:
        raise EvaluationError(f"a leave-one-site-out summary needs at least two site folds, got {sorted(per_fold)}")
    for key in ("windows_digest", "splits_digest", "split"):
        values = {f: s[key] for f, s in sources.items()}
        if len(set(values.values())) > 1:
            raise EvaluationError(f"folds differ in {key}: {values}")
    return {**leave_one_site_out_summary(per_fold), "evaluations": sources}


def synthetic_cohort(truth: str) -> dict[str, Any]:
    """What made the synthetic cohort behind ``truth`` (seed, lesion preset, visibility minima): a
    report on a ``conspicuous`` cohort must say that its figures show learning, not clinical skill."""
    made = json.loads((Path(truth) / "cohort.json").read_text())
    return {k: made.get(k) for k in ("seed", "lesions", "min_visible_area_mm2")}


def slice_boxes(windows: str, index: pd.DataFrame) -> pd.DataFrame:
    """source_hmac and crop box of every evaluated slice, in the order of ``index``."""
    keys = [S.SITE, S.PATIENT_ID, S.SERIES_UID, S.SLICE_INDEX]
    table = pads.dataset(windows, format="parquet", partitioning="hive").to_table(
        columns=[*keys, S.SOURCE_HMAC, S.CROP_Y0, S.CROP_Y1, S.CROP_X0, S.CROP_X1])
    merged = index[keys].merge(table.to_pandas(), on=keys, how="left", validate="one_to_one")
    return merged.set_index(index.index)

"""The evaluation step end to end on the toy cohort: both stages applied, every output written,
the test data identified, Grad-CAM drawn, and mismatched inputs named."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import train_toy_pair, write_splits, write_toy_cohort, write_windows

import pe_triage.evaluation.evaluate as ev
import pe_triage.evaluation.scoring as scoring
from pe_triage.artifact import load_model
from pe_triage.config import Config, EvalConfig, LoaderConfig, ModelConfig, TrainConfig
from pe_triage.dataset import WindowsDataset
from pe_triage.evaluation import SUMMARY_KEYS
from pe_triage.evaluation.evaluate import EvaluationError, evaluate, predict_split
from pe_triage.progress import MODE_ENV as PROGRESS_ENV
from pe_triage.training.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str, str, Config]:
    root = tmp_path_factory.mktemp("eval")
    config = Config(
        model=ModelConfig(arch="cbam_drn_d_22", width=0.125),
        loader=LoaderConfig(cache_dir=str(root / "cache"), augment=False),
        train=TrainConfig(windows=("vascular", "lung"), epochs=4, batch_size=8, lr=3e-3, num_workers=0, samples_per_epoch=48,
                          patience=0),
        evaluate=EvalConfig(bootstrap=200, gradcam_per_category=2),
    )
    return (*train_toy_pair(root, config), config)


def test_evaluate_writes_metrics_report_predictions_and_gradcam(trained: tuple[str, str, str, str, Config],
                                                                tmp_path: Path) -> None:
    windows, splits, stage1, stage2, config = trained
    metrics = evaluate(stage1, stage2, windows, splits, str(tmp_path / "eval"), config=config)
    out = tmp_path / "eval"
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "report.md", "report.html", "predictions.parquet", "gradcam"}
    stored = json.loads((out / "metrics.json").read_text())
    assert set(stored["summary"]) == set(SUMMARY_KEYS)
    assert stored["summary"]["slices"] == 20 and stored["summary"]["patients"] == 2  # the 2 test patients
    assert stored["test_data"]["split"] == "test" and len(stored["test_data"]["windows_digest"]) == 64
    assert stored["models"]["stage1"]["threshold"] == metrics["models"]["stage1"]["threshold"]
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == 20 and pred[["p_disease", "p_pe"]].notna().all().all()
    assert set(pred["site"]) == {"site-a", "site-b"}
    assert list((out / "gradcam").glob("stage*-*.png")), "no Grad-CAM overlays"
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_scores_do_not_depend_on_the_batch_and_the_slices_show_progress(
        trained: tuple[str, str, str, str, Config], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Scoring runs in cache-sized batches (``evaluate.batch_pixels``) on worker threads: one image
    at a time, 7 (20 slices: a short last batch) and all at once, in chunks of 3 slices over 3
    threads, give the same probabilities, in the same order."""
    windows, splits, stage1, stage2, config = trained
    monkeypatch.setenv(PROGRESS_ENV, "log")
    monkeypatch.setattr(scoring, "cpu_share", lambda: 3)
    monkeypatch.setattr(scoring, "SCORE_CHUNK", 3)
    models = {1: load_model(stage1), 2: load_model(stage2)}
    runs = []
    for images in (1, 7, 64):
        cfg = replace(config, evaluate=replace(config.evaluate, batch_pixels=images * 32 * 32))
        with caplog.at_level("INFO", logger="pe_triage"):
            runs.append(predict_split(models, windows, splits, split="test", config=cfg))
    for pred in runs[1:]:
        pd.testing.assert_frame_equal(pred, runs[0], atol=1e-6, check_exact=False)
    assert runs[0]["p_disease"].nunique() > 1  # the models tell the slices apart: a real comparison
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("score test: 20 slice in ")]
    assert len(done) == 3


def test_indeterminate_slices_are_predicted_counted_and_kept_out_of_the_slice_tables(
        trained: tuple[str, str, str, str, Config], tmp_path: Path) -> None:
    _, _, stage1, stage2, config = trained
    windows = tmp_path / "w"
    write_windows(windows, {("site-a", "q1"): ["wnl", "pe", "indeterminate"], ("site-b", "q2"): ["wnl", "indeterminate"]},
                  size=32)
    splits = write_splits(tmp_path / "s.parquet", {("site-a", "q1"): "test", ("site-b", "q2"): "test"})
    metrics = evaluate(stage1, stage2, str(windows), str(splits), str(tmp_path / "eval"), config=config)
    pred = pd.read_parquet(tmp_path / "eval" / "predictions.parquet")
    assert len(pred) == 5 and (pred["label"] == "indeterminate").sum() == 2  # every slice predicted
    assert metrics["counts"]["slices"]["indeterminate"] == 2 and metrics["counts"]["patients"]["indeterminate"] == 1
    assert metrics["summary"]["slices"] == 3 and metrics["summary"]["patients"] == 1
    assert "indeterminate 2)" in (tmp_path / "eval" / "report.md").read_text()


def test_mismatched_models_are_named(trained: tuple[str, str, str, str, Config], tmp_path: Path) -> None:
    windows, splits, stage1, stage2, config = trained
    with pytest.raises(EvaluationError, match="--stage1 model is a stage 2 model"):
        evaluate(stage2, stage1, windows, splits, str(tmp_path / "e"), config=config)
    with pytest.raises(EvaluationError, match="fold 'site-a' not in splits file"):
        evaluate(stage1, stage2, windows, splits, str(tmp_path / "e"), fold="site-a", config=replace(config))


def test_with_lesion_masks_the_localisation_of_true_positives_is_measured(
        trained: tuple[str, str, str, str, Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The truth of a synthetic cohort gives every slice its lesion mask; here a mask covering the
    whole image (every peak is on it) and one covering nothing (no true positive can be measured)."""
    windows, splits, stage1, stage2, config = trained
    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "cohort.json").write_text(json.dumps({"seed": 0, "lesions": "conspicuous", "min_visible_area_mm2": {}}))
    for fill in (True, False):
        monkeypatch.setattr(ev, "lesion_masks", lambda _t, boxes, size, fill=fill: {
            int(i): np.full((size, size), fill) for i in boxes.index})
        metrics = evaluate(stage1, stage2, windows, splits, str(tmp_path / f"eval-{fill}"), config=config, truth=str(truth))
        for stage in ("stage1", "stage2"):
            loc = metrics["localisation"][stage]
            hits, n = loc["peak_on_lesion"]["k"], loc["peak_on_lesion"]["n"]
            assert loc["true_positives"] > 0 and n == (loc["true_positives"] if fill else 0)
            assert hits == (n - loc["blank_maps"] if fill else 0)  # every map with a peak has it on an all-image lesion
        assert "Evidence-map localisation" in (tmp_path / f"eval-{fill}" / "report.md").read_text()


def test_truth_keyed_with_another_key_is_a_clear_error(tmp_path: Path) -> None:
    """The truth joins by the keyed source digest: a cohort generated with another key matches nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pe_triage import schema as S
    from pe_triage.evaluation.evaluate import lesion_masks

    row = {S.SITE: "s", S.M_PATIENT_ID: "p", S.M_STUDY_UID: "1", S.M_SERIES_UID: "1.1", S.M_SOP_UID: "1.1.1",
           S.SOURCE_HMAC: "a" * 64, S.Z_MM: 0.0, S.ROWS: 4, S.COLS: 4, S.LABEL: "pe", S.T_LESION: "pe",
           S.T_MASK: bytes(16), S.T_TISSUE: None}
    pq.write_table(pa.Table.from_pylist([row], schema=S.TRUTH_SCHEMA), tmp_path / "s.parquet")
    boxes = pd.DataFrame({S.SOURCE_HMAC: ["b" * 64], S.CROP_Y0: [0], S.CROP_Y1: [4], S.CROP_X0: [0], S.CROP_X1: [4]})
    with pytest.raises(EvaluationError, match="no evaluated slice is in this truth"):
        lesion_masks(str(tmp_path), boxes, 8)
    assert list(lesion_masks(str(tmp_path), boxes.assign(**{S.SOURCE_HMAC: ["a" * 64]}), 8)) == [0]


def test_a_2_5d_stage_beside_a_2d_one_is_scored_on_its_neighbours_and_drawn(tmp_path: Path) -> None:
    """Stage 1 reads one neighbour on each side, stage 2 one slice: each gets its own input from the
    one dataset the evaluation opens (the widest context), and the overlays show the slice itself."""
    config = Config(
        model=ModelConfig(arch="cbam_drn_d_22", width=0.125),
        loader=LoaderConfig(cache_dir=str(tmp_path / "cache"), augment=False),
        train=TrainConfig(windows=("vascular", "lung"), epochs=1, batch_size=8, lr=3e-3, num_workers=0, samples_per_epoch=16,
                          patience=0),
        evaluate=EvalConfig(bootstrap=50, gradcam_per_category=1),
    )
    windows, splits = write_toy_cohort(tmp_path, 32)
    train(windows, splits, str(tmp_path / "s1"), stage=1, config=replace(config, model=replace(config.model, context=1)))
    train(windows, splits, str(tmp_path / "s2"), stage=2, config=config)
    evaluate(str(tmp_path / "s1"), str(tmp_path / "s2"), windows, splits, str(tmp_path / "eval"), config=config)
    pred = pd.read_parquet(tmp_path / "eval" / "predictions.parquet")
    assert len(pred) == 20 and list((tmp_path / "eval" / "gradcam").glob("stage1-*.png"))
    with WindowsDataset(windows, splits, split="test", stage=1, windows_used=["vascular", "lung"], config=config.loader,
                        keep_indeterminate=True, context=1) as ds:
        s1, s2 = load_model(tmp_path / "s1"), load_model(tmp_path / "s2")
        np.testing.assert_allclose(pred["p_disease"], s1.predict_proba(ds.inputs(slice(None))), atol=1e-5)
        np.testing.assert_allclose(pred["p_pe"], s2.predict_proba(ds.inputs(slice(None), context=0)), atol=1e-5)

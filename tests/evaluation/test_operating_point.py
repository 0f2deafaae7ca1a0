"""The operating point: thresholds chosen on the validation exams, reaching the patient targets with
the fewest false alarms, and written into calibrated copies of the models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import train_toy_pair

from pe_triage.artifact import load_model, read_meta
from pe_triage.config import Config, EvalConfig, LoaderConfig, ModelConfig, OperatingPointConfig, TrainConfig
from pe_triage.evaluation import patient_decisions
from pe_triage.evaluation.evaluate import EvaluationError, evaluate
from pe_triage.evaluation.operating_point import calibrate, choose_thresholds


def cohort(seed: int = 0, patients: int = 60, slices: int = 8) -> pd.DataFrame:
    """Exams of WNL, other-disease and PE patients with overlapping, noisy slice scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        kind = ("wnl", "other", "pe")[p % 3]
        lesion = set(rng.choice(slices, 3, replace=False)) if kind != "wnl" else set()
        for i in range(slices):
            label = kind if i in lesion else "wnl"
            d = rng.beta(2, 5) if label == "wnl" else rng.beta(5, 2)
            q = rng.beta(5, 2) if label == "pe" else rng.beta(2, 4)
            rows.append({"site": "s", "patient_id": f"p{p}", "series_uid": f"se{p}", "slice_index": i, "label": label,
                         "p_disease": d, "p_pe": q})
    return pd.DataFrame(rows)


def _rates(pred: pd.DataFrame, t1: float, t2: float, config: EvalConfig) -> tuple[float, float]:
    d = patient_decisions(pred, threshold_stage1=t1, threshold_stage2=t2, config=config)
    kind = d["patient_id"].map(pred.groupby("patient_id")["label"].agg(lambda s: "pe" if (s == "pe").any() else
                                                                        "other" if (s == "other").any() else "wnl"))
    return float(d["disease_positive"][kind != "wnl"].mean()), float(d["pe_positive"][kind == "pe"].mean())


@pytest.mark.parametrize("rule", ["any", "k_consecutive", "top_k_mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_reach_both_patient_targets_and_are_the_highest_that_do(rule: str, seed: int) -> None:
    pred, config = cohort(seed), EvalConfig(patient_rule=rule, bootstrap=0)
    chosen = choose_thresholds(pred, disease_sensitivity=0.9, pe_sensitivity=0.95, config=config)
    t1, t2 = chosen["stage1"], chosen["stage2"]
    disease, pe = _rates(pred, t1, t2, config)
    assert disease >= 0.9 and pe >= 0.95
    assert chosen["achieved"]["patient_pe_sensitivity"] == pytest.approx(pe)
    higher = np.sort(pred["p_pe"].unique())
    higher = higher[higher > t2]
    if higher.size:  # one step up in stage 2 loses a PE exam
        assert _rates(pred, t1, float(higher[0]), config)[1] < 0.95


def test_exam_thresholds_sit_above_the_slice_ones_and_cut_false_alarms() -> None:
    """Eight chances per exam: a 95%-of-slices threshold flags most WNL exams; 95% of exams does not."""
    pred, config = cohort(3, patients=90), EvalConfig(bootstrap=0)
    chosen = choose_thresholds(pred, disease_sensitivity=0.95, pe_sensitivity=0.95, config=config)
    lesion = pred.loc[pred["label"] != "wnl", "p_disease"].sort_values().to_numpy()
    slice_t1 = float(lesion[int(0.05 * lesion.size)])
    assert chosen["stage1"] > slice_t1
    wnl_patient = pred.groupby("patient_id", sort=True)["label"].agg(lambda s: (s == "wnl").all()).to_numpy()

    def wnl_flagged(t1: float) -> float:
        decisions = patient_decisions(pred, threshold_stage1=t1, threshold_stage2=1.0, config=config)
        return decisions["disease_positive"][wnl_patient].mean()

    assert wnl_flagged(chosen["stage1"]) < wnl_flagged(slice_t1)
    assert chosen["achieved"]["patient_wnl_specificity"] > 0.2


def test_stage1_is_lowered_when_it_alone_loses_pe_exams() -> None:
    """Clot slices that stage 1 scores low: the disease target alone would leave PE exams behind."""
    pred, config = cohort(4), EvalConfig(bootstrap=0)
    pred.loc[pred["label"] == "pe", "p_disease"] *= 0.5
    disease_only = choose_thresholds(pred, disease_sensitivity=0.6, pe_sensitivity=0.01, config=config)
    chosen = choose_thresholds(pred, disease_sensitivity=0.6, pe_sensitivity=0.95, config=config)
    assert chosen["stage1"] < disease_only["stage1"]
    assert _rates(pred, chosen["stage1"], chosen["stage2"], config)[1] >= 0.95


def test_no_pe_exam_is_a_clear_error() -> None:
    pred = cohort(0)
    pred["label"] = pred["label"].replace("pe", "other")
    with pytest.raises(EvaluationError, match="no PE patient"):
        choose_thresholds(pred, disease_sensitivity=0.95, pe_sensitivity=0.95, config=EvalConfig(bootstrap=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str, str, Config]:
    root = tmp_path_factory.mktemp("op")
    config = Config(
        model=ModelConfig(arch="plain_cnn", width=0.25),
        loader=LoaderConfig(cache_dir=str(root / "cache"), augment=False),
        train=TrainConfig(windows=("vascular", "lung"), epochs=2, batch_size=8, lr=3e-3, num_workers=0, samples_per_epoch=32,
                          patience=0),
        evaluate=EvalConfig(bootstrap=50, gradcam_per_category=0),
    )
    return (*train_toy_pair(root, config), config)


def test_calibrate_writes_models_that_operate_at_the_chosen_pair(trained: tuple[str, str, str, str, Config],
                                                                 tmp_path: Path) -> None:
    windows, splits, stage1, stage2, config = trained
    out1, out2 = tmp_path / "c1", tmp_path / "c2"
    record = calibrate(stage1, stage2, windows, splits, str(out1), str(out2), config=config)
    for stage, src, out in ((1, stage1, out1), (2, stage2, out2)):
        meta = read_meta(out)
        assert meta["threshold"] == record["thresholds"][f"stage{stage}"]
        assert meta["slice_threshold"] == read_meta(src)["threshold"]  # the stage's own, kept
        assert meta["operating_point"]["level"] == "patient" and meta["operating_point"]["split"] == "val"
        assert (out / "model.pt").read_bytes() == (Path(src) / "model.pt").read_bytes()
        load_model(out)
    assert record["achieved"]["patient_pe_sensitivity"] >= 0.95
    metrics = evaluate(str(out1), str(out2), windows, splits, str(tmp_path / "eval"), config=config)
    assert metrics["thresholds"] == record["thresholds"]
    assert metrics["models"]["stage1"]["operating_point"]["level"] == "patient"
    again = calibrate(stage1, stage2, windows, splits, str(out1), str(out2), config=config)  # a rerun replaces, same result
    assert again == json.loads(json.dumps(record)) and not list(tmp_path.glob(".c1*"))


def test_slice_level_keeps_each_stages_threshold_and_bad_settings_are_named(trained: tuple[str, str, str, str, Config],
                                                                            tmp_path: Path) -> None:
    windows, splits, stage1, stage2, config = trained
    sliced = replace(config, operating_point=OperatingPointConfig(level="slice"))
    record = calibrate(stage1, stage2, windows, splits, str(tmp_path / "a"), str(tmp_path / "b"), config=sliced)
    assert record["thresholds"] == {"stage1": read_meta(stage1)["threshold"], "stage2": read_meta(stage2)["threshold"]}
    bad = replace(config, operating_point=OperatingPointConfig(patient_pe_sensitivity=1.5))
    with pytest.raises(EvaluationError, match="patient_pe_sensitivity 1.5"):
        calibrate(stage1, stage2, windows, splits, str(tmp_path / "x"), str(tmp_path / "y"), config=bad)

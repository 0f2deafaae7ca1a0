"""The evaluation step with an exam model: metrics.json carries the per-patient rows of every slice
rule and of the exam model (thresholds chosen on val, figures on test) and the exam model's flat
summary keys, the report shows the comparison and which rule the triage uses, and MLflow gets the
exam figures with the rest of the summary."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
from factories import train_exam_trio

from pe_triage.cli import main
from pe_triage.config import (
    Config,
    EvalConfig,
    ExamConfig,
    LoaderConfig,
    ModelConfig,
    RegistryConfig,
    TrainConfig,
)
from pe_triage.evaluation.evaluate import EvaluationError, evaluate
from pe_triage.evaluation.exam import EXAM, EXAM_SUMMARY_KEYS, evaluate_exam
from pe_triage.evaluation.metrics import RULES
from pe_triage.evaluation.operating_point import calibrate

Trio = tuple[str, str, str, str, str, Config]


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Trio:
    root = tmp_path_factory.mktemp("evaluate-exam")
    config = Config(
        model=ModelConfig(arch="plain_cnn", width=0.25),
        loader=LoaderConfig(cache_dir=str(root / "cache"), augment=False),
        train=TrainConfig(windows=("vascular", "lung"), epochs=2, batch_size=8, lr=3e-3, num_workers=0, samples_per_epoch=32,
                          patience=0),
        evaluate=EvalConfig(bootstrap=50, gradcam_per_category=0),
        exam=ExamConfig(epochs=5, patience=5),
    )
    return (*train_exam_trio(root, config), config)


def test_metrics_carry_the_rules_and_the_exam_model_side_by_side(trio: Trio, tmp_path: Path, mlflow_server: str) -> None:
    windows, splits, stage1, stage2, exam, config = trio
    config = replace(config, registry=RegistryConfig(experiment="evaluate-exam"))
    result = evaluate(stage1, stage2, windows, splits, str(tmp_path), config=config, exam=exam, tracking_uri=mlflow_server)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    table = stored["patient_rules"]
    assert table["calibration"] == "val" and table["evaluated"] == "test" and table["triage_rule"] == "any"
    assert set(table["rows"]) == {*RULES, EXAM}
    assert {row["patients"] for row in table["rows"].values()} == {3}, "every row scores the same three test patients"
    assert table["rows"] == evaluate_exam(stage1, stage2, exam, windows, splits, config=config), \
        "the same rows as the exam model's own comparison"
    row = table["rows"][EXAM]
    summary = stored["summary"]
    assert set(EXAM_SUMMARY_KEYS) <= set(summary)
    assert summary["exam_patient_pe_sensitivity"] == row["pe"]["sensitivity"]["value"] is not None
    assert summary["exam_patient_pe_specificity"] == row["pe"]["specificity"]["value"] is not None
    assert summary["exam_patient_wnl_sensitivity"] == row["disease"]["specificity"]["value"] is not None
    assert summary["exam_patient_pe_auroc_ci_low"] == (row["pe"]["auroc_ci"] or [None])[0]
    assert result["summary"] == summary

    page = (tmp_path / "report.html").read_text()
    assert "Per-patient decision: rules vs exam model" in page
    assert "The triage decides with any positive slice (the study)" in page
    assert "exam model" in (tmp_path / "report.md").read_text()

    logged = mlflow.MlflowClient(mlflow_server).get_run(result["mlflow_run_id"]).data.metrics
    measured = {k: v for k, v in summary.items() if k in EXAM_SUMMARY_KEYS and v is not None}
    assert measured and {k: logged[k] for k in measured} == pytest.approx(measured)


def test_without_an_exam_model_nothing_of_it_appears(trio: Trio, tmp_path: Path) -> None:
    windows, splits, stage1, stage2, _, config = trio
    result = evaluate(stage1, stage2, windows, splits, str(tmp_path), config=config)
    assert "patient_rules" not in result and not set(EXAM_SUMMARY_KEYS) & set(result["summary"])
    assert "rules vs exam model" not in (tmp_path / "report.html").read_text()


def test_the_exam_rule_is_evaluated_beside_the_study_rule_and_needs_an_exam_model(trio: Trio, tmp_path: Path) -> None:
    windows, splits, stage1, stage2, exam, config = trio
    config = replace(config, evaluate=replace(config.evaluate, patient_rule="exam"))
    with pytest.raises(EvaluationError, match='patient_rule "exam".*exam model'):
        evaluate(stage1, stage2, windows, splits, str(tmp_path / "none"), config=config)
    result = evaluate(stage1, stage2, windows, splits, str(tmp_path / "exam"), config=config, exam=exam)
    assert result["patient"]["rule"]["name"] == "any", "the slice tables keep the study's rule"
    assert result["patient_rules"]["triage_rule"] == "exam"
    assert "The triage decides with the exam model" in (tmp_path / "exam" / "report.html").read_text()


def test_an_exam_model_of_other_stage_models_is_refused(trio: Trio, tmp_path: Path) -> None:
    windows, splits, stage1, stage2, exam, config = trio
    with pytest.raises(EvaluationError, match="another stage 1 model"):
        evaluate(stage2, stage2, windows, splits, str(tmp_path), config=config, exam=exam)
    with pytest.raises(EvaluationError, match="not an exam model folder"):
        evaluate(stage1, stage2, windows, splits, str(tmp_path), config=config, exam=str(tmp_path))


def test_the_cli_evaluates_with_an_exam_model(trio: Trio, tmp_path: Path) -> None:
    windows, splits, stage1, stage2, exam, _ = trio
    config = tmp_path / "config.yaml"
    config.write_text("evaluate: {bootstrap: 20, gradcam_per_category: 0}\n")
    assert main(["evaluate", "--stage1", stage1, "--stage2", stage2, "--windows", windows, "--splits", splits, "--exam", exam,
                 "--out", str(tmp_path / "out"), "--config", str(config)]) == 0
    assert "exam_model" in json.loads((tmp_path / "out" / "metrics.json").read_text())["patient_rules"]["rows"]


def test_calibrate_under_the_exam_rule_sets_the_stages_as_the_study_rule_does(trio: Trio, tmp_path: Path) -> None:
    """The exam model has thresholds of its own (``calibrate_exam``); the stages' pair still flags
    slices, so under rule "exam" it is chosen as under the study's rule, and the record says which."""
    windows, splits, stage1, stage2, _, config = trio
    chosen = {}
    for rule in ("any", "exam"):
        cfg = replace(config, evaluate=replace(config.evaluate, patient_rule=rule))
        chosen[rule] = calibrate(stage1, stage2, windows, splits, str(tmp_path / rule / "1"), str(tmp_path / rule / "2"),
                                 config=cfg)
    assert chosen["exam"]["thresholds"] == chosen["any"]["thresholds"]
    assert chosen["exam"]["patient_rule"] == "exam" and chosen["exam"]["slice_rule"] == "any"

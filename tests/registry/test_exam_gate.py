"""The exam model through the real registry (MLflow server over HTTP): promote refuses a version whose
exam model misses the configured minimum and promotes one that reaches it, and the champion's
re-evaluation on the candidate's test data includes its exam model."""

from __future__ import annotations

import json
import uuid
from dataclasses import fields, replace
from pathlib import Path

import pytest
from factories import train_exam_trio
from test_predict import stage_model
from test_registry import aliases, edit_metrics, write_metrics

from pe_triage.config import GateConfig, RegistryConfig, parse_config
from pe_triage.evaluation.evaluate import evaluate
from pe_triage.registry.registry import CHAMPION, evaluate_champion, promote, register

#: a toy pair: 2-D plain CNNs, two epochs (as tests/pipelines/test_exam_components.py)
TOY = """
model: {arch: plain_cnn, width: 0.25}
train: {windows: [vascular, lung], epochs: 2, batch_size: 8, lr: 0.003, num_workers: 0, samples_per_epoch: 32, patience: 0}
evaluate: {bootstrap: 50, gradcam_per_category: 0}
exam: {epochs: 5, patience: 5}
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("exam-gate-models")
    return (str(stage_model(root / "stage1", 1, threshold=0.45)), str(stage_model(root / "stage2", 2, threshold=0.5)))


def exam_metrics(path: Path, pe_sensitivity: float) -> str:
    """A metrics folder whose summary carries the exam model's figures beside the rules'."""
    metrics = write_metrics(path)
    summary = {**json.loads((metrics / "metrics.json").read_text())["summary"],
               "exam_patient_pe_sensitivity": pe_sensitivity, "exam_patient_pe_auroc_ci_low": 0.8}
    return str(edit_metrics(metrics, summary=summary))


def test_promote_refuses_an_exam_model_below_its_gate(mlflow_server: str, pair: tuple[str, str], tmp_path: Path) -> None:
    name = f"pe-triage-{uuid.uuid4().hex[:8]}"
    cfg = RegistryConfig(model_name=name, experiment=name,
                         gates=replace(GateConfig(), min_exam_patient_pe_sensitivity=0.9))
    register(*pair, exam_metrics(tmp_path / "low", 0.8), config=cfg, uri=mlflow_server)
    low = promote(config=cfg, uri=mlflow_server)
    assert low["outcome"] == "refused" and "gate min_exam_patient_pe_sensitivity failed" in low["reason"]
    assert [g["name"] for g in low["gates"] if not g["passed"]] == ["min_exam_patient_pe_sensitivity"]
    assert CHAMPION not in aliases(mlflow_server, name)

    register(*pair, exam_metrics(tmp_path / "high", 0.95), config=cfg, uri=mlflow_server)
    high = promote(config=cfg, uri=mlflow_server)
    assert high["outcome"] == "promoted" and aliases(mlflow_server, name)[CHAMPION] == "2"
    gate = next(g for g in high["gates"] if g["name"] == "min_exam_patient_pe_sensitivity")
    assert gate["passed"] and gate["value"] == 0.95



def test_the_champion_is_re_evaluated_with_its_exam_model(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """promote compares like with like: the champion's re-evaluation on the candidate's test data
    carries its exam model's rows too, and runs at all under rule "exam"."""
    root = tmp_path_factory.mktemp("exam-champion")
    config = parse_config(TOY)
    windows, splits, stage1, stage2, exam = train_exam_trio(root, config)
    name = f"pe-triage-{uuid.uuid4().hex[:8]}"
    config = replace(config, registry=RegistryConfig(model_name=name, experiment=name, gates=GateConfig(
        **{f.name: None for f in fields(GateConfig) if f.name.startswith("min_")})))
    evaluate(stage1, stage2, windows, splits, str(root / "evaluation"), config=config, exam=exam)
    register(stage1, stage2, str(root / "evaluation"), config=config.registry, uri=mlflow_server, exam=exam)
    assert promote(config=config.registry, uri=mlflow_server)["outcome"] == "promoted"
    exam_rule = replace(config, evaluate=replace(config.evaluate, patient_rule="exam"))
    assert evaluate_champion(windows, splits, str(root / "champion"), config=exam_rule, uri=mlflow_server) == 1
    metrics = json.loads((root / "champion" / "metrics.json").read_text())
    assert metrics["patient_rules"]["triage_rule"] == "exam" and "exam_model" in metrics["patient_rules"]["rows"]

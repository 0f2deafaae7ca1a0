"""The exam step's components called directly (``python_func``) on a small cohort: ``train_exam``
writes a calibrated exam model (or, with ``exam.enabled`` false, a marker that says so) and
``evaluate`` compares it with the slice rules when it is there, and only then."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import train_exam_trio
from kfp import dsl
from pe_triage_components import COMPONENTS as C

from pe_triage.config import parse_config
from pe_triage.evaluation.exam import EXAM_SUMMARY_KEYS
from pe_triage.models.exam import load_exam_model

CONFIG = """
model: {arch: plain_cnn, width: 0.25}
train: {windows: [vascular, lung], epochs: 2, batch_size: 8, lr: 0.003, num_workers: 0, samples_per_epoch: 32, patience: 0}
evaluate: {bootstrap: 50, gradcam_per_category: 0}
exam: {epochs: 5, patience: 5}
"""


def _in(cls: type[dsl.Artifact], path: str, **metadata: object) -> dsl.Artifact:
    return cls(name=Path(path).name, uri=path, metadata=dict(metadata))


def _out(cls: type[dsl.Artifact], folder: Path, name: str) -> dsl.Artifact:
    """An output artifact as the KFP executor hands it over: its parent folder exists, it does not."""
    folder.mkdir(parents=True, exist_ok=True)
    return cls(name=name, uri=str(folder / name), metadata={})


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dsl.Artifact]:
    root = tmp_path_factory.mktemp("exam-components")
    windows, splits, stage1, stage2, _ = train_exam_trio(root, parse_config(CONFIG))
    return {"windows": _in(dsl.Dataset, windows), "splits": _in(dsl.Dataset, splits),
            "stage1": _in(dsl.Model, stage1), "stage2": _in(dsl.Model, stage2)}


def _train_exam(trio: dict[str, dsl.Artifact], config: str, out: Path) -> dsl.Artifact:
    exam = _out(dsl.Model, out, "exam")
    C.train_exam.python_func(**trio, config=config, tracking_uri="", exam=exam)
    return exam


def _evaluate(trio: dict[str, dsl.Artifact], exam: dsl.Artifact | None, out: Path) -> dict:
    outputs = {name: _out(cls, out, name) for name, cls in (
        ("evaluation", dsl.Artifact), ("metrics", dsl.Metrics), ("cascade", dsl.ClassificationMetrics),
        ("per_site", dsl.SlicedClassificationMetrics), ("report", dsl.HTML), ("summary", dsl.Markdown))}
    C.evaluate.python_func(**trio, config=CONFIG, tracking_uri="", truth="", exam=exam, **outputs)
    return {"metrics.json": json.loads((out / "evaluation" / "metrics.json").read_text()),
            "logged": outputs["metrics"].metadata}


def test_train_exam_writes_a_calibrated_exam_model_that_evaluate_compares(trio: dict[str, dsl.Artifact],
                                                                          tmp_path: Path) -> None:
    exam = _train_exam(trio, CONFIG, tmp_path)
    model = load_exam_model(exam.path)
    assert model.meta["operating_point"]["split"] == "val", "thresholds set jointly on the validation exams"
    assert exam.metadata["enabled"] is True and exam.metadata["thresholds"] == model.thresholds
    assert {"val_disease_auroc", "val_pe_auroc"} <= set(exam.metadata)

    evaluated = _evaluate(trio, exam, tmp_path / "evaluate")
    assert "exam_model" in evaluated["metrics.json"]["patient_rules"]["rows"]
    measured = {k for k in EXAM_SUMMARY_KEYS if evaluated["metrics.json"]["summary"][k] is not None}
    assert measured and measured <= set(evaluated["logged"]), "the KFP metrics view shows the exam figures"


def test_a_disabled_exam_step_writes_a_marker_that_evaluate_reads_as_no_exam_model(trio: dict[str, dsl.Artifact],
                                                                                    tmp_path: Path) -> None:
    exam = _train_exam(trio, CONFIG.replace("exam: {epochs: 5, patience: 5}", "exam: {enabled: false}"), tmp_path)
    assert exam.metadata == {"enabled": False}
    assert Path(exam.path).is_file(), "a file behind the output: kfp.local's cache skips entries without one"
    for given in (exam, None):
        evaluated = _evaluate(trio, given, tmp_path / f"evaluate-{given is None}")
        assert "patient_rules" not in evaluated["metrics.json"]
        assert not set(EXAM_SUMMARY_KEYS) & set(evaluated["metrics.json"]["summary"])

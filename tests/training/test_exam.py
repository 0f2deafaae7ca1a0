"""Training the exam model: it learns what the "any slice" rule cannot see (a finding that persists
along z), its labels are the project's patient truth, and ``train_exam`` runs end to end into a
model folder and an MLflow run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from factories import train_toy_pair

from pe_triage import schema as S
from pe_triage.config import (
    Config,
    EvalConfig,
    ExamConfig,
    LoaderConfig,
    ModelConfig,
    RegistryConfig,
    TrainConfig,
)
from pe_triage.evaluation.exam import EXAM, calibrate_exam, evaluate_exam
from pe_triage.models.exam import load_exam_model
from pe_triage.stats import auroc
from pe_triage.training.exam import Exams, exam_probabilities, exams, feature_columns, fit_exam, train_exam
from pe_triage.training.train import torch_threads


def _persistence_task(n: int, rng: np.random.Generator) -> Exams:
    """Exams of 10-20 slices, each with three slices carrying a finding (feature 0 high): positive
    exams have them adjacent, negative ones scattered. Per slice the two look alike."""
    seqs, y = [], []
    for i in range(n):
        t = int(rng.integers(10, 21))
        x = rng.normal(0, 0.1, (t, 3)).astype(np.float32)
        if i % 2:
            start = int(rng.integers(0, t - 2))
            where = [start, start + 1, start + 2]
        else:
            where = [int(v) for v in rng.choice(np.arange(0, t, 2), 3, replace=False)]  # never adjacent
        x[where, 0] += 1.0
        seqs.append(x)
        y.append(i % 2)
    targets = np.repeat(np.array(y, np.float32)[:, None], 2, 1)
    keys = [("s", f"p{i}") for i in range(n)]
    return Exams(keys, seqs, np.where(targets[:, 0] > 0, "pe", "wnl").astype(object), targets,
                 [np.full((len(s), 2), np.nan, np.float32) for s in seqs])


@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_exam_model_learns_persistence_that_the_any_rule_cannot_see(seed: int, threads: int) -> None:
    rng = np.random.default_rng(100 + seed)
    train, val, test = (_persistence_task(n, rng) for n in (160, 80, 100))
    y = test.targets[:, 0].astype(bool)
    any_rule = auroc(y, np.array([s[:, 0].max() for s in test.sequences]))
    with torch_threads(threads):
        net, history = fit_exam(train, val, ExamConfig(epochs=60, patience=60, lr=1e-2, slice_loss_weight=0.0, seed=seed))
    exam = auroc(y, exam_probabilities(net, test)[:, 0])
    assert any_rule is not None and exam is not None
    assert any_rule < 0.7, "the task is built so that no single slice tells the classes apart"
    assert exam > 0.9, f"exam model AUROC {exam:.3f} (any rule {any_rule:.3f})"
    assert len(history) <= 60


def test_exams_take_the_patient_truth_and_z_order() -> None:
    pred = pd.DataFrame({S.SITE: ["a"] * 5, S.PATIENT_ID: ["p", "p", "p", "q", "q"], S.SERIES_UID: ["s"] * 5,
                         S.SLICE_INDEX: [2, 0, 1, 0, 1], S.LABEL: ["pe", "wnl", "indeterminate", "wnl", "indeterminate"]})
    x = np.arange(5, dtype=np.float32)[:, None]
    data = exams(pred, x)
    assert data.keys == [("a", "p"), ("a", "q")]
    assert data.sequences[0][:, 0].tolist() == [1.0, 2.0, 0.0], "slices in slice_index order"
    assert list(data.truth) == ["pe", "indeterminate"]
    assert data.targets[0].tolist() == [1.0, 1.0]
    assert np.isnan(data.targets[1]).all(), "no exam label for an indeterminate patient"
    assert np.isnan(data.slice_targets[0][1]).all() and data.slice_targets[0][0].tolist() == [0.0, 0.0]


def test_feature_columns_select_embeddings_or_logits() -> None:
    assert feature_columns([3, 2], "all").tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert feature_columns([3, 2], "logits").tolist() == [3, 6]
    assert feature_columns([3, 2], "embeddings").tolist() == [0, 1, 2, 4, 5]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str, str, Config]:
    root = tmp_path_factory.mktemp("exam")
    config = Config(
        model=ModelConfig(arch="plain_cnn", width=0.25, context=1),
        loader=LoaderConfig(cache_dir=str(root / "cache"), augment=False),
        train=TrainConfig(windows=("vascular", "lung"), epochs=2, batch_size=8, lr=3e-3, num_workers=0, samples_per_epoch=32,
                          patience=0),
        evaluate=EvalConfig(bootstrap=50, gradcam_per_category=0),
        exam=ExamConfig(epochs=5, patience=5),
    )
    return (*train_toy_pair(root, config), config)


def test_train_exam_end_to_end(trained: tuple[str, str, str, str, Config], tmp_path: Path, mlflow_server: str) -> None:
    windows, splits, stage1, stage2, config = trained
    config = replace(config, registry=RegistryConfig(experiment="exam-e2e"))
    meta = train_exam(windows, splits, stage1, stage2, str(tmp_path / "exam"), config=config, tracking_uri=mlflow_server)
    model = load_exam_model(tmp_path / "exam")
    assert model.meta["exams"] == {"train": 6, "val": 4} == meta["exams"]
    assert set(model.thresholds) == {"disease", "pe"} and 1 <= len(meta["history"]) <= 5
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("exam-e2e").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = {f.path for f in client.list_artifacts(runs[0].info.run_id, "exam_model")}
    assert {"exam_model/exam.json", "exam_model/exam.pt"} <= logged

    rows = evaluate_exam(stage1, stage2, str(tmp_path / "exam"), windows, splits, split="test", config=config)
    assert set(rows) == {"any", "k_consecutive", "top_k_mean", EXAM}
    assert {r["patients"] for r in rows.values()} == {2}, "every row scores the same test patients"
    thresholds = calibrate_exam(stage1, stage2, str(tmp_path / "exam"), windows, splits, str(tmp_path / "cal"), config=config)
    assert load_exam_model(tmp_path / "cal").thresholds == thresholds

    other = tmp_path / "other"
    (other).mkdir()
    for name in ("model.json", "model.pt"):
        (other / name).write_bytes((Path(stage1) / name).read_bytes())
    with pytest.raises(ValueError, match="another stage 2 model"):
        evaluate_exam(stage1, str(other), str(tmp_path / "exam"), windows, splits, config=config)

"""A model version that carries the exam-level model (issue 21, item 3), against a real ``mlflow
server``: it round-trips through the registry and predict (the exam probabilities are the exam
model's on the training path's features of the same study), the rule "exam" makes the exam model
decide, tampered exam weights are refused at load and an exam model of another stage pair at
registration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factories import pseudo
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from test_integrity import put_artifact, run_files
from test_predict import stage_inputs, stage_model
from test_registry import write_metrics
from test_serve import hu_request, multipart

from pe_triage import schema as S
from pe_triage.artifact import load_model
from pe_triage.config import IngestConfig, RegistryConfig, ServeConfig
from pe_triage.evaluation.metrics import cascade_labels
from pe_triage.ingest import ingest_site
from pe_triage.models.exam import ExamNet, load_exam_model, save_exam_model
from pe_triage.predict import EXAM_P_DISEASE, EXAM_P_PE, DecisionRule, PredictError, Triage, triage_report
from pe_triage.provenance import file_digest
from pe_triage.registry.pyfunc import input_example
from pe_triage.registry.registry import (
    CHALLENGER,
    CHAMPION,
    EXAM_TAG,
    RegistryError,
    load_registered,
    promote,
    register,
)
from pe_triage.registry.serve import ModelHolder
from pe_triage.registry.serve_http import create_app
from pe_triage.windows import uint8_to_centred


def exam_model(out: Path, pair: tuple[str, str], thresholds: dict[str, float], *, seed: int = 0) -> Path:
    """A randomly initialised exam model over both stages' embeddings, recorded as trained on ``pair``."""
    dims = [int(load_model(p).model.head.in_features) for p in pair]
    torch.manual_seed(seed)
    net = ExamNet(sum(dims), arch="gru", hidden=8)
    stages = {str(n): {"weights": file_digest(Path(p) / "model.pt"), "model_json": file_digest(Path(p) / "model.json")}
              for n, p in enumerate(pair, start=1)}
    return save_exam_model(out, net, {"thresholds": thresholds, "features": "embeddings", "stages": stages})


def training_path_embeddings(pair: tuple[str, str], dicom: Path, work: Path) -> np.ndarray:
    """``[slices, D]`` in z order: each stage's ``embed`` of its own windows dataset (neighbours by
    hand, ends replicated, as ``test_predict.reference``), stage 1's columns first."""
    slices = work / "slices"
    ingest_site("site-a", str(dicom), str(slices), pseudo=pseudo("site-a"), config=IngestConfig(workers=1))
    parts = []
    for stage, path in enumerate(pair, start=1):
        model = load_model(path)
        _, x = stage_inputs(model, slices, work / f"windows-{stage}")
        with torch.inference_mode():
            parts.append(model.model.eval().embed(torch.from_numpy(uint8_to_centred(x))).numpy())
    return np.concatenate(parts, 1)


def exam_metrics(path: Path, rule: str) -> Path:
    """``write_metrics`` evaluated with the exam model under the triage rule ``rule`` (what the version
    then applies); the slice tables keep "any" then, as ``evaluation.evaluate`` writes them."""
    write_metrics(path)
    metrics = json.loads((path / "metrics.json").read_text())
    rules = {"calibration": "val", "evaluated": "test", "triage_rule": rule, "rows": {}}
    (path / "metrics.json").write_text(json.dumps(metrics | {"patient_rules": rules}))
    return path


def test_a_version_with_an_exam_model_round_trips_through_the_registry_and_predict(
        mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], study: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc

    plain = Triage.load(*pair).predict_dicom(str(study))[0]
    rule_says = plain["study_triage"].iloc[0]
    probe = load_exam_model(exam_model(tmp_path / "probe", pair, {"disease": 0.5, "pe": 0.5}))
    direct = probe.predict_proba([training_path_embeddings(pair, study, tmp_path / "reference")])[0]
    # thresholds under which the exam model decides otherwise than the slice rule does
    halves = {"disease": float(direct[0]) / 2, "pe": float(direct[1]) / 2}
    thresholds = {"disease": 1.5, "pe": 1.5} if rule_says != "wnl" else halves
    exam_says = str(cascade_labels(direct[:1], direct[1:], thresholds["disease"], thresholds["pe"])[0])
    assert exam_says != rule_says
    exam = str(exam_model(tmp_path / "exam", pair, thresholds))

    v1 = register(*pair, str(exam_metrics(tmp_path / "m1", "any")), config=cfg, uri=mlflow_server, exam=exam)
    client = MlflowClient(mlflow_server)
    tag = json.loads(client.get_model_version(cfg.model_name, "1").tags[EXAM_TAG])
    assert tag == {"arch": "gru", "features": "embeddings", "thresholds": thresholds}
    card = Path(client.download_artifacts(v1["run_id"], "model_card.md", str(tmp_path))).read_text()
    assert "Exam-level model: `gru`" in card
    triage, version = load_registered(f"models:/{cfg.model_name}@{CHALLENGER}", uri=mlflow_server)
    assert version == v1["version"] == 1 and triage.exam is not None
    frame = triage.predict_dicom(str(study))[0]
    np.testing.assert_allclose(frame[EXAM_P_DISEASE], direct[0], atol=1e-5)
    np.testing.assert_allclose(frame[EXAM_P_PE], direct[1], atol=1e-5)
    np.testing.assert_allclose(frame[S.P_DISEASE], plain[S.P_DISEASE], atol=1e-6)  # the slice scores are unchanged
    (by_rule,) = triage_report(frame, triage, model="v1")["studies"]
    assert by_rule["triage"] == rule_says and by_rule["decided_by"] == "rule"
    assert by_rule["exam"][S.P_DISEASE] == pytest.approx(direct[0], abs=1e-5)

    register(*pair, str(exam_metrics(tmp_path / "m2", "exam")), config=cfg, uri=mlflow_server, exam=exam)
    triage, _ = load_registered(f"models:/{cfg.model_name}/2", uri=mlflow_server)
    frame = triage.predict_dicom(str(study))[0]
    (by_exam,) = triage_report(frame, triage, model="v2")["studies"]
    assert by_exam["triage"] == exam_says and by_exam["decided_by"] == "exam_model"
    assert set(frame["study_triage"]) == {exam_says}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("PE_TRIAGE_ALLOWED_PREFIXES", str(study))
    served = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}/2").predict(pd.DataFrame({"dicom_path": [str(study)]}))
    np.testing.assert_allclose(served[EXAM_P_PE], direct[1], atol=1e-5)
    assert set(served["study_triage"]) == {exam_says}


def test_tampered_exam_weights_are_refused_at_load(mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str],
                                                   tmp_path: Path) -> None:
    exam = exam_model(tmp_path / "exam", pair, {"disease": 0.5, "pe": 0.5})
    v1 = register(*pair, str(write_metrics(tmp_path / "m")), config=cfg, uri=mlflow_server, exam=str(exam))
    client = MlflowClient(mlflow_server)
    (weights,) = [f for f in run_files(client, v1["run_id"], "model") if f.endswith("/exam.pt")]
    other = exam_model(tmp_path / "other", pair, {"disease": 0.5, "pe": 0.5}, seed=1)  # valid weights, not the registered
    put_artifact(mlflow_server, client, v1["run_id"], weights, (other / "exam.pt").read_bytes())
    with pytest.raises(RegistryError, match=rf"version 1 .*{weights} \(digest differs\)"):
        load_registered(f"models:/{cfg.model_name}/1", uri=mlflow_server)


def test_an_exam_model_of_another_stage_pair_is_refused_at_register(
        mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path) -> None:
    other = str(stage_model(tmp_path / "other-stage1", 1, threshold=0.45, seed=3, context=1)), pair[1]
    exam = exam_model(tmp_path / "exam", other, {"disease": 0.5, "pe": 0.5})
    with pytest.raises(RegistryError, match="exam model .*another stage 1 model"):
        register(*pair, str(write_metrics(tmp_path / "m")), config=cfg, uri=mlflow_server, exam=str(exam))
    assert MlflowClient(mlflow_server).search_model_versions(f"name='{cfg.model_name}'") == []


def test_the_exam_rule_needs_an_exam_model(mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str],
                                           tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match='rule is "exam" but no exam model'):
        register(*pair, str(exam_metrics(tmp_path / "m", "exam")), config=cfg, uri=mlflow_server)
    with pytest.raises(PredictError, match='rule "exam" needs an exam model'):
        Triage.load(*pair, rule=DecisionRule("exam"))


def test_the_service_answers_with_the_exam_figures(mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str],
                                                   study: Path, tmp_path: Path) -> None:
    exam = exam_model(tmp_path / "exam", pair, {"disease": 0.5, "pe": 0.5})
    register(*pair, str(write_metrics(tmp_path / "m")), config=cfg, uri=mlflow_server, exam=str(exam))
    assert promote(config=cfg, uri=mlflow_server)["outcome"] == "promoted"
    holder = ModelHolder(f"models:/{cfg.model_name}@{CHAMPION}", tracking_uri=mlflow_server, registry=cfg, device="cpu")
    assert holder.refresh() and holder.current is not None
    client, triage = TestClient(create_app(holder, ServeConfig(), IngestConfig())), holder.current.triage
    files = sorted(study.rglob("*.dcm"))
    response = client.post("/v1/triage", files=multipart(files))
    assert response.status_code == 200, response.text
    frame = triage.predict_dicom([str(p) for p in files])[0]
    (answer,) = response.json()["studies"]
    assert answer["exam"][S.P_PE] == pytest.approx(frame[EXAM_P_PE].iloc[0], abs=1e-5) and answer["decided_by"] == "rule"
    assert response.json()["exam_model"]["thresholds"] == {"disease": 0.5, "pe": 0.5}
    example = pd.concat([input_example().assign(slice_index=i) for i in range(3)], ignore_index=True)
    got = pd.DataFrame(client.post("/invocations", json=hu_request(example)).json()["predictions"])
    np.testing.assert_allclose(got[EXAM_P_DISEASE], triage.predict_slices(example)[EXAM_P_DISEASE], atol=1e-6)

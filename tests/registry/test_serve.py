"""``pe-triage serve``'s HTTP API (issue 18, items 2 and 3) under FastAPI's TestClient, on versions
registered on the real MLflow server: readiness only after load + warm-up, the scoring protocol, DICOM
studies, limits, JSON errors that never echo the request, and the swap when the alias moves."""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from test_predict import stage_model
from test_registry import write_metrics

from pe_triage.cli import main
from pe_triage.config import ConfigError, IngestConfig, RegistryConfig, ServeConfig, SynthConfig
from pe_triage.predict import Triage, triage_report
from pe_triage.registry.pyfunc import input_example
from pe_triage.registry.registry import CHAMPION, promote, register
from pe_triage.registry.serve import ModelHolder
from pe_triage.registry.serve_http import create_app
from pe_triage.synth import generate_cohort

UID, NAME = "1.2.826.0.1.3680043.99.424242", "Doe^Jane"  # PHI-like markers a bad request carries


@pytest.fixture(scope="module")
def champion(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[RegistryConfig, tuple[str, str], Path]:
    """A model whose version 1 (stage 1 2.5-D) is champion; (its config, the stage pair, a work folder)."""
    root = tmp_path_factory.mktemp("serve")
    name = f"pe-triage-{uuid.uuid4().hex[:8]}"
    cfg = RegistryConfig(model_name=name, experiment=name, wheel_cache=str(root / "wheels"))
    pair = (str(stage_model(root / "stage1", 1, threshold=0.45, context=1)), str(stage_model(root / "stage2", 2, threshold=0.5)))
    register(*pair, str(write_metrics(root / "m1")), config=cfg, uri=mlflow_server)
    assert promote(config=cfg, uri=mlflow_server)["outcome"] == "promoted"
    return cfg, pair, root


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-cohort")
    generate_cohort(root, SynthConfig(sites=1, patients_per_site=1, slices=8, size=96, seed=5))
    return sorted((root / "sites" / "site-a" / "dicom").rglob("*.dcm"))


def holder_for(cfg: RegistryConfig, uri: str) -> ModelHolder:
    return ModelHolder(f"models:/{cfg.model_name}@{CHAMPION}", tracking_uri=uri, registry=cfg, device="cpu")


def client_for(holder: ModelHolder, **serve: object) -> TestClient:
    return TestClient(create_app(holder, ServeConfig(**serve), IngestConfig()))  # type: ignore[arg-type]


def server_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the server side logged (httpx, the test's client, logs the URLs it requests)."""
    return "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records if not r.name.startswith("httpx"))


def multipart(files: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{n}.dcm", f.read_bytes(), "application/dicom")) for n, f in enumerate(files)]


def hu_request(frame: pd.DataFrame) -> dict:
    """MLflow's ``dataframe_split`` JSON, binary columns base64 (what ``mlflow models serve`` takes)."""
    data = frame.assign(hu=[base64.b64encode(b).decode() for b in frame["hu"]])
    return {"dataframe_split": json.loads(data.to_json(orient="split", index=False))}


@pytest.fixture(scope="module")
def served(champion: tuple[RegistryConfig, tuple[str, str], Path], mlflow_server: str) -> ModelHolder:
    holder = holder_for(champion[0], mlflow_server)
    assert holder.refresh()
    return holder


def test_ready_only_after_the_model_is_loaded_and_warmed(champion: tuple, mlflow_server: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    holder = holder_for(champion[0], mlflow_server)
    client = client_for(holder)
    health_while_warming: list[int] = []
    real = Triage.predict_slices

    def warming(self: Triage, frame: pd.DataFrame) -> pd.DataFrame:
        health_while_warming.append(client.get("/health").status_code)
        return real(self, frame)

    monkeypatch.setattr(Triage, "predict_slices", warming)
    assert client.get("/ping").status_code == 200
    before = client.get("/health")
    assert before.status_code == 503 and before.json() == {"status": "not_ready", "reason": "the model is loading"}
    early = client.post("/v1/triage", content=b"x", headers={"content-type": "application/dicom"})
    assert early.status_code == 503 and early.json()["error_code"] == "not_ready"
    assert holder.refresh() and not holder.refresh()  # the second poll finds the alias where it was
    assert health_while_warming == [503]  # one warm-up inference, before the model is served
    after = client.get("/health")
    assert after.status_code == 200 and after.json() == {"status": "ready", "model_version": 1}
    assert client.get("/version").json() == {"model_name": champion[0].model_name, "model_version": 1, "alias": CHAMPION,
                                             "package_version": "0.1.0", "device": "cpu"}


def test_invocations_speaks_mlflows_protocol(served: ModelHolder) -> None:
    example = pd.concat([input_example().assign(slice_index=i) for i in range(3)], ignore_index=True)
    response = client_for(served).post("/invocations", json=hu_request(example))
    assert response.status_code == 200, response.text
    got = pd.DataFrame(response.json()["predictions"])
    expected = served.current.triage.predict_slices(example)  # type: ignore[union-attr]
    assert got["triage"].tolist() == expected["triage"].tolist()
    assert got["p_pe"].to_numpy() == pytest.approx(expected["p_pe"].to_numpy(), abs=1e-6)
    records = {"dataframe_records": hu_request(example)["dataframe_split"]["data"]}
    assert client_for(served).post("/invocations", json=records).status_code == 400  # records need column names
    columns = hu_request(example)["dataframe_split"]["columns"]
    rows = hu_request(example)["dataframe_split"]["data"]
    by_name = {"dataframe_records": [dict(zip(columns, row, strict=True)) for row in rows]}
    assert pd.DataFrame(client_for(served).post("/invocations", json=by_name).json()["predictions"])["triage"].tolist() == \
        expected["triage"].tolist()


def test_a_dicom_study_is_triaged_as_predict_does_and_nothing_identifies_it(
        served: ModelHolder, study: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    response = client_for(served).post("/v1/triage", files=multipart(study))
    assert response.status_code == 200, response.text
    report = response.json()
    triage = served.current.triage  # type: ignore[union-attr]
    per_slice, summary = triage.predict_dicom([str(p) for p in study])
    expected = triage_report(per_slice, triage, model="x", input_summary=summary)
    assert [s["triage"] for s in report["studies"]] == [s["triage"] for s in expected["studies"]]
    assert report["studies"][0]["series"] == expected["studies"][0]["series"]
    assert report["studies"][0]["study"] == "study-1" and report["studies"][0]["slices"] == len(study)
    assert report["input"]["files"]["quarantined"] == 0 and report["model_version"] == 1
    timings = report["timings_ms"]
    assert set(timings) == {"receive", "decode", "crop", "model", "predict", "report", "total"}
    assert timings["decode"] + timings["crop"] + timings["model"] <= timings["predict"] + 3 <= timings["total"] + 3
    ds = pydicom.dcmread(study[0])
    for secret in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, str(ds.PatientName), ds.PatientID):
        assert secret not in response.text and secret not in server_log(caplog)
    assert f"POST /v1/triage 200 slices={len(study)}" in server_log(caplog)

    one = client_for(served).post("/v1/triage", content=study[3].read_bytes(), headers={"content-type": "application/dicom"})
    assert one.status_code == 200 and one.json()["studies"][0]["slices"] == 1


def test_limits_and_errors_are_json_with_the_real_message_and_echo_nothing(
        served: ModelHolder, study: list[Path], caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    client = client_for(served, max_body_mb=1, max_slices=4)
    phi = f"{UID} {NAME}".encode()

    def refused(response, status: int, code: str) -> str:  # type: ignore[no-untyped-def]
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error_code", "message"} and body["error_code"] == code
        assert UID not in response.text and NAME not in response.text
        return str(body["message"])

    assert "serve.max_body_mb" in refused(client.post("/v1/triage", content=phi + bytes(2 << 20),
                                                      headers={"content-type": "application/dicom"}), 413, "body_too_large")
    def chunks():  # type: ignore[no-untyped-def]  # no Content-Length: counted as it streams in
        yield phi
        for _ in range(3):
            yield bytes(1 << 20)

    refused(client.post("/v1/triage", content=chunks(), headers={"content-type": "application/dicom"}), 413, "body_too_large")
    boundary = "b0undary"
    chunked_multipart = client.post("/v1/triage", content=(f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; "
                                                           f"filename=\"{NAME}.dcm\"\r\n\r\n".encode() + c for c in chunks()),
                                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    refused(chunked_multipart, 413, "body_too_large")
    assert "serve.max_slices" in refused(client.post("/v1/triage", files=multipart(study[:5])), 413, "too_many_slices")
    big = pd.concat([input_example().assign(slice_index=i) for i in range(5)], ignore_index=True)
    assert "serve.max_slices" in refused(client.post("/invocations", json=hu_request(big)), 413, "too_many_slices")
    bad = refused(client.post("/v1/triage", files=[("file", ("x.dcm", b"DICM" + phi, "application/dicom"))]), 400, "bad_input")
    assert bad.startswith("no CT slices in the input: 1 file(s) seen, 1 quarantined")
    assert "allowed input prefixes" in refused(client.post("/invocations", json={"dataframe_split": {
        "columns": ["dicom_path"], "data": [[f"/etc/{NAME}"]]}}), 403, "input_not_allowed")
    refused(client.post("/invocations", content=b'{"dataframe_split": ' + phi, headers={"content-type": "application/json"}),
            400, "bad_json")
    refused(client.post("/invocations", json={"dataframe_split": {"columns": [UID], "data": [[NAME]]}}), 400, "bad_input")
    refused(client.post("/invocations", content=phi, headers={"content-type": "text/csv"}), 415, "unsupported_media_type")
    refused(client.post("/v1/triage", files=[("note", (None, NAME.encode()))]), 400, "bad_multipart")  # no filename
    refused(client.get(f"/{UID}"), 404, "http_error")
    logged = server_log(caplog)
    assert UID not in logged and NAME not in logged
    assert "POST /v1/triage 413" in logged and "GET (no route) 404" in logged and "POST /invocations 403" in logged


def test_a_moved_alias_is_picked_up_in_flight_requests_finish_on_the_old_model_and_busy_gets_503(
        champion: tuple, mlflow_server: str, study: list[Path]) -> None:
    cfg, pair, root = champion
    holder = holder_for(cfg, mlflow_server)
    assert holder.refresh()
    client = client_for(holder, max_concurrency=1)
    entered, release = threading.Event(), threading.Event()
    old = holder.current.triage  # type: ignore[union-attr]
    real = old.predict_dicom

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(60)
        return real(*args, **kwargs)

    old.predict_dicom = slow  # type: ignore[method-assign]
    results: list = []
    first = threading.Thread(target=lambda: results.append(client.post("/v1/triage", files=multipart(study))))
    first.start()
    assert entered.wait(60)
    busy = client.post("/v1/triage", files=multipart(study))
    assert busy.status_code == 503 and busy.json()["error_code"] == "busy" and busy.headers["retry-after"] == "10"

    register(*pair, str(write_metrics(root / "m2", pe=0.96)), config=cfg, uri=mlflow_server)
    assert promote(2, config=cfg, uri=mlflow_server)["outcome"] == "promoted"
    assert holder.refresh() and client.get("/version").json()["model_version"] == 2
    release.set()
    first.join(60)
    assert results[0].status_code == 200 and results[0].json()["model_version"] == 1  # started on version 1
    assert client.post("/v1/triage", files=multipart(study)).json()["model_version"] == 2

    # a version the alias is moved to by hand has no recorded decision: refused, version 2 keeps serving
    register(*pair, str(write_metrics(root / "m3", pe=0.97)), config=cfg, uri=mlflow_server)
    MlflowClient(mlflow_server).set_registered_model_alias(cfg.model_name, CHAMPION, "3")
    assert not holder.refresh()
    assert client.get("/health").status_code == 200 and client.get("/version").json()["model_version"] == 2


def test_bad_settings_and_a_bad_model_uri_are_refused_before_serving(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_concurrency"):
        ServeConfig(max_concurrency=0)
    with pytest.raises(ConfigError, match="serve.port"):
        ServeConfig(port=70000)
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--port", "1"]) == 2

"""End to end (issue 18, "must show"): ``pe-triage serve`` as a real process on a version registered on
the real MLflow server, triaging the real LIDC series sent as DICOM files; the champion moved and
picked up; a path outside the allow-list and an oversized request refused with clear 4xx; no UID or
patient field of the study in any response or in the server's log."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import pydicom
import pytest
import requests
import yaml
from test_predict import stage_model
from test_registry import write_metrics

from pe_triage.config import RegistryConfig
from pe_triage.registry.registry import promote, register
from pe_triage.registry.server import free_port

pytestmark = pytest.mark.slow


class Service(NamedTuple):
    url: str
    cfg: RegistryConfig
    pair: tuple[str, str]
    log_file: Path
    proc: subprocess.Popen


def identifiers(files: list[Path]) -> set[str]:
    """Every UID and patient field of the series (what must never come back)."""
    found: set[str] = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        found |= {ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, str(ds.get("PatientID", "")),
                  str(ds.get("PatientName", ""))}
    return {v for v in found if len(v) >= 4}


def wait_for(url: str, ok: object, timeout_s: float) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = requests.get(url, timeout=5)
            if ok(response):  # type: ignore[operator]
                return response
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"{url}: no expected answer in {timeout_s} s"
        time.sleep(0.5)


@pytest.fixture
def service(mlflow_server: str, tmp_path: Path) -> Iterator[Service]:
    """Version 1 champion and ``pe-triage serve`` on it."""
    name = f"pe-triage-{uuid.uuid4().hex[:8]}"
    cfg = RegistryConfig(model_name=name, experiment=name, wheel_cache=str(tmp_path / "wheels"))
    pair = (str(stage_model(tmp_path / "stage1", 1, threshold=0.45, context=1)),
            str(stage_model(tmp_path / "stage2", 2, threshold=0.5)))
    register(*pair, str(write_metrics(tmp_path / "m1")), config=cfg, uri=mlflow_server)
    assert promote(config=cfg, uri=mlflow_server)["outcome"] == "promoted"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"registry": {"model_name": name, "experiment": name},
                                      "serve": {"max_body_mb": 200, "reload_poll_s": 300,
                                                "allowed_prefixes": [str(tmp_path / "exports")]}}))
    port, log_file = free_port(), tmp_path / "serve.log"
    exe = shutil.which("pe-triage", path=os.path.dirname(sys.executable)) or "pe-triage"
    with ExitStack() as stack:
        out = stack.enter_context(open(log_file, "wb"))
        proc = subprocess.Popen([exe, "serve", "--config", str(config), "--port", str(port), "--tracking-uri", mlflow_server],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
        try:
            yield Service(f"http://127.0.0.1:{port}", cfg, pair, log_file, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_the_service_end_to_end(service: Service, mlflow_server: str, real_ct: Path, tmp_path: Path) -> None:
    url, cfg, pair, log_file, proc = service
    assert wait_for(f"{url}/health", lambda r: r.status_code == 200, 180).json()["model_version"] == 1
    files = sorted((real_ct / "lidc-idri-0002").glob("*.dcm"))
    secrets = identifiers(files)
    with ExitStack() as stack:
        parts = [("file", (f"{n}.dcm", stack.enter_context(open(f, "rb")), "application/dicom")) for n, f in enumerate(files)]
        response = requests.post(f"{url}/v1/triage", files=parts, timeout=600)
    assert response.status_code == 200, response.text
    report = response.json()
    study = report["studies"][0]
    assert len(report["studies"]) == 1 and study["study"] == "study-1" and study["triage"] in ("wnl", "other", "pe")
    rows = [s for series in study["series"] for s in series["slices"]]
    assert len(rows) == study["slices"] == len(files) - report["input"]["files"]["quarantined"] > 200
    assert report["model_version"] == 1 and {"p_disease", "p_pe", "triage"} <= set(rows[0])
    responses = [response.text]

    register(*pair, str(write_metrics(tmp_path / "m2", pe=0.96)), config=cfg, uri=mlflow_server)
    assert promote(2, config=cfg, uri=mlflow_server)["outcome"] == "promoted"
    proc.send_signal(signal.SIGHUP)  # the poll period is 300 s: only the signal makes this quick
    assert wait_for(f"{url}/version", lambda r: r.json()["model_version"] == 2, 120).json()["alias"] == "champion"

    outside = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["dicom_path"],
                                                                            "data": [[str(real_ct / "lidc-idri-0002")]]}})
    assert outside.status_code == 403 and outside.json()["error_code"] == "input_not_allowed"
    assert "outside the 1 allowed input prefix" in outside.json()["message"]
    connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    connection.putrequest("POST", "/v1/triage")
    connection.putheader("Content-Type", "application/dicom")
    connection.putheader("Content-Length", str(300 << 20))  # 300 MiB declared: refused before it is sent
    connection.endheaders(files[0].read_bytes())
    oversized = connection.getresponse()
    body = json.loads(oversized.read())
    assert oversized.status == 413 and body["error_code"] == "body_too_large" and "200 MiB" in body["message"]
    responses += [outside.text, json.dumps(body)]

    logged = log_file.read_text()
    assert "POST /v1/triage 200 slices=" in logged and "serving" in logged
    leaked = [s for s in secrets if any(s in text for text in [*responses, logged])]
    assert leaked == []

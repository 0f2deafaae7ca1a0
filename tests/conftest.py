"""Shared fixtures: the real sample data and a real S3 endpoint."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import pseudo

from pe_triage.config import IngestConfig, SynthConfig
from pe_triage.ingest import ingest_site
from pe_triage.registry.server import free_port
from pe_triage.synth import generate_cohort

pytest_plugins = ["mlflow_fixtures"]

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct"


@pytest.fixture(scope="session")
def real_ct() -> Path:
    if not REAL_CT.is_dir():
        pytest.fail(f"real CT samples missing at {REAL_CT} (CI always has ../shared)")
    return REAL_CT


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint (moto server mode) on loopback, with the AWS environment pointing at it."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    assert exe, "moto_server not installed (pip install 'moto[server]')"
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1"
    )
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def onboarded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, dict]]:
    """A small synthetic 3-site cohort, ingested: (cohort folder, slices dataset, ingest reports)."""
    root = tmp_path_factory.mktemp("synth")
    config = SynthConfig(sites=3, patients_per_site=4, slices=24, size=96, seed=7)
    generate_cohort(root / "cohort", config)
    reports = {}
    for site_dir in sorted((root / "cohort" / "sites").iterdir()):
        site = site_dir.name
        reports[site] = ingest_site(site, str(site_dir / "dicom"), str(root / "slices"), pseudo=pseudo(site),
                                    labels=str(site_dir / "labels.csv"), config=IngestConfig(workers=2))
    return root / "cohort", root / "slices", reports


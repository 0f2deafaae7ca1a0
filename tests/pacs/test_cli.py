"""``pe-triage predict --dicomweb URL --study UID --stow`` against a real Orthanc: the JSON report as
for folders, the SR back in the PACS with the same triage, and the study UID never logged."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from dicomweb_client import DICOMwebClient
from factories import write_series
from pacs.pacs_servers import upload
from pacs.test_study import finding
from test_predict import edited, stage_model

from pe_triage.pacs import study_tag
from pe_triage.predict import Triage
from pe_triage.registry.cli import add_commands
from pe_triage.registry.pyfunc import MODEL_CODE, STAGE1, STAGE2, TRIAGE_CONFIG

STUDY = "1.2.826.0.1.3680043.10.1234.66"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pe-triage")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture(scope="module")
def composite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local composite model folder as ``save_composite`` lays it out (MLmodel + artifacts), built
    by hand: the wheel and MLflow's own files are not read by ``predict``."""
    root = tmp_path_factory.mktemp("pacs-composite")
    artifacts = root / "artifacts"
    pair = stage_model(artifacts / STAGE1, 1), stage_model(artifacts / STAGE2, 2)
    for path in pair:
        edited(path, path, threshold=0.0)
    (artifacts / "triage.json").write_text(json.dumps(Triage.load(*pair).config()))
    shutil.copy(MODEL_CODE, root / MODEL_CODE.name)
    flavor = {"model_code_path": MODEL_CODE.name,
              "artifacts": {key: {"path": f"artifacts/{name}"} for key, name in
                            ((STAGE1, STAGE1), (STAGE2, STAGE2), (TRIAGE_CONFIG, "triage.json"))}}
    (root / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": flavor}}))
    return root


def test_predict_over_dicomweb_stores_the_sr_back(composite: Path, orthanc: str, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    upload(orthanc, write_series(tmp_path / "study", 4, size=96, study=STUDY, series=f"{STUDY}.1"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"pacs": {"outbox": str(tmp_path / "outbox"), "disclaimer": "SITE TEXT"}}))
    caplog.set_level(logging.DEBUG)
    report = tmp_path / "report.json"
    assert cli("predict", "--model", str(composite), "--dicomweb", f"{orthanc}/dicom-web", "--study", STUDY,
               "--stow", "--out", str(report), "--config", str(config)) == 0
    triage = json.loads(report.read_text())["studies"][0]["triage"]
    client = DICOMwebClient(f"{orthanc}/dicom-web")
    sr_series = [s["0020000E"]["Value"][0] for s in client.search_for_series(study_instance_uid=STUDY)
                 if s["00080060"]["Value"][0] == "SR"]
    sr = client.retrieve_series(STUDY, sr_series[0])[0]
    assert finding(sr) == {"pe": "PE suspected", "other": "Other disease", "wnl": "No finding"}[triage]
    assert "SITE TEXT" in {str(i.TextValue) for i in sr.ContentSequence if i.ValueType == "TEXT"}
    assert STUDY not in caplog.text + report.read_text() and study_tag(STUDY) in caplog.text


def test_stow_without_dicomweb_is_refused(composite: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cli("predict", "--model", str(composite), "--dicom", str(tmp_path), "--stow") == 2
    assert "--study and --stow go with --dicomweb" in caplog.text

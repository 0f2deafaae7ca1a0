"""``pe-triage predict --dicomweb URL --study UID --stow`` against a real Orthanc: the JSON report as
for folders, the SR back in the PACS with the same triage, and the study UID never logged."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import yaml
from dicomweb_client import DICOMwebClient
from factories import write_series
from pacs.pacs_servers import upload
from pacs.test_study import finding

from pe_triage.pacs import study_tag
from pe_triage.registry.cli import add_commands

STUDY = "1.2.826.0.1.3680043.10.1234.66"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pe-triage")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


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

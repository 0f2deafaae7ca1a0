"""Fixtures of the PACS tests: a Triage that flags every slice, a real Orthanc, and one that refuses
objects (helpers in ``pacs_servers``), and a local composite model folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pacs.pacs_servers import FILTER, start_orthanc, stop, tiny_triage
from test_predict import edited, stage_model

from pe_triage.predict import Triage
from pe_triage.registry.pyfunc import MODEL_CODE, STAGE1, STAGE2, TRIAGE_CONFIG


@pytest.fixture(scope="session")
def flagging(tmp_path_factory: pytest.TempPathFactory) -> Triage:
    return tiny_triage(tmp_path_factory.mktemp("pacs-flagging"), 0.0)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a running Orthanc (its DICOMweb root is ``URL/dicom-web``)."""
    proc, url = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield url
    stop(proc)


@pytest.fixture(scope="session")
def rejecting_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An Orthanc that refuses objects of :data:`REJECTED_INSTITUTION`."""
    proc, url = start_orthanc(tmp_path_factory.mktemp("orthanc-rejecting"), lua=FILTER)
    yield url
    stop(proc)


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

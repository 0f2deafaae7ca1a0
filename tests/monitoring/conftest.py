"""Fixtures of the monitoring tests: a tiny triage model (every slice flagged) as an object and as
a local composite model folder (``pe-triage predict/serve --model FOLDER``), and a DICOM study whose
identifiers a record must not carry."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import write_series
from pacs.conftest import composite  # noqa: F401 - the local composite model folder, as the PACS tests build it
from pacs.pacs_servers import tiny_triage

from pe_triage.predict import Triage

STUDY, PATIENT, NAME = "1.2.826.0.1.3680043.10.1234.5151", "PAT-MONITOR-77", "DOE^JANE"
#: acquisition fields the study carries, which a record must keep
ACQUISITION = {"Manufacturer": "ACME MEDICAL", "ConvolutionKernel": "FC52", "KVP": 100.0}


@pytest.fixture(scope="session")
def flagging(tmp_path_factory: pytest.TempPathFactory) -> Triage:
    return tiny_triage(tmp_path_factory.mktemp("monitor-flagging"), 0.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("monitor-study") / "PAT-MONITOR-77_DOE"
    return write_series(folder, 4, size=96, study=STUDY, series=f"{STUDY}.1", patient=PATIENT, **ACQUISITION)

"""Fixtures of the PACS tests: a Triage that flags every slice, a real Orthanc, and one that refuses
objects (helpers in ``pacs_servers``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pacs.pacs_servers import FILTER, start_orthanc, stop, tiny_triage

from pe_triage.predict import Triage


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

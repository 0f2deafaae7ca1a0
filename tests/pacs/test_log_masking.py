"""urllib3 serves the whole process, so importing the PACS code must not silence it: its messages
keep coming, with any DICOM UID in them masked."""

from __future__ import annotations

import logging

import pytest

import pe_triage.pacs  # noqa: F401 (installs the mask)


def test_urllib3_warnings_stay_and_lose_their_uids(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("urllib3.connectionpool")
    log.warning("Retrying after connection broken: %s", "/dicom-web/studies/1.2.826.0.1.3680043.10.99/series")
    log.warning("Connection pool is full, discarding connection: %s", "127.0.0.1")
    assert [r.getMessage() for r in caplog.records] == [
        "Retrying after connection broken: /dicom-web/studies/<uid>/series",
        "Connection pool is full, discarding connection: 127.0.0.1"]
    assert logging.getLogger("urllib3").getEffectiveLevel() <= logging.WARNING

"""``pe-triage listen`` end to end, as a real subprocess: a pynetdicom SCU sends the real LIDC series,
the listener triages it after the quiet period and C-STOREs the SR and key image to a real Orthanc;
the same study sent again makes no second SR; a caller not allowed is rejected; the log names the
study by its pseudonym only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml
from dicomweb_client import DICOMwebClient
from pacs.pacs_servers import start_orthanc, stop
from pacs.test_listen_scp import free_port
from pacs.test_study import finding
from pydicom import Dataset, dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from pe_triage.pacs import study_tag

UID_ROOT = "1.2.826.0.1.3680043.10.1234."


@pytest.fixture(scope="module")
def own_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """An Orthanc of this module only (counts of SRs start at zero): base URL and DICOM port."""
    proc, url = start_orthanc(tmp_path_factory.mktemp("orthanc-listen"))
    yield url, int(requests.get(f"{url}/system", timeout=10).json()["DicomPort"])
    stop(proc)


def send(port: int, calling: str, datasets: list[Dataset]) -> list[int]:
    """C-STORE ``datasets`` to the listener as ``calling``; [] when the association is refused."""
    scu = AE(ae_title=calling)
    for syntax in sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        scu.add_requested_context(CTImageStorage, syntax)
    assoc = scu.associate("127.0.0.1", port, ae_title="PE-TRIAGE")
    if not assoc.is_established:
        return []
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def echo(port: int) -> bool:
    """Whether the listener answers a C-ECHO."""
    scu = AE(ae_title="SCANNER")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port, ae_title="PE-TRIAGE")
    if not assoc.is_established:
        return False
    answered = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return answered


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s:.0f} s; listener log:\n{log.read_text()[-3000:]}")
        time.sleep(1.0)


def results(url: str, study: str) -> dict[str, list[str]]:
    """The study's SR and key image (OT) instances in Orthanc, by modality (QIDO-RS)."""
    found: dict[str, list[str]] = {"SR": [], "OT": []}
    for item in DICOMwebClient(f"{url}/dicom-web").search_for_instances(study_instance_uid=study):
        modality = item.get("00080060", {}).get("Value", [""])[0]
        if modality in found:
            found[modality].append(item["00080018"]["Value"][0])
    return found


@pytest.mark.slow
def test_listen_triages_a_received_study_once_per_version(composite: Path,  # noqa: F811
                                                          own_orthanc: tuple[str, int], real_ct: Path,
                                                          tmp_path: Path) -> None:
    url, orthanc_port = own_orthanc
    port = free_port()
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({
        "pacs": {"uid_root": UID_ROOT},
        "listen": {"ae_title": "PE-TRIAGE", "port": port, "allowed_calling_aes": ["SCANNER"], "quiet_s": 3.0,
                   "spool": str(tmp_path / "spool"), "destination_ae": "ORTHANC", "destination_host": "127.0.0.1",
                   "destination_port": orthanc_port, "retries": 2, "backoff_s": 1.0}}))
    log = tmp_path / "listen.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pe_triage.cli", "listen", "--model", str(composite),
                                 "--config", str(config), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        datasets = [dcmread(p) for p in sorted((real_ct / "lidc-idri-0002").glob("*.dcm"))]
        study = str(datasets[0].StudyInstanceUID)
        wait_for("the listener answering", lambda: echo(port), 120, log)
        assert send(port, "INTRUDER", datasets[:1]) == []  # rejected at association
        assert send(port, "SCANNER", datasets) == [0] * len(datasets)
        wait_for("the SR in Orthanc", lambda: bool(results(url, study)["SR"]), 600, log)
        first = results(url, study)
        assert len(first["SR"]) == 1 and len(first["OT"]) == 1  # every slice is flagged: a key image too
        sr = DICOMwebClient(f"{url}/dicom-web").retrieve_instance(study, _series_of(url, study, "SR"), first["SR"][0])
        assert finding(sr) == "PE suspected" and sr.SOPInstanceUID.startswith(UID_ROOT)

        assert send(port, "SCANNER", datasets) == [0] * len(datasets)  # the PACS sends the study again
        state = tmp_path / "spool" / study_tag(study) / "state.json"
        wait_for("the resent study settled", lambda: "not triaged again" in log.read_text(), 120, log)
        assert json.loads(state.read_text())["sent_versions"] == ["unregistered"]
        assert results(url, study) == first
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    logged = log.read_text()
    assert study_tag(study) in logged and "association from calling AE 'INTRUDER' rejected" in logged
    first_ds = datasets[0]
    identifiers = [study, str(first_ds.SeriesInstanceUID), str(first_ds.PatientID), str(first_ds.PatientName),
                   str(first_ds.SOPInstanceUID)]
    assert [i for i in identifiers if i and i in logged] == []


def _series_of(url: str, study: str, modality: str) -> str:
    series = DICOMwebClient(f"{url}/dicom-web").search_for_series(study_instance_uid=study,
                                                                 search_filters={"Modality": modality})
    return str(series[0]["0020000E"]["Value"][0])

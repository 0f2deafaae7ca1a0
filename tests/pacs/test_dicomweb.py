"""A study in over DICOMweb and its results back by STOW-RS, against a real Orthanc: the real LIDC
series round trip, and the bad cases (no CT series, lossy study, unreachable PACS, refused STOW)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
from dicomweb_client import DICOMwebClient
from factories import ct_slice, write, write_series
from pacs.pacs_servers import REJECTED_INSTITUTION, dciodvfy_errors, upload
from pacs.test_study import INGEST, PACS, finding
from pydicom import dcmread

from pe_triage.config import PacsConfig
from pe_triage.pacs import PacsError, PacsUnavailable, StowRejected, send_outbox, study_tag, triage_dicomweb
from pe_triage.pacs.dicomweb import connect
from pe_triage.predict import Triage

FAST = PacsConfig(retries=3, backoff_s=0.05, connect_timeout_s=2, read_timeout_s=30)


def web(url: str) -> str:
    return f"{url}/dicom-web"


def test_an_unreachable_pacs_is_retried_then_a_clear_error(flagging: Triage, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    with pytest.raises(PacsUnavailable, match="unreachable after 3 attempts") as info:
        triage_dicomweb("http://127.0.0.1:9/dicom-web", "1.2.999.42", flagging, model="m", version="1",
                        ingest=INGEST, config=FAST)
    assert time.monotonic() - start >= 0.05 + 0.1  # backed off between the attempts
    assert len([r for r in caplog.records if r.name.startswith("pe_triage") and "retrying" in r.getMessage()]) == 2
    assert "1.2.999.42" not in str(info.value) + caplog.text


def test_a_study_without_ct_series_is_a_clear_error(flagging: Triage, orthanc: str, tmp_path: Path) -> None:
    upload(orthanc, [write(ct_slice(modality="MR", study="7.7", series="7.7.1", sop="7.7.1.1", size=96), tmp_path / "mr.dcm")])
    with pytest.raises(PacsError, match=r"no CT series \(its 1 series have modalities \['MR'\]\)"):
        triage_dicomweb(web(orthanc), "7.7", flagging, model="m", version="1", ingest=INGEST, config=FAST)
    with pytest.raises(PacsError, match="the PACS knows no series of it"):
        triage_dicomweb(web(orthanc), "7.8", flagging, model="m", version="1", ingest=INGEST, config=FAST)


def test_a_lossy_study_is_refused_as_stored(flagging: Triage, orthanc: str, real_ct: Path) -> None:
    """Retrieved in its stored transfer syntax: a PACS transcoding to native would hide the lossy JPEG."""
    path = real_ct / "transfer-syntaxes" / "CTImage.dcm_JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50.dcm"
    upload(orthanc, [path])
    with pytest.raises(PacsError, match="lossy_compression"):
        triage_dicomweb(web(orthanc), dcmread(path).StudyInstanceUID, flagging, model="m", version="1",
                        ingest=INGEST, config=FAST)


def test_a_refused_stow_keeps_the_results_for_a_retry(flagging: Triage, rejecting_orthanc: str, orthanc: str,
                                                      tmp_path: Path) -> None:
    upload(rejecting_orthanc, write_series(tmp_path / "study", 4, size=96, study="5.5", series="5.5.1"))
    config = PacsConfig(retries=2, backoff_s=0.05, institution=REJECTED_INSTITUTION, outbox=str(tmp_path / "outbox"))
    # this Orthanc answers the STOW with success and drops the objects: what it holds is checked
    with pytest.raises(StowRejected, match="did not store 2 of 2 object.*kept in"):
        triage_dicomweb(web(rejecting_orthanc), "5.5", flagging, model="m", version="1", ingest=INGEST, config=config,
                        stow=True)
    kept = tmp_path / "outbox" / study_tag("5.5")
    assert sorted(p.name for p in kept.iterdir()) == ["1.dcm", "2.dcm"]  # SR and key image
    with pytest.raises(StowRejected, match="HTTP 404.* kept in"):  # a STOW answered with an HTTP error
        send_outbox(connect(f"{orthanc}/no-such-root", FAST), kept, FAST)
    assert len(list(kept.iterdir())) == 2
    assert send_outbox(connect(web(orthanc), FAST), kept, FAST) == 2  # a retry elsewhere stores them
    assert not kept.exists()
    found = DICOMwebClient(web(orthanc)).search_for_instances(study_instance_uid="5.5")
    assert len(found) == 2


@pytest.mark.slow
def test_the_lidc_series_round_trips_through_orthanc(flagging: Triage, orthanc: str, real_ct: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Upload the real series, triage it over DICOMweb, STOW the results; QIDO finds them, they read
    back with pydicom, pass dciodvfy, say what the JSON report says; the logs hold no identifier."""
    sources = sorted((real_ct / "lidc-idri-0002").glob("*.dcm"))
    upload(orthanc, sources)
    first = dcmread(sources[0], stop_before_pixels=True)
    caplog.set_level(logging.DEBUG)
    config = PacsConfig(outbox=str(tmp_path / "outbox"), uid_root=PACS.uid_root)
    result = triage_dicomweb(web(orthanc), first.StudyInstanceUID, flagging, model="pe-triage", version="4",
                             ingest=INGEST, config=config, stow=True)
    assert result.report["input"]["files"]["ingested"] == len(sources) == 261
    client = DICOMwebClient(web(orthanc))
    by_modality = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0]
                   for s in client.search_for_series(study_instance_uid=first.StudyInstanceUID)}
    assert set(by_modality) == {"CT", "SR", "OT"}
    back = {m: client.retrieve_series(first.StudyInstanceUID, by_modality[m])[0] for m in ("SR", "OT")}
    assert finding(back["SR"]) == {"pe": "PE suspected"}[result.report["studies"][0]["triage"]]
    assert back["OT"].SourceImageSequence[0].ReferencedSOPInstanceUID in {
        dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sources}
    for m, ds in back.items():
        assert ds.PatientID == first.PatientID and ds.SOPInstanceUID.startswith(PACS.uid_root)
        ds.save_as(tmp_path / f"{m}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"{m}.dcm") == []
    logged = caplog.text
    assert study_tag(first.StudyInstanceUID) in logged
    identifiers = [first.StudyInstanceUID, first.SeriesInstanceUID, first.PatientID, str(first.PatientName)]
    assert [i for i in identifiers if i and i in logged] == []
    assert not (tmp_path / "outbox").exists() or not any((tmp_path / "outbox").iterdir())
    shutil.rmtree(tmp_path / "outbox", ignore_errors=True)

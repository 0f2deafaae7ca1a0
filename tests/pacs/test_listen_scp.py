"""The listener's DICOM side, in process with a real pynetdicom SCU on loopback: allowed callers'
instances land in the spool as sent (compressed syntaxes too), other callers are rejected at
association, unusable instances get an error status; the C-STORE sender keeps what was not stored."""

from __future__ import annotations

import logging
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import ct_slice, write
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from pe_triage.config import ListenConfig
from pe_triage.pacs import PacsUnavailable, study_tag
from pe_triage.pacs.cstore import send_cstore
from pe_triage.pacs.listen import INCOMING, Spool
from pe_triage.pacs.listen_scp import CANNOT_UNDERSTAND, start_scp

JPEG_LS = "CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm"
RLE = "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[tuple[Spool, ListenConfig]]:
    config = ListenConfig(ae_title="PE-TRIAGE", port=free_port(), allowed_calling_aes=("SCANNER", "PACS"))
    spool = Spool(tmp_path / "spool")
    server = start_scp(spool, config, "127.0.0.1")
    yield spool, config
    server.shutdown()


def associate(config: ListenConfig, calling: str, syntaxes: list[str]) -> object:
    scu = AE(ae_title=calling)
    for syntax in syntaxes:  # one context per syntax: an SCP accepts one syntax per context
        scu.add_requested_context(CTImageStorage, syntax)
    scu.add_requested_context(Verification)
    return scu.associate("127.0.0.1", config.port, ae_title=config.ae_title)


def test_an_allowed_caller_stores_compressed_instances_as_sent(node: tuple[Spool, ListenConfig], real_ct: Path) -> None:
    spool, config = node
    sources = [dcmread(real_ct / "transfer-syntaxes" / name) for name in (JPEG_LS, RLE)]
    sources[1].SOPInstanceUID = sources[1].file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"  # both: one slice
    assoc = associate(config, "SCANNER", sorted({str(ds.file_meta.TransferSyntaxUID) for ds in sources}))
    assert assoc.is_established  # type: ignore[attr-defined]
    assert assoc.send_c_echo().Status == 0  # type: ignore[attr-defined]
    statuses = [assoc.send_c_store(ds).Status for ds in [*sources, sources[0]]]  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert statuses == [0, 0, 0]  # the resent instance replaces itself: two files
    stored = [dcmread(p) for p in (spool.root / study_tag(sources[0].StudyInstanceUID) / INCOMING).glob("*.dcm")]
    # kept as sent: ingest judges the syntax
    assert sorted(ds.file_meta.TransferSyntaxUID for ds in stored) == sorted(ds.file_meta.TransferSyntaxUID for ds in sources)
    assert spool.pending(study_tag(sources[0].StudyInstanceUID))


def test_another_caller_is_rejected_at_association(node: tuple[Spool, ListenConfig],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    spool, config = node
    caplog.set_level(logging.INFO)
    assoc = associate(config, "INTRUDER", ["1.2.840.10008.1.2.1"])
    assert not assoc.is_established and assoc.is_rejected  # type: ignore[attr-defined]
    assert "association from calling AE 'INTRUDER' rejected" in caplog.text
    assert [p.name for p in spool.root.iterdir()] == []


def test_an_instance_without_a_study_uid_is_refused(node: tuple[Spool, ListenConfig], tmp_path: Path) -> None:
    spool, config = node
    ds = dcmread(write(ct_slice(size=32), tmp_path / "x.dcm"))
    del ds.StudyInstanceUID
    assoc = associate(config, "PACS", [str(ds.file_meta.TransferSyntaxUID)])
    assert assoc.send_c_store(ds).Status == CANNOT_UNDERSTAND  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert [p.name for p in spool.root.iterdir()] == []


def test_cstore_sends_and_empties_the_folder_or_keeps_it(node: tuple[Spool, ListenConfig], tmp_path: Path) -> None:
    spool, config = node
    outbox = tmp_path / "out"
    outbox.mkdir()
    write(ct_slice(size=32, study="1.2.3.99"), outbox / "1.dcm")
    kept = tmp_path / "kept"
    shutil.copytree(outbox, kept)
    sender = ListenConfig(ae_title="PACS", destination_ae=config.ae_title, destination_host="127.0.0.1",
                          destination_port=config.port)
    assert send_cstore(outbox, sender) == 1 and not outbox.exists()
    assert spool.pending(study_tag("1.2.3.99"))
    stranger = ListenConfig(ae_title="STRANGER", destination_ae=config.ae_title, destination_host="127.0.0.1",
                            destination_port=config.port, timeout_s=5)
    with pytest.raises(PacsUnavailable, match="kept for a retry"):
        send_cstore(kept, stranger)
    assert [p.name for p in kept.iterdir()] == ["1.dcm"]

"""PACS integration: a study in over DICOMweb, its triage back as a DICOM SR and a key image.

:func:`triage_folder` (one study's files + a loaded ``Triage`` -> report + result objects) is the
reusable core; :mod:`~pe_triage.pacs.dicomweb` fetches a study into a private temporary folder;
:mod:`~pe_triage.pacs.stow` sends results back through an outbox on disk. Patient and study
identifiers are read from the source files only inside this package and written only into the
result objects; logs name a study by :func:`study_tag`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from pathlib import Path

from pe_triage.config import IngestConfig, PacsConfig
from pe_triage.evaluation.gradcam import Attribution
from pe_triage.pacs.dicomweb import PacsError, PacsUnavailable, StowRejected, connect, retrieve_study
from pe_triage.pacs.stow import send_outbox, to_outbox
from pe_triage.pacs.study import StudyResult, triage_folder
from pe_triage.predict import Triage

__all__ = ["PacsError", "PacsUnavailable", "StowRejected", "StudyResult", "send_outbox", "study_tag",
           "triage_dicomweb", "triage_folder"]

log = logging.getLogger(__name__)
#: libraries only the PACS code uses that log identifiers (request URLs and failed requests carry
#: study and series UIDs, highdicom the UIDs of the datasets it copies from): only their errors pass
IDENTIFYING_LOGGERS = ("dicomweb_client", "retrying", "highdicom")
for _name in IDENTIFYING_LOGGERS:
    logging.getLogger(_name).setLevel(logging.ERROR)
#: a dotted run of five or more numbers: a DICOM UID in a URL or a message (an IPv4 address has four)
_UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")


class _MaskUIDs(logging.Filter):
    """urllib3 serves the whole process (MLflow, S3), so its warnings stay; a UID in one (a DICOMweb
    URL being retried) is replaced by ``<uid>``."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = _UID.sub("<uid>", text)
        if masked != text:
            record.msg, record.args = masked, None
        return True


_connections = logging.getLogger("urllib3.connectionpool")
if not any(isinstance(f, _MaskUIDs) for f in _connections.filters):
    _connections.addFilter(_MaskUIDs())


def study_tag(study_uid: str) -> str:
    """A short hash that names a study in logs and outbox folders instead of its UID."""
    return "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def triage_dicomweb(url: str, study_uid: str, triage: Triage, *, model: str, version: str, ingest: IngestConfig,
                    config: PacsConfig, stow: bool = False, attribution: Attribution = Attribution()) -> StudyResult:
    """Fetch the study's CT series over DICOMweb into a private temporary folder (deleted after),
    triage it and, with ``stow``, store the SR and key image (its map drawn by ``attribution``) back
    (kept in ``config.outbox`` if refused)."""
    tag = study_tag(study_uid)
    client = connect(url, config)
    with tempfile.TemporaryDirectory(prefix="pe-triage-pacs-") as tmp:
        folders = retrieve_study(client, study_uid, Path(tmp), config)
        log.info("%s: %d CT series retrieved, triaging", tag, len(folders))
        result = triage_folder(Path(tmp), triage, model=model, version=version, ingest=ingest, config=config,
                               attribution=attribution)
    log.info("%s: triage %s", tag, result.report["studies"][0]["triage"])
    if stow:
        send_outbox(client, to_outbox(result.objects, Path(config.outbox), tag)[0].parent, config)
    return result

"""STOW-RS of the result objects, through an outbox on disk so that nothing is lost.

The objects are written to the outbox first and removed only after the PACS stored them; a refused
or failed store leaves them there, and :func:`send_outbox` sends them again later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread

from pe_triage.config import PacsConfig
from pe_triage.pacs.dicomweb import PacsError, StowRejected, with_retries

log = logging.getLogger(__name__)


def to_outbox(datasets: Sequence[Dataset], outbox: Path, name: str) -> list[Path]:
    """``datasets`` as ``outbox/name/N.dcm`` (``name``: a pseudonym of the study, never an identifier)."""
    folder = outbox / name
    outbox.mkdir(mode=0o700, parents=True, exist_ok=True)  # the objects carry identifiers: owner only
    folder.mkdir(mode=0o700, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets, start=1):
        paths.append(folder / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def outbox_objects(folder: Path) -> tuple[list[Path], list[Dataset]]:
    """The objects of one outbox folder, in send order, read back."""
    paths = sorted(folder.glob("*.dcm"))
    return paths, [dcmread(p) for p in paths]


def empty_outbox(folder: Path, paths: Sequence[Path]) -> None:
    """Remove a folder whose objects the destination now holds."""
    for path in paths:
        path.unlink()
    folder.rmdir()


def _stored(client: DICOMwebClient, ds: Dataset, config: PacsConfig) -> bool:
    """Whether QIDO-RS finds the object: a PACS may answer a STOW with success and drop the object
    (Orthanc does when a filter refuses it), so success is what the PACS then holds."""
    found = with_retries(lambda: client.search_for_instances(
        study_instance_uid=ds.StudyInstanceUID, search_filters={"SOPInstanceUID": ds.SOPInstanceUID}), "QIDO-RS check", config)
    return bool(found)


def send_outbox(client: DICOMwebClient, folder: Path, config: PacsConfig) -> int:
    """STOW-RS every object of one outbox folder; the folder is emptied once the PACS stored them
    all. :class:`StowRejected` (the objects stay) when the PACS refuses or cannot be reached."""
    paths, datasets = outbox_objects(folder)
    try:
        answer = with_retries(lambda: client.store_instances(datasets), "STOW-RS", config)
    except PacsError as e:
        raise StowRejected(f"{e}; the {len(paths)} result object(s) are kept in {folder} for a retry") from None
    failed = len(answer.get("FailedSOPSequence", [])) if answer is not None else 0
    missing = failed or sum(not _stored(client, ds, config) for ds in datasets)
    if missing:
        raise StowRejected(f"STOW-RS: the PACS did not store {missing} of {len(paths)} object(s); "
                           f"all are kept in {folder} for a retry")
    empty_outbox(folder, paths)
    log.info("STOW-RS stored %d result object(s)", len(paths))
    return len(paths)

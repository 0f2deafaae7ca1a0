"""The source study as the hospital sent it: its identifiers and its slices in ingest's z order.

The ingest pseudonymises everything, so the result objects (which go back to the hospital's own
PACS, in the patient's record) read the real identifiers here, straight from the source files.
This module is the only reader of them; nothing it returns is logged or written anywhere else.
"""

from __future__ import annotations

import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from pe_triage.config import IngestConfig
from pe_triage.dicom import IncompleteHeader, Pseudonymizer, Rejected, parse_header

#: ingest compares slice positions at this many decimals (``pe_triage.ingest.plan``)
_Z_DECIMALS = 3


@dataclass(frozen=True)
class SourceSlice:
    """One usable CT slice of the source: its file and the header the result objects reference."""

    path: Path
    header: Dataset  # the source header, pixels excluded
    z_mm: float


def read_header(path: Path) -> Dataset | None:
    """The file's header without pixel data; None when it is not DICOM."""
    try:
        return dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return None


#: the patient and study modules' Type 2 attributes (present, possibly empty) that the result
#: objects copy: a source without one gets it empty, as the standard allows
_TYPE2 = {"PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA", "PatientSex": "CS", "StudyDate": "DA",
          "StudyTime": "TM", "ReferringPhysicianName": "PN", "StudyID": "SH", "AccessionNumber": "SH"}


def with_study_module(ds: Dataset) -> Dataset:
    """``ds`` with every Type 2 patient/study attribute present (missing ones empty)."""
    for keyword, vr in _TYPE2.items():
        if keyword not in ds:
            ds.add_new(keyword, vr, None)
    return ds


def series_files(folder: Path) -> dict[str, list[Path]]:
    """The DICOM files under ``folder`` by Series Instance UID (non-DICOM files left to ingest)."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = read_header(path)
        found[str(ds.get("SeriesInstanceUID", "")) if ds is not None else ""].append(path)
    return dict(found)


def ordered_slices(paths: list[Path], config: IngestConfig) -> list[SourceSlice]:
    """The slices ingest keeps, in its order (``slice_index`` i is element i): files its header
    checks accept, of the series' majority geometry, one per position (lowest instance number
    first), sorted along the patient axis."""
    pseudo = Pseudonymizer(secrets.token_bytes(32), "pacs")  # only for parse_header; never stored
    parsed = []
    for path in paths:
        try:
            header = parse_header(path.read_bytes(), pseudo, complete=True, config=config)
        except (Rejected, IncompleteHeader):
            continue
        parsed.append((header, path))
    if not parsed:
        return []
    majority = Counter(h.geometry_key for h, _ in parsed).most_common(1)[0][0]
    taken: set[float] = set()
    kept = []
    for header, path in sorted(parsed, key=lambda hp: (hp[0].instance_number or 0, str(hp[1]))):
        z = round(header.z_mm, _Z_DECIMALS)
        if header.geometry_key != majority or z in taken:
            continue
        taken.add(z)
        source = read_header(path)
        if source is not None:
            kept.append(SourceSlice(path, with_study_module(source), header.z_mm))
    return sorted(kept, key=lambda s: s.z_mm)

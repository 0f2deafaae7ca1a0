"""LIDC-IDRI reading XML (``LidcReadMessage``: one ``readingSession`` per reader) -> label manifest.

Each reader marks nodules >= 3 mm as ``unblindedReadNodule`` with outlined ROIs (edge maps of many
points, usually with ``characteristics``), nodules < 3 mm as an ``unblindedReadNodule`` with a single
point, and other lesions >= 3 mm as ``nonNodule``. Readers' >= 3 mm nodules are grouped into one
nodule when they share a slice (``imageZposition``) and their in-plane centroids are within
``labels.lidc_centroid_tolerance_px`` (transitively, like pylidc's ``cluster_annotations``, which uses
contour distance). A group marked by at least ``labels.min_readers`` readers is kept: every slice
(``imageSOP_UID``) any of its readers outlined is ``other``. Slices of the groups with fewer readers
and of < 3 mm nodules are ``indeterminate`` (a finding someone saw, too uncertain to train on);
``nonNodule`` marks are counted and their slices left WNL.

The XML names no patient. LIDC's DICOM PatientID is its folder name (``LIDC-IDRI-0002``), so the
patient is the nearest folder of the XML's path with that pattern, or ``patient_id`` when given. The
file is user-supplied and parsed with defusedxml (no entity expansion, no external entities).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET  # type: ignore[import-untyped]
import numpy as np
from defusedxml import DefusedXmlException

from pe_triage.config import LabelsConfig
from pe_triage.ingest.adapters.common import Conversion, input_files, read_uri
from pe_triage.schema import Label

_PATIENT = re.compile(r"(?i)^lidc-idri-\d{4}$")


@dataclass(frozen=True)
class _Nodule:
    reader: int
    sops: dict[float, str]  # z -> SOP UID of each outlined slice
    centroid: tuple[float, float]
    large: bool


class _BadRoi(ValueError):
    pass


def convert(uris: list[str], config: LabelsConfig, patient_id: str | None = None) -> tuple[Conversion, int]:
    conv = Conversion()
    files = list(input_files(uris, (".xml",)))
    for n, uri in enumerate(files, start=1):
        _convert_file(conv, n, uri, config, patient_id)
    conv.notes.append(f"nodules >= 3 mm marked by >= {config.min_readers} readers -> other; fewer readers and "
                      "< 3 mm nodules -> indeterminate; nonNodule marks left wnl")
    return conv, len(files)


def _convert_file(conv: Conversion, n: int, uri: str, config: LabelsConfig, patient_id: str | None) -> None:
    try:
        root = SafeET.fromstring(read_uri(uri))
    except (DefusedXmlException, ParseError):  # a refused entity/DTD trick or broken XML: the file is unusable
        conv.problem("xml_unreadable_or_refused", n)
        return
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != f"{ns}LidcReadMessage":
        conv.problem("xml_not_an_lidc_read_message", n)
        return
    patient = patient_id or next((p.upper() for p in reversed(uri.split("/")[:-1]) if _PATIENT.match(p)), None)
    study = (root.findtext(f"{ns}ResponseHeader/{ns}StudyInstanceUID") or "").strip()
    series = (root.findtext(f"{ns}ResponseHeader/{ns}SeriesInstanceUid") or "").strip()
    if not patient:
        conv.problem("xml_without_patient_folder", n)
        return
    try:
        nodules = [_nodule(r, el, ns) for r, s in enumerate(root.iter(f"{ns}readingSession"))
                   for el in s.iter(f"{ns}unblindedReadNodule")]
    except _BadRoi:
        conv.problem("xml_with_roi_lacking_sop_uid_or_z", n)
        return
    conv.counts["readers"] += sum(1 for _ in root.iter(f"{ns}readingSession"))
    conv.counts["non_nodule_marks"] += sum(1 for _ in root.iter(f"{ns}nonNodule"))
    conv.counts["marks_lt_3mm"] += sum(1 for x in nodules if not x.large)
    conv.patient(patient, study)
    for group in _groups([x for x in nodules if x.large], config.lidc_centroid_tolerance_px):
        kept = len({x.reader for x in group}) >= config.min_readers
        conv.counts["nodules_kept" if kept else "nodules_below_min_readers"] += 1
        for x in group:
            for sop in x.sops.values():
                conv.label(patient, study, series, sop, Label.OTHER.value if kept else Label.INDETERMINATE.value)
    for x in nodules:
        if not x.large:
            for sop in x.sops.values():
                conv.label(patient, study, series, sop, Label.INDETERMINATE.value)


def _nodule(reader: int, el: Element, ns: str) -> _Nodule:
    """One reader's nodule: its slices and the centroid of its outline points (inclusion and
    exclusion ROIs alike: both trace the nodule)."""
    sops: dict[float, str] = {}
    points: list[tuple[float, float]] = []
    for roi in el.iter(f"{ns}roi"):
        sop = (roi.findtext(f"{ns}imageSOP_UID") or "").strip()
        try:
            z = float(roi.findtext(f"{ns}imageZposition") or "")
            points += [(float(e.findtext(f"{ns}xCoord") or ""), float(e.findtext(f"{ns}yCoord") or ""))
                       for e in roi.iter(f"{ns}edgeMap")]
        except ValueError:
            raise _BadRoi from None
        if not sop:
            raise _BadRoi
        sops[z] = sop
    if not sops:
        raise _BadRoi
    centroid = tuple(np.mean(points, axis=0)) if points else (float("nan"), float("nan"))
    return _Nodule(reader, sops, (float(centroid[0]), float(centroid[1])), len(points) > 1)


def _groups(nodules: list[_Nodule], tolerance_px: float) -> list[list[_Nodule]]:
    """Connected components of "different readers, a shared slice, centroids within the tolerance"."""
    parent = list(range(len(nodules)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(nodules):
        for j in range(i + 1, len(nodules)):
            b = nodules[j]
            close = float(np.hypot(a.centroid[0] - b.centroid[0], a.centroid[1] - b.centroid[1])) <= tolerance_px
            if a.reader != b.reader and close and a.sops.keys() & b.sops.keys():
                parent[find(i)] = find(j)
    groups: dict[int, list[_Nodule]] = {}
    for i, x in enumerate(nodules):
        groups.setdefault(find(i), []).append(x)
    return list(groups.values())

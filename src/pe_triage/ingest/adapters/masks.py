"""Mask-labelled PE sets (FUMPE, CAD-PE style: a PE mask volume per series) -> label manifest.

Two mask formats, read with their usual readers and no new dependency:

- DICOM SEG (``highdicom.seg.segread``): frames are matched to the CT slices by the SOP Instance UIDs
  the SEG references; every segment counts as PE; pixel spacing and PatientID come from the SEG.
- NumPy ``.npy`` (``[slices, rows, cols]``, non-zero = PE; what a NIfTI/MHD volume becomes with
  nibabel or SimpleITK, which this package does not depend on) with a sidecar ``<name>.json``:
  ``patient_id``, ``study_uid``, ``series_uid``, ``sop_uids`` (one per mask slice, in order) and
  ``pixel_spacing_mm`` ([row, col]).

A slice whose mask covers at least ``labels.min_mask_area_mm2`` is ``pe``; one with a smaller,
non-zero mask is ``indeterminate`` (a clot's rim or stray voxels: left out of training); the rest
of a listed series is WNL.
"""

from __future__ import annotations

import io
import json
from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from pe_triage.config import LabelsConfig
from pe_triage.ingest.adapters.common import Conversion, input_files, read_uri
from pe_triage.schema import Label

_SIDECAR_KEYS = ("patient_id", "study_uid", "series_uid", "sop_uids", "pixel_spacing_mm")


class _BadMask(ValueError):
    """The reason (a report key) one mask file cannot be used."""


def convert(uris: list[str], config: LabelsConfig) -> tuple[Conversion, int]:
    conv = Conversion()
    files = list(input_files(uris, (".npy", ".dcm")))
    for n, uri in enumerate(files, start=1):
        try:
            ids, areas = _npy(uri) if uri.lower().endswith(".npy") else _seg(read_uri(uri))
        except _BadMask as e:
            conv.problem(str(e), n)
            continue
        patient, study, series = ids
        conv.counts["masks"] += 1
        conv.patient(patient, study)
        for sop, area in areas:
            if area >= config.min_mask_area_mm2:
                conv.label(patient, study, series, sop, Label.PE.value)
            elif area > 0:
                conv.label(patient, study, series, sop, Label.INDETERMINATE.value)
                conv.counts["slices_below_min_area"] += 1
    return conv, len(files)


def _npy(uri: str) -> tuple[tuple[str, str, str], list[tuple[str, float]]]:
    try:
        mask = np.load(io.BytesIO(read_uri(uri)), allow_pickle=False)
    except (ValueError, OSError):
        raise _BadMask("npy_unreadable") from None
    try:
        meta: Any = json.loads(read_uri(uri[: -len(".npy")] + ".json"))
    except (OSError, ValueError):
        raise _BadMask("npy_without_readable_sidecar_json") from None
    if not isinstance(meta, dict) or any(not meta.get(k) for k in _SIDECAR_KEYS):
        raise _BadMask("sidecar_json_missing_keys")
    sops, spacing = meta["sop_uids"], meta["pixel_spacing_mm"]
    if mask.ndim != 3 or not isinstance(sops, list) or len(sops) != mask.shape[0] or not all(
            isinstance(s, str) and s for s in sops):
        raise _BadMask("mask_slices_do_not_match_sidecar_sop_uids")
    pixel = _pixel_area(spacing)
    ids = (str(meta["patient_id"]), str(meta["study_uid"]), str(meta["series_uid"]))
    return ids, [(sop, float(np.count_nonzero(mask[i])) * pixel) for i, sop in enumerate(sops)]


def _seg(data: bytes) -> tuple[tuple[str, str, str], list[tuple[str, float]]]:
    try:
        seg = hd.seg.segread(io.BytesIO(data))
        sources = seg.get_source_image_uids()
        spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        pixel = _pixel_area([float(v) for v in spacing])
        areas = []
        for _, _, sop in sources:
            frames = seg.get_pixels_by_source_instance([sop], combine_segments=True, skip_overlap_checks=True)
            areas.append((str(sop), float(np.count_nonzero(frames)) * pixel))
    except _BadMask:
        raise
    except (pydicom.errors.InvalidDicomError, AttributeError, KeyError, IndexError, ValueError, TypeError):
        raise _BadMask("seg_unreadable_or_not_a_segmentation") from None
    if not sources or not str(seg.get("PatientID", "")):
        raise _BadMask("seg_without_source_images_or_patient_id")
    return (str(seg.PatientID), str(sources[0][0]), str(sources[0][1])), areas


def _pixel_area(spacing: Any) -> float:
    try:
        row, col = (float(v) for v in spacing)
    except (TypeError, ValueError):
        raise _BadMask("pixel_spacing_not_two_numbers") from None
    if not (row > 0 and col > 0):
        raise _BadMask("pixel_spacing_not_positive")
    return row * col

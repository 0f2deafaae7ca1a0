"""The run report: file counts, duplicates, quarantine reasons, the dataset now, series with slices off
their z grid, timing, and whether the label manifest matches the ingested slices. It names no source
path: the source and its files appear as pseudonyms only."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from pe_triage import __version__
from pe_triage import schema as S
from pe_triage.dicom import Pseudonymizer
from pe_triage.ingest.records import (
    ALREADY_INGESTED,
    DUPLICATE,
    INGESTED,
    QUARANTINED,
    Listing,
    Outcome,
    SeriesResult,
)
from pe_triage.labels import Manifest
from pe_triage.storage import Location

log = logging.getLogger(__name__)


def label_summary(
    manifest: Manifest,
    final: dict[str, dict[str, Any]],
    label_rows: dict[str, int],
    outcomes: dict[str, Outcome],
) -> dict[str, Any]:
    """Which manifest rows found a slice, and whether slice labels agree with patient diagnoses: the
    diagnosis must be the class the slices give (``schema.patient_class``), so a WNL patient has only
    WNL slices and a PE patient may have indeterminate and other-disease slices beside its PE ones."""
    matched = {row for sop, row in label_rows.items() if sop in final}
    for row in final.values():
        _, r = manifest.label(row[S.PATIENT_ID], row[S.STUDY_UID], row[S.SERIES_UID], row[S.SOP_UID], row[S.INSTANCE_NUMBER])
        if r is not None:
            matched.add(r)
    patients_seen = {row[S.PATIENT_ID] for row in final.values()}
    sop_row = {row: sop for sop, row in label_rows.items()}
    unmatched = []
    for lr in manifest.all_rows():
        if lr.label is None:
            if lr.patient not in patients_seen:
                unmatched.append({"row": lr.row, "patient_id": lr.patient, "reason": "no ingested slice of this patient"})
        elif lr.row not in matched:
            quarantined = outcomes.get(sop_row.get(lr.row, ""))
            why = (f"its slice was quarantined ({quarantined.reason.value})" if quarantined and quarantined.reason
                   else "no ingested slice has this SOP Instance UID / instance number")
            unmatched.append({"row": lr.row, "patient_id": lr.patient, "reason": why})
    per_patient: dict[str, set[str]] = defaultdict(set)
    for row in final.values():
        if row[S.LABEL]:
            per_patient[row[S.PATIENT_ID]].add(row[S.LABEL])
    inconsistent = []
    for patient, lr in manifest.diagnosis.items():
        if patient not in patients_seen:
            continue
        labels = per_patient[patient]
        if S.patient_class(labels) != lr.diagnosis:
            inconsistent.append({"row": lr.row, "patient_id": patient, "diagnosis": lr.diagnosis, "slice_labels": sorted(labels)})
    return {
        "manifest_rows": len(manifest.all_rows()),
        "unmatched_rows": unmatched,
        "inconsistent_patients": inconsistent,
        "unlabelled_patients": sorted({row[S.PATIENT_ID] for row in final.values() if row[S.LABEL] is None}),
    }


def _z_grid_warnings(final: dict[str, dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """Series whose slices do not sit on one regular z grid (a missing slice, one out of step): each
    step between neighbours is compared with the series' median step. Logged, and kept in the report."""
    by_series: dict[str, list[float]] = defaultdict(list)
    for row in final.values():
        by_series[row[S.SERIES_UID]].append(row[S.Z_MM])
    warnings = []
    for series, z in sorted(by_series.items()):
        steps = np.diff(np.sort(z))
        if not len(steps):
            continue
        step = float(np.median(steps))
        irregular = int(np.sum(np.abs(steps - step) > tolerance * step))
        if irregular:
            log.warning("series %s: %d step(s) between slices differ from its %.3g mm grid", series, irregular, step)
            warnings.append({"series_uid": series, "irregular_steps": irregular, "step_mm": round(step, 4)})
    return warnings


def run_report(
    site: str,
    src: Location,
    listing: Listing,
    outcomes: list[Outcome],
    final: dict[str, dict[str, Any]],
    results: list[SeriesResult],
    label_report: dict[str, Any] | None,
    pseudo: Pseudonymizer,
    z_tolerance: float,
    workers: int,
    scan_s: float,
    started: float,
) -> dict[str, Any]:
    """The report of one run; every file seen must have exactly one outcome, else the run is wrong and says so."""
    status = Counter(o.status for o in outcomes)
    seen = len(listing.paths)
    duplicates = status[DUPLICATE] + status[ALREADY_INGESTED]
    if seen != status[INGESTED] + duplicates + status[QUARANTINED]:
        raise AssertionError(f"ingest lost track of files: {seen} seen, outcomes {dict(status)}")
    seconds = time.perf_counter() - started
    new_bytes = sum(o.size for o in outcomes if o.status == INGESTED)
    labels = Counter({label.value: 0 for label in S.Label})
    labels.update(row[S.LABEL] or "unlabelled" for row in final.values())
    return {
        "site": site,
        "source": pseudo("source", src.uri),
        "schema_version": S.SCHEMA_VERSION,
        "pe_triage_version": __version__,
        "demo_key": pseudo.is_demo,
        "files": {"seen": seen, "ingested": status[INGESTED], "duplicates": duplicates, "quarantined": status[QUARANTINED]},
        "skipped_links": listing.skipped_links,
        "duplicates": {
            "already_ingested": status[ALREADY_INGESTED],
            "same_content_or_pixels": status[DUPLICATE],
        },
        "quarantine_reasons": dict(sorted(Counter(o.reason.value for o in outcomes
                                                  if o.status == QUARANTINED and o.reason).items())),
        "dataset": {
            "patients": len({r[S.PATIENT_ID] for r in final.values()}),
            "series": len({r[S.SERIES_UID] for r in final.values()}),
            "slices": len(final),
            "series_written": sum(1 for r in results if r.staged),
            "slices_with_derived_uids": sum(1 for r in final.values() if r[S.UIDS_DERIVED]),
            "labels": dict(sorted(labels.items())),
        },
        "z_grid_warnings": _z_grid_warnings(final, z_tolerance),
        "labels": label_report,
        "timing": {
            "workers": workers,
            "seconds": round(seconds, 3),
            "scan_seconds": round(scan_s, 3),
            "ingested_slices_per_s": round(status[INGESTED] / seconds, 1) if seconds else None,
            "ingested_mb_per_s": round(new_bytes / 1e6 / seconds, 1) if seconds else None,
        },
    }

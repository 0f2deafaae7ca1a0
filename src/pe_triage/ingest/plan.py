"""The whole-site decisions, taken from the headers alone before any pixel is read: series grouping, SOP
Instance UIDs claimed by two series, each series' geometry majority and one slice per position, labels."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pe_triage import schema as S
from pe_triage.dicom.header import geometry_key
from pe_triage.ingest.records import QUARANTINED, Candidate, Outcome, Scanned, SeriesTask
from pe_triage.labels import Manifest
from pe_triage.schema import Reason
from pe_triage.storage import Location

_Z_DECIMALS = 2  # slices closer than 0.01 mm along the normal share a position


@dataclass
class Plan:
    tasks: list[SeriesTask]
    quarantined: list[Outcome]
    label_rows: dict[str, int]  # sop of a new candidate -> manifest row that labels it


def existing_rows(out: Location, site: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Rows already in the dataset (without pixels) by SOP, and the file of each series."""
    folder = out.join(f"{S.SITE}={site}")
    if not out.exists(folder):
        return {}, {}
    rows: dict[str, dict[str, Any]] = {}
    files: dict[str, str] = {}
    for rel, _ in out.list_files(folder):
        if not rel.endswith(".parquet") or "/" in rel:
            continue
        path = f"{folder}/{rel}"
        table = pq.read_table(path, filesystem=out.fs, columns=S.SLICES_META_COLUMNS)
        for row in table.to_pylist():
            rows[row[S.SOP_UID]] = row
            files[row[S.SERIES_UID]] = path
    return rows, files


def _stored_geometry(row: dict[str, Any]) -> tuple[object, ...]:
    return geometry_key(row[S.ROWS], row[S.COLS], row[S.IMAGE_ORIENTATION], (row[S.PIXEL_SPACING_ROW], row[S.PIXEL_SPACING_COL]))


def _rejected(s: Scanned, reason: Reason, detail: str, sop: str | None = None) -> Outcome:
    return Outcome(s.path, s.size, None, QUARANTINED, sop, reason, detail)


def make_plan(
    scanned: list[Scanned],
    existing: dict[str, dict[str, Any]],
    existing_files: dict[str, str],
    manifest: Manifest | None,
    make_task: Callable[..., SeriesTask],
) -> Plan:
    """A write task for every series that gains slices or whose stored labels change, and every file refused."""
    quarantined: list[Outcome] = []
    by_series, label_rows = _candidates(scanned, existing, manifest, quarantined)
    old_by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in existing.values():
        old_by_series[row[S.SERIES_UID]].append(row)
    tasks = []
    for series_uid in sorted(set(by_series) | set(old_by_series)):
        old = old_by_series.get(series_uid, [])
        kept = _kept(old, by_series.get(series_uid, []), existing, quarantined)
        labels: dict[str, str | None] = {}
        for r in old:  # a manifest relabels the patients it lists; the others keep their labels
            new_label = (manifest.label(r[S.PATIENT_ID], r[S.STUDY_UID], series_uid, r[S.SOP_UID], r[S.INSTANCE_NUMBER])[0]
                         if manifest else None)
            labels[r[S.SOP_UID]] = new_label if new_label is not None else r[S.LABEL]
        rewrite = any(labels[r[S.SOP_UID]] != r[S.LABEL] for r in old)
        if kept or rewrite:
            kept.sort(key=lambda c: c.header.z_mm)
            stored_digest = {r[S.SOP_UID]: r[S.SOURCE_HMAC] for r in old}
            tasks.append(make_task(series_uid, tuple(kept), existing_files.get(series_uid), stored_digest, labels, rewrite))
    return Plan(tasks, quarantined, label_rows)


def _candidates(
    scanned: list[Scanned],
    existing: dict[str, dict[str, Any]],
    manifest: Manifest | None,
    quarantined: list[Outcome],
) -> tuple[dict[str, list[Candidate]], dict[str, int]]:
    """The scanned files grouped by SOP into each series' candidates, with their labels and the manifest row
    that gave each; files that failed the scan or whose SOP claims two series go to ``quarantined``."""
    by_sop: dict[str, list[Scanned]] = defaultdict(list)
    for s in scanned:
        if s.header is None:
            quarantined.append(Outcome(s.path, s.size, None, QUARANTINED, None, s.reason, s.detail))
        else:
            by_sop[s.header.sop_uid].append(s)
    by_series: dict[str, list[Candidate]] = defaultdict(list)
    label_rows: dict[str, int] = {}
    for sop, files in by_sop.items():
        series = {f.header.series_uid for f in files if f.header}
        if sop in existing:
            series.add(existing[sop][S.SERIES_UID])
        if len(series) > 1:
            quarantined.extend(_rejected(f, Reason.CONFLICTING_UID, "the same SOP Instance UID appears in two series", sop)
                               for f in files)
            continue
        h = files[0].header
        assert h is not None
        label, row = manifest.label(h.patient_id, h.study_uid, h.series_uid, sop, h.instance_number) if manifest else (None, None)
        if row is not None:
            label_rows[sop] = row
        by_series[h.series_uid].append(Candidate(tuple(files), label))
    return by_series, label_rows


def _kept(old: list[dict[str, Any]], cands: list[Candidate], existing: dict[str, dict[str, Any]],
          quarantined: list[Outcome]) -> list[Candidate]:
    """The candidates one series takes: stored SOPs, and new ones of the series' geometry at a free position."""
    # the geometry of the slices already stored is fixed; otherwise the majority decides
    votes = Counter(_stored_geometry(r) for r in old)
    votes.update(c.header.geometry_key for c in cands if c.header.sop_uid not in existing)
    majority = _stored_geometry(old[0]) if old else (votes.most_common(1)[0][0] if votes else None)
    taken = {round(r[S.Z_MM], _Z_DECIMALS) for r in old}
    kept = []
    for cand in sorted(cands, key=lambda c: (c.header.instance_number or 0, c.files[0].path)):
        h = cand.header
        if h.sop_uid in existing:
            kept.append(cand)
        elif h.geometry_key != majority:
            assert majority is not None  # this candidate voted
            detail = f"size/orientation/spacing differ from {votes[majority]} other slices of the series"
            quarantined.extend(_rejected(s, Reason.INCONSISTENT_GEOMETRY, detail, h.sop_uid) for s in cand.files)
        elif round(h.z_mm, _Z_DECIMALS) in taken:
            detail = f"another slice of the series lies at z={h.z_mm:.2f} mm"
            quarantined.extend(_rejected(s, Reason.DUPLICATE_POSITION, detail, h.sop_uid) for s in cand.files)
        else:
            taken.add(round(h.z_mm, _Z_DECIMALS))
            kept.append(cand)
    return kept

"""Ingest one site: DICOM files (folder or S3 prefix) → the ``slices`` Parquet dataset.

Two passes, so a site of any size is planned from headers alone and pixels are decoded once:

1. **scan** (parallel, header bytes only): validate each file, pseudonymise its ids, locate its
   pixels. Whole-site decisions follow in the parent: series grouping, geometry majority,
   positions, SOP conflicts, labels.
2. **write** (parallel, one series per task): read, hash, decode and convert each slice to HU in
   z order and stream row groups into that series' Parquet file. A series that gained slices or
   labels is rewritten whole (its old rows are copied, never re-decoded), so ``slice_index``
   always follows z.

Series files are staged under ``_staging/`` (ignored by Parquet dataset readers) and moved into
place only when every task has finished: an interrupted run leaves nothing visible, and a re-run
on the same input writes nothing.

Layout of ``out``::

    site=<site>/<series pseudonym>.parquet         the slices (schema.SLICES_SCHEMA)
    _quarantine/site=<site>/quarantine.parquet     every file not ingested, with a reason
    _reports/site=<site>/ingest_report.json        counts of the latest run
    _dataset.json                                  schema version and pseudonym-key fingerprint
"""

from __future__ import annotations

import heapq
import json
import logging
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pe_triage import __version__
from pe_triage import schema as S
from pe_triage.config import IngestConfig, to_dict
from pe_triage.dicom import (
    HEADER_PREFIX_BYTES,
    IncompleteHeader,
    Pseudonymizer,
    Rejected,
    SliceHeader,
    decode_hu,
    parse_header,
    sha256_hex,
)
from pe_triage.dicom.header import geometry_key
from pe_triage.labels import Manifest, load_manifest
from pe_triage.parallel import run, start_pool, worker_count
from pe_triage.schema import Reason
from pe_triage.storage import Location, RowGroupWriter, location

log = logging.getLogger(__name__)

SITE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_Z_DECIMALS = 2  # slices closer than 0.01 mm along the normal share a position

INGESTED, ALREADY_INGESTED, DUPLICATE, QUARANTINED = "ingested", "already_ingested", "duplicate", "quarantined"
#: settings that change how a run executes, not what it writes (kept out of the file metadata)
_EXECUTION_ONLY = {"workers", "scan_chunk_files", "strict_labels"}
_META_SCHEMA = pa.schema([f for f in S.SLICES_SCHEMA if f.name != S.HU])
_CONFLICT = "same SOP Instance UID as another file, different pixels"


class IngestError(RuntimeError):
    """The run cannot proceed (bad arguments, foreign dataset, strict label check failed)."""


# ------------------------------------------------------------------------------------ records
@dataclass(frozen=True, slots=True)
class Scanned:
    path: str
    size: int
    header: SliceHeader | None = None
    reason: Reason | None = None
    detail: str = ""


@dataclass(frozen=True)
class Candidate:
    """One SOP instance of a series: every file that carries it (sorted by path) and its label."""

    files: tuple[Scanned, ...]
    label: str | None

    @property
    def header(self) -> SliceHeader:
        header = self.files[0].header
        assert header is not None
        return header


@dataclass(frozen=True)
class SeriesTask:
    src: Location
    out: Location
    pseudo: Pseudonymizer
    config: IngestConfig
    site: str
    series_uid: str
    candidates: tuple[Candidate, ...]  # sorted by z
    existing_file: str | None
    existing_sha: dict[str, str]  # sop -> sha256 of rows already in the dataset
    labels: dict[str, str | None]  # sop -> label for rows already in the dataset
    rewrite: bool  # existing labels changed
    staged: str
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class Outcome:
    path: str
    size: int
    sha256: str | None
    status: str
    sop_uid: str | None = None
    reason: Reason | None = None
    detail: str = ""


@dataclass
class SeriesResult:
    series_uid: str
    staged: str | None
    rows: int
    outcomes: list[Outcome] = field(default_factory=list)


# ------------------------------------------------------------------------------------ pass 1
def scan_files(src: Location, items: Sequence[tuple[str, int]], pseudo: Pseudonymizer) -> list[Scanned]:
    """Header scan of a chunk of files (runs in a worker)."""
    results = []
    for rel, size in items:
        path = src.join(rel)
        try:
            prefix = src.read(path, min(size, HEADER_PREFIX_BYTES)) if size else b""
            try:
                header = parse_header(prefix, pseudo, complete=size <= HEADER_PREFIX_BYTES)
            except IncompleteHeader:
                header = parse_header(src.read(path), pseudo, complete=True)
            results.append(Scanned(rel, size, header))
        except Rejected as r:
            results.append(Scanned(rel, size, reason=r.reason, detail=r.detail))
        except OSError as exc:
            results.append(Scanned(rel, size, reason=Reason.UNREADABLE, detail=f"cannot read file ({type(exc).__name__})"))
    return results


# ------------------------------------------------------------------------------------ pass 2
def _row(task: SeriesTask, h: SliceHeader, label: str | None, sha: str, hu: np.ndarray) -> dict[str, Any]:
    return {
        S.SITE: task.site,
        S.PATIENT_ID: h.patient_id,
        S.STUDY_UID: h.study_uid,
        S.SERIES_UID: h.series_uid,
        S.SOP_UID: h.sop_uid,
        S.SLICE_INDEX: -1,
        S.INSTANCE_NUMBER: h.instance_number,
        S.Z_MM: h.z_mm,
        S.IMAGE_POSITION: list(h.position),
        S.IMAGE_ORIENTATION: list(h.orientation),
        S.ROWS: h.rows,
        S.COLS: h.cols,
        S.PIXEL_SPACING_ROW: h.spacing[0],
        S.PIXEL_SPACING_COL: h.spacing[1],
        S.SLICE_THICKNESS: h.slice_thickness,
        S.MANUFACTURER: h.manufacturer,
        S.MODEL: h.model,
        S.KERNEL: h.kernel,
        S.KVP: h.kvp,
        S.CONTRAST: h.contrast,
        S.TRANSFER_SYNTAX: h.transfer_syntax,
        S.UIDS_DERIVED: h.uids_derived,
        S.SOURCE_SHA256: sha,
        S.LABEL: label,
        S.HU: hu,  # encoded into byte planes when its batch is written
    }


def _decode(task: SeriesTask, data: bytes, header: SliceHeader) -> np.ndarray:
    return decode_hu(data, header, padding_hu=task.config.padding_hu, min_hu=task.config.min_hu)


def _stored_hu(task: SeriesTask, sop: str) -> bytes:
    assert task.existing_file is not None
    table = pq.read_table(task.existing_file, filesystem=task.out.fs, columns=[S.HU], filters=[(S.SOP_UID, "==", sop)])
    return table.column(S.HU)[0].as_py()


def _new_rows(task: SeriesTask, outcomes: list[Outcome]) -> Iterator[dict[str, Any]]:
    """Decode the candidates in z order, resolving files that share a SOP Instance UID by content.

    The reference of a SOP is the stored row, else its first file (by path) that decodes. Another
    file is a duplicate if it has the same bytes or the same HU (a transcoded copy), and a
    conflict otherwise; a new SOP with conflicting files is not ingested at all.
    """
    for cand in task.candidates:
        sop = cand.header.sop_uid
        known = task.existing_sha.get(sop)
        ref_sha, ref_path = known, None
        pixels: np.ndarray | None = None
        ref_hu: bytes | None = None
        resolved: list[Outcome] = []
        conflict = False
        for f in cand.files:
            assert f.header is not None
            try:
                data = task.src.read(task.src.join(f.path))
            except OSError as exc:
                resolved.append(Outcome(f.path, f.size, None, QUARANTINED, sop, Reason.UNREADABLE, f"cannot read file ({type(exc).__name__})"))
                continue
            sha = sha256_hex(data)
            if sha == ref_sha:
                resolved.append(
                    Outcome(f.path, f.size, sha, ALREADY_INGESTED, sop) if known
                    else Outcome(f.path, f.size, sha, DUPLICATE, sop, Reason.DUPLICATE, f"same content as {task.pseudo('path', ref_path or '')}")
                )
                continue
            try:
                hu = _decode(task, data, f.header)
            except Rejected as r:
                resolved.append(Outcome(f.path, f.size, sha, QUARANTINED, sop, r.reason, r.detail))
                continue
            if ref_sha is None:
                ref_sha, ref_path, pixels = sha, f.path, hu
                resolved.append(Outcome(f.path, f.size, sha, INGESTED, sop))
                continue
            if ref_hu is None:
                ref_hu = pixels.tobytes() if pixels is not None else S.decode_hu(_stored_hu(task, sop), f.header.rows, f.header.cols).tobytes()
            if hu.tobytes() == ref_hu:
                resolved.append(Outcome(f.path, f.size, sha, DUPLICATE, sop, Reason.DUPLICATE,
                                        "same SOP Instance UID and identical HU as an ingested slice (other encoding)"))
            else:
                conflict = True
                resolved.append(Outcome(f.path, f.size, sha, QUARANTINED, sop, Reason.CONFLICTING_UID, _CONFLICT))
        if conflict and not known:  # nothing says which file is right: none of them goes in
            pixels = None
            resolved = [
                o if o.status == QUARANTINED else Outcome(o.path, o.size, o.sha256, QUARANTINED, sop, Reason.CONFLICTING_UID, _CONFLICT)
                for o in resolved
            ]
        outcomes.extend(resolved)
        if pixels is not None:
            primary = next(f for f in cand.files if f.path == ref_path)
            assert primary.header is not None and ref_sha is not None
            yield _row(task, primary.header, cand.label, ref_sha, pixels)


def _old_rows(task: SeriesTask) -> Iterator[dict[str, Any]]:
    if task.existing_file is None:
        return
    parquet = pq.ParquetFile(task.existing_file, filesystem=task.out.fs)
    for batch in parquet.iter_batches(batch_size=task.config.row_group_slices):
        for row in batch.to_pylist():
            row[S.LABEL] = task.labels.get(row[S.SOP_UID], row[S.LABEL])
            yield row


def _table(batch: list[dict[str, Any]], buffer: np.ndarray) -> pa.Table:
    """One row group: metadata from the row dicts, pixels encoded into ``buffer`` (reused between
    row groups of a series: the writer has compressed the previous group when this one starts)."""
    n = batch[0][S.ROWS] * batch[0][S.COLS]  # one geometry per series
    planes = buffer[: len(batch), : 2 * n]
    for i, row in enumerate(batch):
        pixels = row.pop(S.HU)
        if isinstance(pixels, np.ndarray):
            S.encode_hu(pixels, out=planes[i])
        else:  # a stored row, already encoded
            planes[i] = np.frombuffer(pixels, np.uint8)
    offsets = np.arange(0, (len(batch) + 1) * 2 * n, 2 * n, dtype=np.int32)
    column = pa.Array.from_buffers(pa.binary(), len(batch), [None, pa.py_buffer(offsets), pa.py_buffer(planes)])
    return pa.Table.from_pylist(batch, schema=_META_SCHEMA).append_column(S.SLICES_SCHEMA.field(S.HU), column)


def write_series(task: SeriesTask) -> SeriesResult:
    """Pass 2 for one series (runs in a worker): stream its slices, in z order, to a staged file."""
    outcomes: list[Outcome] = []
    result = SeriesResult(task.series_uid, None, 0, outcomes)
    new = _new_rows(task, outcomes)
    has_new = any(c.header.sop_uid not in task.existing_sha for c in task.candidates)
    if not (has_new or task.rewrite):
        for _ in new:  # only verifies re-seen files against what is stored
            pass
        return result
    batch: list[dict[str, Any]] = []
    buffer = np.empty(0, np.uint8)
    n = 0
    schema = S.SLICES_SCHEMA.with_metadata(task.metadata)
    with RowGroupWriter(task.out, task.staged, schema, bulk=S.HU, zstd_level=task.config.zstd_level) as writer:

        def flush() -> None:
            nonlocal buffer, batch
            size = 2 * batch[0][S.ROWS] * batch[0][S.COLS]
            if buffer.shape != (task.config.row_group_slices, size):
                buffer = np.empty((task.config.row_group_slices, size), np.uint8)
            writer.write(_table(batch, buffer))
            batch = []

        for row in heapq.merge(_old_rows(task), new, key=lambda r: r[S.Z_MM]):
            row[S.SLICE_INDEX] = n
            n += 1
            batch.append(row)
            if len(batch) == task.config.row_group_slices:
                flush()
        if batch:
            flush()
    if writer.opened:
        result.staged, result.rows = task.staged, n
    return result


# ------------------------------------------------------------------------------------ planning
@dataclass
class Plan:
    tasks: list[SeriesTask]
    quarantined: list[Outcome]
    label_rows: dict[str, int]  # sop of a new candidate -> manifest row that labels it


def _existing(out: Location, site: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
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


def _plan(
    scanned: list[Scanned],
    existing: dict[str, dict[str, Any]],
    existing_files: dict[str, str],
    manifest: Manifest | None,
    make_task: Callable[..., SeriesTask],
) -> Plan:
    quarantined: list[Outcome] = []

    def reject(s: Scanned, reason: Reason, detail: str, sop: str | None = None) -> None:
        quarantined.append(Outcome(s.path, s.size, None, QUARANTINED, sop, reason, detail))

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
            for f in files:
                reject(f, Reason.CONFLICTING_UID, "the same SOP Instance UID appears in two series", sop)
            continue
        first = files[0]
        h = first.header
        assert h is not None
        label, row = manifest.label(h.patient_id, h.study_uid, h.series_uid, sop, h.instance_number) if manifest else (None, None)
        if row is not None:
            label_rows[sop] = row
        by_series[h.series_uid].append(Candidate(tuple(files), label))
    old_by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in existing.values():
        old_by_series[row[S.SERIES_UID]].append(row)

    tasks = []
    for series_uid in sorted(set(by_series) | set(old_by_series)):
        old = old_by_series.get(series_uid, [])
        cands = by_series.get(series_uid, [])
        # the geometry of the slices already stored is fixed; otherwise the majority decides
        votes = Counter(_stored_geometry(r) for r in old)
        votes.update(c.header.geometry_key for c in cands if c.header.sop_uid not in existing)
        majority = _stored_geometry(old[0]) if old else (votes.most_common(1)[0][0] if votes else None)
        taken = {round(r[S.Z_MM], _Z_DECIMALS) for r in old}
        kept = []
        for cand in sorted(cands, key=lambda c: (c.header.instance_number or 0, c.files[0].path)):
            h = cand.header
            group = cand.files
            if h.sop_uid in existing:
                kept.append(cand)
            elif h.geometry_key != majority:
                for s in group:
                    reject(s, Reason.INCONSISTENT_GEOMETRY,
                           f"size/orientation/spacing differ from {votes[majority]} other slices of the series", h.sop_uid)
            elif round(h.z_mm, _Z_DECIMALS) in taken:
                for s in group:
                    reject(s, Reason.DUPLICATE_POSITION, f"another slice of the series lies at z={h.z_mm:.2f} mm", h.sop_uid)
            else:
                taken.add(round(h.z_mm, _Z_DECIMALS))
                kept.append(cand)
        labels: dict[str, str | None] = {}
        for r in old:  # a manifest relabels the patients it lists; the others keep their labels
            new_label = manifest.label(r[S.PATIENT_ID], r[S.STUDY_UID], series_uid, r[S.SOP_UID], r[S.INSTANCE_NUMBER])[0] if manifest else None
            labels[r[S.SOP_UID]] = new_label if new_label is not None else r[S.LABEL]
        rewrite = any(labels[r[S.SOP_UID]] != r[S.LABEL] for r in old)
        if kept or rewrite:
            kept.sort(key=lambda c: c.header.z_mm)
            tasks.append(make_task(series_uid, tuple(kept), existing_files.get(series_uid), {r[S.SOP_UID]: r[S.SOURCE_SHA256] for r in old}, labels, rewrite))
    return Plan(tasks, quarantined, label_rows)


# ------------------------------------------------------------------------------------ running
def _scan_chunk(args: tuple[Location, Sequence[tuple[str, int]], Pseudonymizer]) -> list[Scanned]:
    return scan_files(*args)


def _chunks(items: Sequence[tuple[str, int]], size: int) -> list[Sequence[tuple[str, int]]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _check_dataset(out: Location, pseudo: Pseudonymizer) -> None:
    marker = out.join("_dataset.json")
    info = {"schema_version": S.SCHEMA_VERSION, "key_fingerprint": pseudo.fingerprint, "demo_key": pseudo.is_demo}
    if out.exists(marker):
        found = json.loads(out.read(marker))
        if found.get("key_fingerprint") != pseudo.fingerprint:
            raise IngestError(
                f"{out.uri} was pseudonymised with another key (fingerprint {found.get('key_fingerprint')}); "
                "mixing keys would split patients and defeat de-duplication"
            )
        if found.get("schema_version") != S.SCHEMA_VERSION:
            raise IngestError(f"{out.uri} has schema version {found.get('schema_version')}, this is {S.SCHEMA_VERSION}")
        return
    out.write_bytes(marker, json.dumps(info, indent=2).encode())


def _label_summary(
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
        lab, r = manifest.label(row[S.PATIENT_ID], row[S.STUDY_UID], row[S.SERIES_UID], row[S.SOP_UID], row[S.INSTANCE_NUMBER])
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


def ingest_site(
    site: str,
    source: str,
    out: str,
    *,
    pseudo: Pseudonymizer,
    labels: str | None = None,
    config: IngestConfig = IngestConfig(),
) -> dict[str, Any]:
    """Ingest ``source`` as ``site`` into the slices dataset at ``out``; returns the run report."""
    started = time.perf_counter()
    if not SITE_PATTERN.match(site):
        raise IngestError(f"site name {site!r} must match {SITE_PATTERN.pattern} (it becomes a folder name)")
    if pseudo.site != site:
        raise IngestError(f"pseudonymizer is for site {pseudo.site!r}, not {site!r}")
    workers = worker_count(config.workers)
    pool = start_pool(workers)
    try:
        return _ingest(site, location(source), location(out), pseudo, labels, config, pool, workers, started)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _ingest(
    site: str,
    src: Location,
    dst: Location,
    pseudo: Pseudonymizer,
    labels: str | None,
    config: IngestConfig,
    pool: Executor | None,
    workers: int,
    started: float,
) -> dict[str, Any]:
    manifest = None
    if labels is not None:
        lab = location(labels)
        manifest = load_manifest(lab.read(lab.root).decode("utf-8-sig"), pseudo)
    items = src.list_files()
    _check_dataset(dst, pseudo)
    staging = dst.join("_staging", f"{S.SITE}={site}")
    if dst.exists(staging):
        dst.fs.delete_dir(staging)  # left by an interrupted run; never visible to readers
    run_dir = f"{staging}/{uuid.uuid4().hex}"
    existing, existing_files = _existing(dst, site)
    metadata = {
        "pe_triage.schema_version": S.SCHEMA_VERSION,
        "pe_triage.version": __version__,
        "pe_triage.key_fingerprint": pseudo.fingerprint,
        "pe_triage.ingest_config": json.dumps({k: v for k, v in to_dict(config).items() if k not in _EXECUTION_ONLY}, sort_keys=True),
    }
    scanned = [s for chunk in run(pool, _scan_chunk, [(src, c, pseudo) for c in _chunks(items, config.scan_chunk_files)]) for s in chunk]
    scan_s = time.perf_counter() - started

    def make_task(series_uid: str, cands: tuple[Candidate, ...], existing_file: str | None,
                  existing_sha: dict[str, str], labs: dict[str, str | None], rewrite: bool) -> SeriesTask:
        return SeriesTask(src, dst, pseudo, config, site, series_uid, cands, existing_file, existing_sha, labs,
                          rewrite, f"{run_dir}/{series_uid}.parquet", metadata)

    plan = _plan(scanned, existing, existing_files, manifest, make_task)
    plan.tasks.sort(key=lambda t: -len(t.candidates))  # largest first balances the workers
    results = list(run(pool, write_series, plan.tasks))
    outcomes = [*plan.quarantined, *(o for r in results for o in r.outcomes)]
    by_sop_outcome = {o.sop_uid: o for o in outcomes if o.sop_uid and o.status == QUARANTINED}
    final = dict(existing)
    for r in results:
        if r.staged:
            table = pq.read_table(r.staged, filesystem=dst.fs, columns=S.SLICES_META_COLUMNS)
            for row in table.to_pylist():
                final[row[S.SOP_UID]] = row
    label_report = _label_summary(manifest, final, plan.label_rows, by_sop_outcome) if manifest else None
    if config.strict_labels and label_report and (label_report["unmatched_rows"] or label_report["inconsistent_patients"]):
        if dst.exists(run_dir):
            dst.fs.delete_dir(run_dir)
        raise IngestError(
            f"label manifest does not match the ingested slices: {len(label_report['unmatched_rows'])} unmatched row(s), "
            f"{len(label_report['inconsistent_patients'])} inconsistent patient(s); first: "
            f"{(label_report['unmatched_rows'] or label_report['inconsistent_patients'])[0]}"
        )
    for r in results:  # commit: the only moment the dataset changes
        if r.staged:
            dst.replace(r.staged, dst.join(f"{S.SITE}={site}", f"{r.series_uid}.parquet"))
    if dst.exists(staging):
        dst.fs.delete_dir(staging)
    quarantine_rows = [
        {S.SITE: site, S.PATH_PSEUDONYM: pseudo("path", o.path), S.SOURCE_SHA256: o.sha256, S.SIZE_BYTES: o.size,
         S.REASON: o.reason.value, S.DETAIL: o.detail}
        for o in sorted(outcomes, key=lambda o: o.path)
        if o.status in (QUARANTINED, DUPLICATE) and o.reason is not None
    ]
    qpath = dst.join("_quarantine", f"{S.SITE}={site}", "quarantine.parquet")
    dst.fs.create_dir(qpath.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.Table.from_pylist(quarantine_rows, S.QUARANTINE_SCHEMA), qpath, filesystem=dst.fs, compression="zstd")
    report = _report(site, src, items, outcomes, final, results, label_report, pseudo, workers, scan_s, started)
    dst.write_bytes(dst.join("_reports", f"{S.SITE}={site}", "ingest_report.json"), json.dumps(report, indent=2).encode())
    return report


def _report(
    site: str,
    src: Location,
    items: list[tuple[str, int]],
    outcomes: list[Outcome],
    final: dict[str, dict[str, Any]],
    results: list[SeriesResult],
    label_report: dict[str, Any] | None,
    pseudo: Pseudonymizer,
    workers: int,
    scan_s: float,
    started: float,
) -> dict[str, Any]:
    status = Counter(o.status for o in outcomes)
    seen = len(items)
    duplicates = status[DUPLICATE] + status[ALREADY_INGESTED]
    if seen != status[INGESTED] + duplicates + status[QUARANTINED]:
        raise AssertionError(f"ingest lost track of files: {seen} seen, outcomes {dict(status)}")
    seconds = time.perf_counter() - started
    new_bytes = sum(o.size for o in outcomes if o.status == INGESTED)
    labels = Counter({label.value: 0 for label in S.Label})
    labels.update(row[S.LABEL] or "unlabelled" for row in final.values())
    return {
        "site": site,
        "source": src.uri,
        "schema_version": S.SCHEMA_VERSION,
        "pe_triage_version": __version__,
        "demo_key": pseudo.is_demo,
        "files": {"seen": seen, "ingested": status[INGESTED], "duplicates": duplicates, "quarantined": status[QUARANTINED]},
        "duplicates": {
            "already_ingested": status[ALREADY_INGESTED],
            "same_content_or_pixels": status[DUPLICATE],
        },
        "quarantine_reasons": dict(sorted(Counter(o.reason.value for o in outcomes if o.status == QUARANTINED and o.reason).items())),
        "dataset": {
            "patients": len({r[S.PATIENT_ID] for r in final.values()}),
            "series": len({r[S.SERIES_UID] for r in final.values()}),
            "slices": len(final),
            "series_written": sum(1 for r in results if r.staged),
            "slices_with_derived_uids": sum(1 for r in final.values() if r[S.UIDS_DERIVED]),
            "labels": dict(sorted(labels.items())),
        },
        "labels": label_report,
        "timing": {
            "workers": workers,
            "seconds": round(seconds, 3),
            "scan_seconds": round(scan_s, 3),
            "ingested_slices_per_s": round(status[INGESTED] / seconds, 1) if seconds else None,
            "ingested_mb_per_s": round(new_bytes / 1e6 / seconds, 1) if seconds else None,
        },
    }


def quarantined_files(site: str, source: str, out: str, *, pseudo: Pseudonymizer) -> list[dict[str, Any]]:
    """The quarantine table of ``site`` with clear relative paths, for the hospital that holds the key.

    Outputs only carry path pseudonyms; this maps them back by pseudonymising the source listing.
    """
    dst = location(out)
    table = pq.read_table(dst.join("_quarantine", f"{S.SITE}={site}", "quarantine.parquet"), filesystem=dst.fs)
    clear = {pseudo("path", rel): rel for rel, _ in location(source).list_files()}
    return [{"path": clear.get(row[S.PATH_PSEUDONYM]), **row} for row in table.to_pylist()]


"""Pass 2: one series per task (in a worker): read, hash, decode and convert each slice to HU in z order,
and stream row groups into the series' staged Parquet file. A series that gained slices or labels is
rewritten whole (its stored rows are copied, never re-decoded), so ``slice_index`` always follows z."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pe_triage import schema as S
from pe_triage.dicom import Rejected, SliceHeader, decode_hu
from pe_triage.ingest.records import (
    ALREADY_INGESTED,
    DUPLICATE,
    INGESTED,
    QUARANTINED,
    Candidate,
    Outcome,
    SeriesResult,
    SeriesTask,
)
from pe_triage.schema import Reason
from pe_triage.storage import Location, RowGroupWriter

_META_SCHEMA = pa.schema([f for f in S.SLICES_SCHEMA if f.name != S.HU])
_CONFLICT = "same SOP Instance UID as another file, different pixels"


def _row(task: SeriesTask, h: SliceHeader, label: str | None, digest: str, hu: np.ndarray) -> dict[str, Any]:
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
        S.SOURCE_HMAC: digest,
        S.LABEL: label,
        S.HU: hu,  # encoded into its row group's byte planes as it arrives (_stream)
    }


def _decode(task: SeriesTask, data: memoryview, header: SliceHeader) -> np.ndarray:
    return decode_hu(data, header, padding_hu=task.config.padding_hu, min_hu=task.config.min_hu)


class _Reader:
    """Reads each file whole, once, into one buffer reused from file to file: a new 0.5 MB bytes object
    per slice (and pyarrow's copy into it) cost more than the read itself. What is read is valid until
    the next read; decoding makes its own array."""

    def __init__(self, src: Location) -> None:
        self.src = src
        self._buffer = bytearray()

    def read(self, rel: str) -> memoryview:
        with self.src.fs.open_input_file(self.src.join(rel)) as f:
            size = f.size()
            if len(self._buffer) < size:
                self._buffer = bytearray(size)
            return memoryview(self._buffer)[: f.readinto(memoryview(self._buffer)[:size])]


def _stored_hu(task: SeriesTask, sop: str) -> bytes:
    assert task.existing_file is not None
    table = pq.read_table(task.existing_file, filesystem=task.out.fs, columns=[S.HU], filters=[(S.SOP_UID, "==", sop)])
    return table.column(S.HU)[0].as_py()


def _new_rows(task: SeriesTask, outcomes: list[Outcome], reader: _Reader) -> Iterator[dict[str, Any]]:
    """Decode the candidates in z order, resolving files that share a SOP Instance UID by content.

    The reference of a SOP is the stored row, else its first file (by path) that decodes. Another
    file is a duplicate if it has the same bytes or the same HU (a transcoded copy), and a
    conflict otherwise; a new SOP with conflicting files is not ingested at all.
    """
    for cand in task.candidates:
        resolved, row = _resolve(task, cand, reader)
        outcomes.extend(resolved)
        if row is not None:
            yield row


def _resolve(task: SeriesTask, cand: Candidate, reader: _Reader) -> tuple[list[Outcome], dict[str, Any] | None]:
    """The outcome of each file of one SOP, and its new row (None when stored already or not ingested)."""
    sop = cand.header.sop_uid
    known = task.existing_digest.get(sop)
    ref_digest, ref_path = known, None
    pixels: np.ndarray | None = None
    ref_hu: bytes | None = None
    resolved: list[Outcome] = []
    conflict = False
    for f in cand.files:
        assert f.header is not None
        try:
            data = reader.read(f.path)
        except OSError as exc:
            resolved.append(Outcome(f.path, f.size, None, QUARANTINED, sop, Reason.UNREADABLE,
                                    f"cannot read file ({type(exc).__name__})"))
            continue
        digest = task.pseudo.source_digest(data)
        if digest == ref_digest:
            resolved.append(
                Outcome(f.path, f.size, digest, ALREADY_INGESTED, sop) if known
                else Outcome(f.path, f.size, digest, DUPLICATE, sop, Reason.DUPLICATE,
                             f"same content as {task.pseudo('path', ref_path or '')}")
            )
            continue
        try:
            hu = _decode(task, data, f.header)
        except Rejected as r:
            resolved.append(Outcome(f.path, f.size, digest, QUARANTINED, sop, r.reason, r.detail))
            continue
        if ref_digest is None:
            ref_digest, ref_path, pixels = digest, f.path, hu
            resolved.append(Outcome(f.path, f.size, digest, INGESTED, sop))
            continue
        if ref_hu is None:
            ref = pixels if pixels is not None else S.decode_hu(_stored_hu(task, sop), f.header.rows, f.header.cols)
            ref_hu = ref.tobytes()
        if hu.tobytes() == ref_hu:
            resolved.append(Outcome(f.path, f.size, digest, DUPLICATE, sop, Reason.DUPLICATE,
                                    "same SOP Instance UID and identical HU as an ingested slice (other encoding)"))
        else:
            conflict = True
            resolved.append(Outcome(f.path, f.size, digest, QUARANTINED, sop, Reason.CONFLICTING_UID, _CONFLICT))
    if conflict and not known:  # nothing says which file is right: none of them goes in
        return [
            o if o.status == QUARANTINED
            else Outcome(o.path, o.size, o.digest, QUARANTINED, sop, Reason.CONFLICTING_UID, _CONFLICT)
            for o in resolved
        ], None
    if pixels is None:
        return resolved, None
    primary = next(f for f in cand.files if f.path == ref_path)
    assert primary.header is not None and ref_digest is not None
    return resolved, _row(task, primary.header, cand.label, ref_digest, pixels)


def _old_rows(task: SeriesTask) -> Iterator[dict[str, Any]]:
    if task.existing_file is None:
        return
    parquet = pq.ParquetFile(task.existing_file, filesystem=task.out.fs)
    for batch in parquet.iter_batches(batch_size=task.config.row_group_slices):
        for row in batch.to_pylist():
            row[S.LABEL] = task.labels.get(row[S.SOP_UID], row[S.LABEL])
            yield row


def _table(batch: list[dict[str, Any]], planes: np.ndarray) -> pa.Table:
    """One row group: metadata from the row dicts, pixels already encoded into ``planes`` (row i in planes[i])."""
    size = planes.shape[1]
    offsets = np.arange(0, (len(batch) + 1) * size, size, dtype=np.int32)
    column = pa.Array.from_buffers(pa.binary(), len(batch), [None, pa.py_buffer(offsets), pa.py_buffer(planes[: len(batch)])])
    return pa.Table.from_pylist(batch, schema=_META_SCHEMA).append_column(S.SLICES_SCHEMA.field(S.HU), column)


def _encode(row: dict[str, Any], out: np.ndarray) -> None:
    """The row's pixels into ``out`` (its slot of the row group), dropped from the row."""
    pixels = row.pop(S.HU)
    if isinstance(pixels, np.ndarray):
        S.encode_hu(pixels, out=out)
    else:  # a stored row, already encoded
        out[:] = np.frombuffer(pixels, np.uint8)


def write_series(task: SeriesTask) -> SeriesResult:
    """Pass 2 for one series (runs in a worker): stream its slices, in z order, to a staged file."""
    outcomes: list[Outcome] = []
    result = SeriesResult(task.series_uid, None, 0, outcomes)
    new = _new_rows(task, outcomes, _Reader(task.src))
    has_new = any(c.header.sop_uid not in task.existing_digest for c in task.candidates)
    if not (has_new or task.rewrite):
        for _ in new:  # only verifies re-seen files against what is stored
            pass
        return result
    schema = S.SLICES_SCHEMA.with_metadata(task.metadata)
    with RowGroupWriter(task.out, task.staged, schema, bulk=S.HU, zstd_level=task.config.zstd_level) as writer:
        n = _stream(task, heapq.merge(_old_rows(task), new, key=lambda r: r[S.Z_MM]), writer, result.written)
    if writer.opened:
        result.staged, result.rows = task.staged, n
    return result


def _stream(task: SeriesTask, rows: Iterator[dict[str, Any]], writer: RowGroupWriter, written: list[dict[str, Any]]) -> int:
    """Numbers the rows and writes them in row groups. Each row's pixels are encoded into its slot of one
    buffer (reused from group to group: the writer has compressed a group when ``write`` returns) as the
    row arrives, so a row group does not hold 32 decoded slices: freeing those together hands their memory
    back to the system, and taking it again costs page faults (~0.2 ms a slice). The rows, without their
    pixels, go to ``written``."""
    group = task.config.row_group_slices
    batch: list[dict[str, Any]] = []
    planes: np.ndarray | None = None
    n = 0
    for row in rows:
        size = 2 * row[S.ROWS] * row[S.COLS]  # one geometry per series (the plan keeps it)
        if planes is None:
            planes = np.empty((group, size), np.uint8)
        _encode(row, planes[len(batch)])
        row[S.SLICE_INDEX] = n
        n += 1
        batch.append(row)
        written.append(row)
        if len(batch) == group:
            writer.write(_table(batch, planes))
            batch = []
    if batch and planes is not None:
        writer.write(_table(batch, planes))
    return n

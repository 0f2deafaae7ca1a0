"""``slices`` → ``windows``: crop each slice to the lungs, resize, and store its HU windows as uint8.

One task per row group of a series' slices file (worker processes), so one long series keeps every
worker busy; this process writes each series' file from its chunks in order, while the workers
run ahead on the next ones. A series whose source slices, labels and configuration are unchanged
is not rewritten (the digest in its file metadata says so), so a re-run is cheap and changes
nothing; files are staged and moved into place at the end, as in ingest.

Layout of ``out``: ``site=<site>/<series>.parquet`` (schema.windows_schema) and
``_reports/preprocess_report.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pe_triage import schema as S
from pe_triage.config import CropConfig, PreprocessConfig, to_dict
from pe_triage.lung_crop import Box, LungBox, NoBodyError, crop_resize, find_lung_box, fixed_box
from pe_triage.parallel import run, stream, worker_count, worker_pool
from pe_triage.progress import progress
from pe_triage.provenance import parquet_dataset_digest
from pe_triage.storage import Location, RowGroupWriter, location
from pe_triage.windows import PRESETS, Window, window_to_uint8

log = logging.getLogger(__name__)

#: HU range a CT scanner reconstructs; values outside are reported (they are clipped by the windows)
CT_HU_RANGE = (-1024, 3071)
_READ_COLUMNS = [*S.WINDOWS_KEYS, S.ROWS, S.COLS, S.PIXEL_SPACING_ROW, S.PIXEL_SPACING_COL, S.HU]


class PreprocessError(ValueError):
    """The configuration or the input cannot be used; the message names the problem."""


def resolve_windows(config: PreprocessConfig) -> list[Window]:
    """The configured window names, in channel order, from ``custom_windows`` or the presets."""
    custom: dict[str, Window] = {}
    for w in config.custom_windows:
        if w.lo is not None and w.hi is not None and w.level is None and w.width is None:
            custom[w.name] = Window(w.name, w.lo, w.hi)
        elif w.level is not None and w.width is not None and w.lo is None and w.hi is None:
            custom[w.name] = Window.from_level_width(w.name, w.level, w.width)
        else:
            raise PreprocessError(f"custom window {w.name!r}: give either lo and hi, or level and width")
    unknown = [n for n in config.windows if n not in custom and n not in PRESETS]
    if unknown or not config.windows:
        raise PreprocessError(f"unknown window(s) {unknown}; presets: {sorted(PRESETS)}, custom: {sorted(custom)}")
    return [custom.get(n) or PRESETS[n] for n in config.windows]


def window_stack(patch: np.ndarray, windows: list[Window], out: np.ndarray) -> np.ndarray:
    """[n_windows, H, W] uint8 of one resized HU patch, written into ``out``."""
    for i, w in enumerate(windows):
        window_to_uint8(patch, w, out=out[i])
    return out


def slice_box(hu: np.ndarray, spacing: tuple[float, float], config: PreprocessConfig) -> LungBox:
    """The crop of one slice for the ``dynamic`` and ``fixed`` modes (``series`` unions these).
    A fixed crop does not look for lungs; it reports ``lung_found`` True."""
    crop = config.crop
    if crop.mode == "fixed":
        rows, cols = hu.shape
        return LungBox(fixed_box(rows, cols, crop.fixed_height_fraction, crop.fixed_width_fraction), lung_found=True)
    return find_lung_box(hu, spacing, crop)


def too_small(rows: int, cols: int, config: PreprocessConfig) -> str | None:
    """Why a slice of this size is skipped (not diagnostic CT), or None."""
    if min(rows, cols) < config.min_image_size:
        return f"image {rows}x{cols} smaller than {config.min_image_size} px"
    return None


def lung_boxes(slices: Iterable[tuple[np.ndarray, tuple[float, float]]], config: CropConfig) -> Iterator[LungBox]:
    """The lung (or body) box of every ``(hu, spacing)`` slice that shows a patient."""
    for hu, spacing in slices:
        try:
            yield find_lung_box(hu, spacing, config)
        except NoBodyError:
            continue


def union_box(found: Iterable[LungBox]) -> Box | None:
    """The union of the lung boxes, or of the body boxes when none shows lung; None for no box."""
    lung: Box | None = None
    body: Box | None = None
    for f in found:
        if f.lung_found:
            lung = f.box if lung is None else lung.union(f.box)
        else:
            body = f.box if body is None else body.union(f.box)
    return lung or body


def series_box(slices: Iterable[tuple[np.ndarray, tuple[float, float]]], config: PreprocessConfig) -> Box | None:
    """The one crop of every slice of a series in ``series`` mode: :func:`union_box` of its slices'
    boxes. None in the other modes (``slices`` is then not consumed, so a lazy pass over a file
    costs nothing) or without a body."""
    if config.crop.mode != "series":
        return None
    return union_box(lung_boxes(slices, config.crop))


def window_slice(hu: np.ndarray, spacing: tuple[float, float], config: PreprocessConfig, windows: list[Window],
                 out: np.ndarray, *, union: Box | None, patch: np.ndarray | None = None) -> LungBox:
    """Crop one slice (to the series' ``union`` when given, else to its own box), resize it and write
    its windows into ``out`` [n_windows, size, size]; returns the box used and whether the slice shows
    lung. One function, so that prediction crops exactly as the training data was cropped.
    Raises :class:`NoBodyError` for a slice without a patient (it is skipped)."""
    found = slice_box(hu, spacing, config)
    box = union if union is not None else found.box
    window_stack(crop_resize(hu, box, config.size, out=patch), windows, out)
    return LungBox(box, found.lung_found)


@dataclass(frozen=True)
class SeriesJob:
    """A series whose windows are (re)written; its slices file's row groups are its chunks."""

    path: str  # the series' slices file
    staged: str
    site: str
    series_uid: str
    slices: int
    row_groups: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class ChunkJob:
    """One row group of a series' slices file, for a worker: chunks, not series, are the unit of
    work, so a site with one long series still keeps every worker busy."""

    src: Location
    path: str
    series_uid: str
    row_group: int
    config: PreprocessConfig
    union: Box | None = None  # the series' crop in ``series`` mode
    #: a file where a worker process leaves the window stack: through a file in the page cache it
    #: costs ~4x less CPU than pickled through the pool's pipe (megabytes per chunk)
    spill: str | None = None


@dataclass
class Chunk:
    """What a worker made of a :class:`ChunkJob`: the key columns and window stacks of the slices kept."""

    keys: pa.Table  # the windows schema but its windows column
    stack: np.ndarray | str  # uint8 [len(keys), n_windows, size, size], or the file it was spilled to
    total: int  # slices read
    skipped: list[dict[str, Any]]  # {series_uid, slice_index, reason}
    warnings: list[str]
    shapes: set[tuple[int, int]]


@dataclass
class SeriesResult:
    site: str
    series_uid: str
    written: int = 0
    staged: str | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)


def _read(job: ChunkJob, columns: list[str]) -> pa.Table:
    """The chunk's row group, read on this thread: the parallelism is the worker processes'."""
    parquet = pq.ParquetFile(job.path, filesystem=job.src.fs)
    return parquet.read_row_group(job.row_group, columns=columns, use_threads=False)


def _values(column: pa.ChunkedArray) -> Iterator[np.ndarray]:
    """The values of a binary column as views of its buffers (``to_pylist`` copies every slice)."""
    for chunk in column.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2]
        values = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
            yield values[start:stop]


def _slices(table: pa.Table) -> Iterator[tuple[int, tuple[int, int], tuple[float, float], np.ndarray]]:
    """(slice_index, (rows, cols), spacing, hu_planes) per row of a slices table."""
    columns = (table.column(c).to_pylist() for c in (S.SLICE_INDEX, S.ROWS, S.COLS, S.PIXEL_SPACING_ROW,
                                                     S.PIXEL_SPACING_COL))
    for (index, rows, cols, dy, dx), planes in zip(zip(*columns, strict=True), _values(table.column(S.HU)), strict=True):
        yield index, (rows, cols), (dy, dx), planes


def chunk_boxes(job: ChunkJob) -> tuple[int, list[LungBox]]:
    """(slices, their boxes) of a chunk, for its series' union in ``series`` mode (runs in a worker)."""
    cv2.setNumThreads(1)  # the parallelism is the worker processes'
    table = _read(job, [S.SLICE_INDEX, S.ROWS, S.COLS, S.PIXEL_SPACING_ROW, S.PIXEL_SPACING_COL, S.HU])
    slices = ((S.decode_hu(planes, *shape), spacing) for _, shape, spacing, planes in _slices(table))
    return table.num_rows, list(lung_boxes(slices, job.config.crop))


def window_chunk(job: ChunkJob) -> Chunk:
    """Windows of a chunk's slices, into one preallocated stack (runs in a worker)."""
    cfg = job.config
    cv2.setNumThreads(1)  # the parallelism is the worker processes'
    windows = resolve_windows(cfg)
    table = _read(job, _READ_COLUMNS)
    stack = np.empty((table.num_rows, len(windows), cfg.size, cfg.size), np.uint8)
    patch = np.empty((cfg.size, cfg.size), np.int16)
    skipped: list[dict[str, Any]] = []
    warnings: list[str] = []
    shapes: set[tuple[int, int]] = set()
    kept: list[int] = []
    found: list[LungBox] = []
    for i, (index, shape, spacing, planes) in enumerate(_slices(table)):
        where = {"series_uid": job.series_uid, "slice_index": index}
        shapes.add(shape)
        reason = too_small(*shape, cfg)
        if reason:
            skipped.append({**where, "reason": reason})
            continue
        hu = S.decode_hu(planes, *shape)
        lo, hi = int(hu.min()), int(hu.max())
        if lo < CT_HU_RANGE[0] or hi > CT_HU_RANGE[1]:
            warnings.append(f"{job.series_uid} slice {index}: HU {lo}..{hi} outside {CT_HU_RANGE} (clipped by the windows)")
        try:
            found.append(window_slice(hu, spacing, cfg, windows, stack[len(kept)], union=job.union, patch=patch))
        except NoBodyError:
            skipped.append({**where, "reason": "no body in the slice (empty table or air)"})
            continue
        kept.append(i)
    done: np.ndarray | str = stack[: len(kept)]
    if job.spill:
        stack[: len(kept)].tofile(job.spill)
        done = job.spill
    return Chunk(_keys(table, kept, found), done, table.num_rows, skipped, warnings, shapes)


def _keys(table: pa.Table, kept: list[int], found: list[LungBox]) -> pa.Table:
    """The key columns of the windows schema for the ``kept`` rows of a slices table."""
    schema = pa.schema([f for f in S.windows_schema(1, 1) if f.name != S.WINDOWS])
    boxes = [f.box for f in found]
    crops = [pa.array([b[k] for b in boxes], pa.int32()) for k in range(4)]  # y0, y1, x0, x1
    keys = table.select(S.WINDOWS_KEYS).take(pa.array(kept, pa.int64()))
    return pa.Table.from_arrays([*keys.columns, *crops, pa.array([f.lung_found for f in found], pa.bool_())],
                                schema=schema)


class _SeriesWriter:
    """A series' windows file, written in this process from its chunks in order, in row groups of
    ``row_group_slices`` whatever the chunk sizes (the same file as one pass over the series; the
    chunks' tables are sliced and joined, not copied)."""

    def __init__(self, job: SeriesJob, out: Location, n_windows: int, config: PreprocessConfig) -> None:
        self.job, self.rows = job, config.row_group_slices
        self.schema = S.windows_schema(n_windows, config.size).with_metadata(job.metadata)
        self.writer = RowGroupWriter(out, job.staged, self.schema, bulk=S.WINDOWS, zstd_level=config.zstd_level)
        self.result = SeriesResult(job.site, job.series_uid)
        self.pending = self.schema.empty_table()
        self.total = 0
        self.shapes: set[tuple[int, int]] = set()

    def add(self, chunk: Chunk) -> None:
        r = self.result
        r.skipped += chunk.skipped
        r.warnings += chunk.warnings
        r.labels.update(label or "unlabelled" for label in chunk.keys.column(S.LABEL).to_pylist())
        r.written += chunk.keys.num_rows
        self.total += chunk.total
        self.shapes |= chunk.shapes
        table = chunk.keys.append_column(self.schema.field(S.WINDOWS), S.windows_array(self._stack(chunk)))
        self.pending = pa.concat_tables([self.pending, table])
        while self.pending.num_rows >= self.rows:
            self.writer.write(self.pending.slice(0, self.rows))
            self.pending = self.pending.slice(self.rows)

    def _stack(self, chunk: Chunk) -> np.ndarray:
        if isinstance(chunk.stack, np.ndarray):
            return chunk.stack
        stack = np.fromfile(chunk.stack, np.uint8)
        os.remove(chunk.stack)
        return stack.reshape(chunk.keys.num_rows, *S.windows_shape(self.schema.field(S.WINDOWS)))

    def __enter__(self) -> _SeriesWriter:
        return self

    def __exit__(self, error: type[BaseException] | None, *rest: object) -> None:
        """Writes what is left (unless the run failed) and closes the file either way."""
        if error is None and self.pending.num_rows:
            self.writer.write(self.pending)
        self.writer.__exit__()

    def finish(self) -> SeriesResult:
        """The series' result, with its series-level warnings (once the file is closed)."""
        uid = self.job.series_uid
        if self.total == 1:
            self.result.warnings.append(f"{uid}: a series of one slice (no neighbours; kept)")
        for rows, cols in sorted(self.shapes):
            if rows != cols:
                self.result.warnings.append(f"{uid}: non-square images {rows}x{cols} (square crops are clipped to the image)")
        self.result.staged = self.job.staged if self.writer.opened else None
        return self.result


def _digest(src: Location, path: str, config_json: str) -> tuple[str, str, str, pq.FileMetaData]:
    """(site, series, digest of what the series' windows depend on: its slices, labels and the config,
    the file's Parquet metadata)."""
    parquet = pq.ParquetFile(path, filesystem=src.fs)
    table = parquet.read(columns=[S.SITE, S.SERIES_UID, S.SOURCE_HMAC, S.LABEL, S.SLICE_INDEX])
    h = hashlib.sha256(config_json.encode())
    for sha, label, index in zip(*(table.column(c).to_pylist() for c in (S.SOURCE_HMAC, S.LABEL, S.SLICE_INDEX)), strict=True):
        h.update(f"{index}:{sha}:{label}\n".encode())
    return table.column(S.SITE)[0].as_py(), table.column(S.SERIES_UID)[0].as_py(), h.hexdigest(), parquet.metadata


def _stored_digest(out: Location, path: str) -> str | None:
    if not out.exists(path):
        return None
    metadata = pq.read_schema(path, filesystem=out.fs).metadata or {}
    return metadata.get(S.META_SOURCE_DIGEST.encode(), b"").decode() or None


def preprocess(slices: str, out: str, *, config: PreprocessConfig = PreprocessConfig()) -> dict[str, Any]:
    """Windows dataset at ``out`` from the slices dataset at ``slices``; returns the run report."""
    started = time.perf_counter()
    windows = resolve_windows(config)
    if config.size < 16:
        raise PreprocessError(f"size {config.size} is too small for a CT slice")
    src, dst = location(slices), location(out)
    files = [f"{src.root}/{rel}" for rel, _ in src.list_files()
             if rel.startswith(f"{S.SITE}=") and rel.endswith(".parquet") and rel.count("/") == 1]
    if not files:
        raise PreprocessError(f"{slices}: no slices files (site=<site>/<series>.parquet)")
    slices_digest = parquet_dataset_digest(slices)[0]  # lineage: what the retraining trigger compares the store with
    jobs, unchanged = _plan(src, dst, files, windows, config)
    todo = sum(j.slices for j in jobs)
    workers = max(1, min(worker_count(config.workers), todo // max(1, config.min_slices_per_worker)))
    with worker_pool(workers) as pool, tempfile.TemporaryDirectory(prefix="pe-triage-preprocess-") as spill:
        unions = _unions(pool, src, jobs, config)
        chunks = _chunks(src, jobs, config, unions, spill if pool is not None else None)
        results = _write_series(stream(pool, window_chunk, chunks, ahead=2 * workers), dst, jobs, len(windows), config)
    _commit(dst, results)
    report = _report(slices, windows, config, results, series=len(files), unchanged=len(unchanged), workers=workers,
                     tasks=sum(j.row_groups for j in jobs), seconds=time.perf_counter() - started)
    report["slices_digest"] = slices_digest
    dst.write_bytes(dst.join("_reports", "preprocess_report.json"), json.dumps(report, indent=2).encode())
    return report


def _write_series(chunks: Iterator[Chunk], dst: Location, jobs: list[SeriesJob], n_windows: int,
                  config: PreprocessConfig) -> list[SeriesResult]:
    """Each series' staged file from its chunks, which come in job order (the workers run ahead)."""
    results = []
    with progress(sum(j.slices for j in jobs), "preprocess", unit="slice", logger=log) as bar:
        for job in jobs:
            with _SeriesWriter(job, dst, n_windows, config) as writer:
                for _ in range(job.row_groups):
                    chunk = next(chunks)
                    writer.add(chunk)
                    bar.update(chunk.total)
            results.append(writer.finish())
            bar.update(0, series=f"{len(results)}/{len(jobs)}")
    return results


def _chunks(src: Location, jobs: list[SeriesJob], config: PreprocessConfig, unions: dict[str, Box | None],
            spill: str | None = None) -> Iterator[ChunkJob]:
    """A task per row group of each series' slices file, in order; with ``spill`` (a folder), each
    leaves its window stack in a file of its own there."""
    for i, job in enumerate(jobs):
        for group in range(job.row_groups):
            yield ChunkJob(src, job.path, job.series_uid, group, config, unions.get(job.path),
                           f"{spill}/{i}-{group}.u8" if spill else None)


def _unions(pool: Executor | None, src: Location, jobs: list[SeriesJob], config: PreprocessConfig) -> dict[str, Box | None]:
    """Series file -> the crop of all its slices in ``series`` mode (a first pass, in chunks too); empty otherwise."""
    if config.crop.mode != "series":
        return {}
    found: dict[str, list[LungBox]] = {job.path: [] for job in jobs}
    chunks = list(_chunks(src, jobs, config, {}))
    with progress(sum(j.slices for j in jobs), "preprocess: series crops", unit="slice", logger=log) as bar:
        for job, (n, boxes) in zip(chunks, run(pool, chunk_boxes, chunks), strict=True):
            found[job.path] += boxes
            bar.update(n)
    return {path: union_box(boxes) for path, boxes in found.items()}


def _config_json(config: PreprocessConfig) -> str:
    """The configuration as the windows depend on it: the settings that only change how a run executes
    stay out ("workers" stays, as null, so that the digests of datasets written before are unchanged)."""
    return json.dumps({k: v for k, v in to_dict(config).items() if k != "min_slices_per_worker"} | {"workers": None},
                      sort_keys=True)


def preprocess_into(slices: str, root: str, *, slices_digest: str,
                    config: PreprocessConfig = PreprocessConfig()) -> dict[str, Any]:
    """Bring the persistent windows store of ``config`` under ``root`` up to the slices store at
    ``slices_digest``. One store per preprocessing configuration (``<root>/windows/<config hash>``),
    updated in place, so a retraining after a new site preprocesses only the new series; a record per
    slices digest (``_versions/``) makes a store already at that digest a no-op. Returns the record:
    uri, config hash, slices digest, windows digest, series counts, and ``reused``."""
    if not all(c in "0123456789abcdef" for c in slices_digest) or not 16 <= len(slices_digest) <= 128:
        raise PreprocessError(f"slices digest {slices_digest!r}: expected the hex digest of the slices store")
    config_hash = hashlib.sha256(_config_json(config).encode()).hexdigest()[:16]
    out = f"{root.rstrip('/')}/windows/{config_hash}"
    dst = location(out)
    record_path = dst.join("_versions", f"{slices_digest}.json")
    if dst.exists(record_path):
        return json.loads(dst.read(record_path)) | {"reused": True}
    report = preprocess(slices, out, config=config)
    record = {"uri": out, "config_hash": config_hash, "slices_digest": slices_digest,
              "windows_digest": parquet_dataset_digest(out)[0], "series": report["series"],
              "windows": report["windows"], "size": report["size"], "labels": report["labels_written"]}
    dst.write_bytes(record_path, json.dumps(record, indent=2).encode())
    return record | {"reused": False}


def _plan(src: Location, dst: Location, files: list[str], windows: list[Window],
          config: PreprocessConfig) -> tuple[list[SeriesJob], list[str]]:
    """A job per series whose windows would differ from those already at ``dst``; (jobs, unchanged files)."""
    config_json = _config_json(config)
    metadata_base = {
        S.META_WINDOWS: json.dumps([{"name": w.name, "lo": w.lo, "hi": w.hi} for w in windows]),
        S.META_PREPROCESS: config_json,
        "pe_triage.schema_version": S.SCHEMA_VERSION,
    }
    run_dir = dst.join("_staging", uuid.uuid4().hex)
    jobs, unchanged = [], []
    for path in files:
        site, series, digest, meta = _digest(src, path, config_json)
        final = dst.join(f"{S.SITE}={site}", f"{series}.parquet")
        if _stored_digest(dst, final) == digest:
            unchanged.append(final)
            continue
        jobs.append(SeriesJob(path, f"{run_dir}/{S.SITE}={site}/{series}.parquet", site, series, meta.num_rows,
                              meta.num_row_groups, metadata_base | {S.META_SOURCE_DIGEST: digest}))
    return jobs, unchanged


def _commit(dst: Location, results: list[SeriesResult]) -> None:
    """Move the staged files into place only once every series is done, so a failed run leaves the
    previous windows whole."""
    for r in results:
        final = dst.join(f"{S.SITE}={r.site}", f"{r.series_uid}.parquet")
        if r.staged:
            dst.replace(r.staged, final)
        elif dst.exists(final):
            dst.fs.delete_file(final)  # every slice of the series was skipped
    if dst.exists(dst.join("_staging")):
        dst.fs.delete_dir(dst.join("_staging"))


def _report(slices: str, windows: list[Window], config: PreprocessConfig, results: list[SeriesResult], *, series: int,
            unchanged: int, workers: int, tasks: int, seconds: float) -> dict[str, Any]:
    """What the run did, per series and per slice, for the command line and ``_reports``."""
    labels = sum((r.labels for r in results), Counter())
    warnings = [w for r in results for w in r.warnings]
    if results and not (set(labels) - {"unlabelled"}):
        warnings.append("no slice has a label: the windows are written, but splits and training need a label manifest")
    written = sum(r.written for r in results)
    return {
        "slices": slices,
        "windows": [w.name for w in windows],
        "crop_mode": config.crop.mode,
        "size": config.size,
        "series": {"total": series, "written": sum(1 for r in results if r.staged), "unchanged": unchanged},
        "slices_written": written,
        "slices_skipped": [s for r in results for s in r.skipped],
        "labels_written": dict(sorted(labels.items())),
        "warnings": warnings,
        "timing": {"workers": workers, "tasks": tasks, "seconds": round(seconds, 3),
                   "slices_per_s": round(written / seconds, 1) if seconds else None},
    }

"""``slices`` → ``windows``: crop each slice to the lungs, resize, and store its HU windows as uint8.

One task per series (worker processes), streaming row groups in and out. A series whose source
slices, labels and configuration are unchanged is not rewritten (the digest in its file metadata
says so), so a re-run is cheap and changes nothing; files are staged and moved into place at the
end, as in ingest.

Layout of ``out``: ``site=<site>/<series>.parquet`` (schema.windows_schema) and
``_reports/preprocess_report.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pe_triage import schema as S
from pe_triage.config import PreprocessConfig, to_dict
from pe_triage.lung_crop import Box, LungBox, NoBodyError, crop_resize, find_lung_box, fixed_box
from pe_triage.parallel import run, worker_count, worker_pool
from pe_triage.storage import Location, RowGroupWriter, location
from pe_triage.windows import PRESETS, Window, window_to_uint8

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


def series_box(slices: Iterable[tuple[np.ndarray, tuple[float, float]]], config: PreprocessConfig) -> Box | None:
    """The one crop of every slice of a series in ``series`` mode: the union of the lung boxes of
    its ``(hu, spacing)`` slices, or of the body boxes when none shows lung. None in the other modes
    (``slices`` is then not consumed, so a lazy pass over a file costs nothing) or without a body."""
    if config.crop.mode != "series":
        return None
    lung: Box | None = None
    body: Box | None = None
    for hu, spacing in slices:
        try:
            found = find_lung_box(hu, spacing, config.crop)
        except NoBodyError:
            continue
        if found.lung_found:
            lung = found.box if lung is None else lung.union(found.box)
        else:
            body = found.box if body is None else body.union(found.box)
    return lung or body


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
    src: Location
    out: Location
    path: str  # the series' slices file
    staged: str
    site: str
    series_uid: str
    digest: str
    config: PreprocessConfig
    metadata: dict[str, str]


@dataclass
class SeriesResult:
    site: str
    series_uid: str
    written: int = 0
    staged: str | None = None
    unchanged: bool = False
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {series, slice_index, reason}
    warnings: list[str] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)


def _rows(job: SeriesJob) -> Iterator[dict[str, Any]]:
    parquet = pq.ParquetFile(job.path, filesystem=job.src.fs)
    for batch in parquet.iter_batches(batch_size=job.config.row_group_slices, columns=_READ_COLUMNS):
        yield from batch.to_pylist()


def _hu(row: dict[str, Any]) -> np.ndarray:
    return S.decode_hu(row[S.HU], row[S.ROWS], row[S.COLS])


def _spacing(row: dict[str, Any]) -> tuple[float, float]:
    return row[S.PIXEL_SPACING_ROW], row[S.PIXEL_SPACING_COL]


def process_series(job: SeriesJob) -> SeriesResult:
    """Windows of one series into a staged file (runs in a worker)."""
    cfg = job.config
    result = SeriesResult(job.site, job.series_uid)
    windows = resolve_windows(cfg)
    schema = S.windows_schema(len(windows), cfg.size).with_metadata(job.metadata)
    cv2.setNumThreads(1)  # the parallelism is the worker processes'
    union = series_box(((_hu(row), _spacing(row)) for row in _rows(job)), cfg)  # a first pass, series mode only
    stack = np.empty((cfg.row_group_slices, len(windows), cfg.size, cfg.size), np.uint8)
    patch = np.empty((cfg.size, cfg.size), np.int16)
    batch: list[dict[str, Any]] = []
    total = 0
    shapes: set[tuple[int, int]] = set()
    key_schema = pa.schema([f for f in schema if f.name != S.WINDOWS])
    with RowGroupWriter(job.out, job.staged, schema, bulk=S.WINDOWS, zstd_level=cfg.zstd_level) as writer:

        def flush() -> None:
            nonlocal batch
            table = pa.Table.from_pylist(batch, schema=key_schema)
            writer.write(table.append_column(schema.field(S.WINDOWS), S.windows_array(stack[: len(batch)])))
            batch = []

        for row in _rows(job):
            total += 1
            where = {"series_uid": job.series_uid, "slice_index": row[S.SLICE_INDEX]}
            rows, cols = row[S.ROWS], row[S.COLS]
            shapes.add((rows, cols))
            reason = too_small(rows, cols, cfg)
            if reason:
                result.skipped.append({**where, "reason": reason})
                continue
            hu = _hu(row)
            lo, hi = int(hu.min()), int(hu.max())
            if lo < CT_HU_RANGE[0] or hi > CT_HU_RANGE[1]:
                result.warnings.append(f"{job.series_uid} slice {row[S.SLICE_INDEX]}: HU {lo}..{hi} outside {CT_HU_RANGE} "
                                       "(clipped by the windows)")
            try:
                found = window_slice(hu, _spacing(row), cfg, windows, stack[len(batch)], union=union, patch=patch)
            except NoBodyError:
                result.skipped.append({**where, "reason": "no body in the slice (empty table or air)"})
                continue
            box = found.box
            batch.append({**{k: row[k] for k in S.WINDOWS_KEYS}, S.CROP_Y0: box.y0, S.CROP_Y1: box.y1,
                          S.CROP_X0: box.x0, S.CROP_X1: box.x1, S.LUNG_FOUND: found.lung_found})
            result.labels[row[S.LABEL] or "unlabelled"] += 1
            result.written += 1
            if len(batch) == cfg.row_group_slices:
                flush()
        if batch:
            flush()
    if total == 1:
        result.warnings.append(f"{job.series_uid}: a series of one slice (no neighbours; kept)")
    for rows, cols in sorted(shapes):
        if rows != cols:
            result.warnings.append(f"{job.series_uid}: non-square images {rows}x{cols} (square crops are clipped to the image)")
    result.staged = job.staged if writer.opened else None
    return result


def _digest(src: Location, path: str, config_json: str) -> tuple[str, str, str]:
    """(site, series, digest of what the series' windows depend on: its slices, labels and the config)."""
    table = pq.read_table(path, filesystem=src.fs, columns=[S.SITE, S.SERIES_UID, S.SOURCE_HMAC, S.LABEL, S.SLICE_INDEX])
    h = hashlib.sha256(config_json.encode())
    for sha, label, index in zip(*(table.column(c).to_pylist() for c in (S.SOURCE_HMAC, S.LABEL, S.SLICE_INDEX)), strict=True):
        h.update(f"{index}:{sha}:{label}\n".encode())
    return table.column(S.SITE)[0].as_py(), table.column(S.SERIES_UID)[0].as_py(), h.hexdigest()


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
    workers = worker_count(config.workers)
    with worker_pool(workers) as pool:
        src, dst = location(slices), location(out)
        files = [f"{src.root}/{rel}" for rel, _ in src.list_files()
                 if rel.startswith(f"{S.SITE}=") and rel.endswith(".parquet") and rel.count("/") == 1]
        if not files:
            raise PreprocessError(f"{slices}: no slices files (site=<site>/<series>.parquet)")
        jobs, unchanged = _plan(src, dst, files, windows, config)
        results = list(run(pool, process_series, jobs))
    _commit(dst, results)
    report = _report(slices, windows, config, results, series=len(files), unchanged=len(unchanged), workers=workers,
                     seconds=time.perf_counter() - started)
    dst.write_bytes(dst.join("_reports", "preprocess_report.json"), json.dumps(report, indent=2).encode())
    return report


def _plan(src: Location, dst: Location, files: list[str], windows: list[Window],
          config: PreprocessConfig) -> tuple[list[SeriesJob], list[str]]:
    """A job per series whose windows would differ from those already at ``dst``; (jobs, unchanged files)."""
    config_json = json.dumps(to_dict(config) | {"workers": None}, sort_keys=True)
    metadata_base = {
        S.META_WINDOWS: json.dumps([{"name": w.name, "lo": w.lo, "hi": w.hi} for w in windows]),
        S.META_PREPROCESS: config_json,
        "pe_triage.schema_version": S.SCHEMA_VERSION,
    }
    run_dir = dst.join("_staging", uuid.uuid4().hex)
    jobs, unchanged = [], []
    for path in files:
        site, series, digest = _digest(src, path, config_json)
        final = dst.join(f"{S.SITE}={site}", f"{series}.parquet")
        if _stored_digest(dst, final) == digest:
            unchanged.append(final)
            continue
        jobs.append(SeriesJob(src, dst, path, f"{run_dir}/{S.SITE}={site}/{series}.parquet", site, series, digest, config,
                              metadata_base | {S.META_SOURCE_DIGEST: digest}))
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
            unchanged: int, workers: int, seconds: float) -> dict[str, Any]:
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
        "timing": {"workers": workers, "seconds": round(seconds, 3),
                   "slices_per_s": round(written / seconds, 1) if seconds else None},
    }

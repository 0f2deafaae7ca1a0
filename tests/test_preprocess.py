"""slices -> windows: output contract, idempotence, crop modes, and bad input named in the report."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from factories import ct_slice, pseudo, write

from pe_triage import schema as S
from pe_triage.config import ConfigError, CropConfig, IngestConfig, PreprocessConfig, WindowConfig
from pe_triage.dicom import decode_hu, parse_header
from pe_triage.ingest import ingest_site
from pe_triage.parallel import stream
from pe_triage.preprocess import PreprocessError, preprocess, resolve_windows, window_slice
from pe_triage.windows import Window

CFG = PreprocessConfig(size=64, workers=1, row_group_slices=4)


def chest(size: int = 128, z: float = 0.0, rows: int | None = None, lungs: bool = True) -> np.ndarray:
    rows = rows or size
    yy, xx = np.mgrid[:rows, :size] / np.array([rows, size])[:, None, None] * size
    hu = np.full((rows, size), -1000, np.int16)
    hu[(yy - 60) ** 2 / 40**2 + (xx - 64) ** 2 / 55**2 < 1] = 40
    for cx in (42, 86) if lungs else ():
        hu[(yy - 58) ** 2 / 25**2 + (xx - cx) ** 2 / 15**2 < 1] = -850
    hu[110:114, 8:120] = 100  # table
    return hu + int(z) % 5


def make_slices(tmp: Path, series: dict[str, list[np.ndarray]], labels: str | None = None,
                ingest: IngestConfig = IngestConfig(workers=1)) -> Path:
    src = tmp / "dicom"
    for s, images in series.items():
        for i, hu in enumerate(images):
            write(ct_slice(series=s, sop=f"{s}.{i + 1}", z=float(i), instance=i + 1, hu=hu, size=hu.shape[1],
                           Rows=hu.shape[0], Columns=hu.shape[1]), src / s / f"{i}.dcm")
    if labels:
        (tmp / "labels.csv").write_text(labels)
    ingest_site("test-site", str(src), str(tmp / "slices"), pseudo=pseudo(), config=ingest,
                labels=str(tmp / "labels.csv") if labels else None)
    return tmp / "slices"


def windows_rows(out: Path) -> list[dict]:
    return pads.dataset(out, format="parquet", partitioning="hive").to_table().to_pylist()


LABELS = "patient_id,sop_uid,label,diagnosis\nPAT-0001,,,pe\nPAT-0001,1.2.3.4.5.2,pe,\n"


def test_windows_dataset_contract(tmp_path: Path) -> None:
    slices = make_slices(tmp_path, {"1.2.3.4.5": [chest(z=i) for i in range(6)]}, LABELS)
    report = preprocess(str(slices), str(tmp_path / "w"), config=CFG)
    assert report["slices_written"] == 6 and report["slices_skipped"] == []
    files = list((tmp_path / "w").glob("site=test-site/*.parquet"))
    assert len(files) == 1
    pf = pq.ParquetFile(files[0])
    meta = json.loads(pf.schema_arrow.metadata[S.META_WINDOWS.encode()])
    assert [m["name"] for m in meta] == ["vascular", "mediastinal", "clinical_lung"] and meta[0]["hi"] == 650
    table = pf.read()
    stack = S.windows_stack(table.column(S.WINDOWS), S.windows_shape(table.schema.field(S.WINDOWS)))
    assert stack.shape[1:] == (3, 64, 64) and stack.dtype == np.uint8
    rows = table.drop_columns([S.WINDOWS]).to_pylist()
    assert [r[S.SLICE_INDEX] for r in rows] == list(range(6))
    assert sorted(r[S.LABEL] for r in rows) == ["pe"] + ["wnl"] * 5
    assert all(r[S.LUNG_FOUND] for r in rows)
    box = rows[0]
    assert box[S.CROP_Y1] - box[S.CROP_Y0] == box[S.CROP_X1] - box[S.CROP_X0] < 128  # square, tighter than the slice
    assert box[S.CROP_Y1] <= 112  # the table is cut away
    assert pf.metadata.num_row_groups == 2  # row groups of 4


def test_rerun_is_a_no_op_and_a_relabel_rewrites(tmp_path: Path) -> None:
    slices = make_slices(tmp_path, {"1.2.3.4.5": [chest(z=i) for i in range(3)], "1.2.3.4.6": [chest(z=i) for i in range(2)]})
    out = tmp_path / "w"
    preprocess(str(slices), str(out), config=CFG)
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    again = preprocess(str(slices), str(out), config=CFG)
    assert again["series"] == {"total": 2, "written": 0, "unchanged": 2}
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before
    (tmp_path / "labels.csv").write_text("patient_id,diagnosis\nPAT-0001,wnl\n")
    ingest_site("test-site", str(tmp_path / "dicom"), str(slices), pseudo=pseudo(), config=IngestConfig(workers=1),
                labels=str(tmp_path / "labels.csv"))
    relabelled = preprocess(str(slices), str(out), config=CFG)
    assert relabelled["series"]["written"] == 2
    assert {r[S.LABEL] for r in windows_rows(out)} == {"wnl"}
    two = preprocess(str(slices), str(tmp_path / "w2"), config=PreprocessConfig(size=64, workers=2, row_group_slices=4))
    assert two["slices_written"] == 5
    assert ({p.name: p.read_bytes() for p in out.rglob("*.parquet")}
            == {p.name: p.read_bytes() for p in (tmp_path / "w2").rglob("*.parquet")})


def test_crop_modes(tmp_path: Path) -> None:
    images = [chest(z=i, lungs=i < 3) for i in range(4)]  # the last slice lies below the lungs
    slices = make_slices(tmp_path, {"1.2.3.4.5": images})
    boxes = {}
    for mode in ("dynamic", "series", "fixed"):
        cfg = PreprocessConfig(size=64, workers=1, crop=CropConfig(mode=mode))
        preprocess(str(slices), str(tmp_path / mode), config=cfg)
        rows = sorted(windows_rows(tmp_path / mode), key=lambda r: r[S.SLICE_INDEX])
        boxes[mode] = [(r[S.CROP_Y0], r[S.CROP_Y1], r[S.CROP_X0], r[S.CROP_X1]) for r in rows]
        if mode == "dynamic":
            assert [r[S.LUNG_FOUND] for r in rows] == [True, True, True, False]  # flagged, body box used
    assert len(set(boxes["series"])) == 1  # one box for the whole series
    assert boxes["fixed"][0] == (35, 93, 16, 112)  # centred 300x180-of-400 proportions


def test_bad_input_is_named_and_the_rest_goes_on(tmp_path: Path) -> None:
    empty = np.full((128, 128), -1000, np.int16)
    metal = chest()
    metal[60, 60] = 3500
    slices = make_slices(tmp_path, {
        "1.2.3.4.5": [chest(z=0), empty, metal],  # an empty table slice and HU above the CT range
        "1.2.3.4.6": [chest(z=0)],  # a series of one slice
        "1.2.3.4.7": [chest(size=32)],  # too small to be diagnostic CT
        "1.2.3.4.8": [chest(size=128, rows=96)],  # non-square
    })
    report = preprocess(str(slices), str(tmp_path / "w"), config=CFG)
    reasons = {(s["slice_index"], s["reason"].split(" ")[0]) for s in report["slices_skipped"]}
    assert reasons == {(1, "no"), (0, "image")}
    assert any("no body" in s["reason"] for s in report["slices_skipped"])
    assert any("32x32 smaller than 64" in s["reason"] for s in report["slices_skipped"])
    warnings = "\n".join(report["warnings"])
    assert "outside (-1024, 3071)" in warnings and "a series of one slice" in warnings
    assert "non-square images 96x128" in warnings and "no slice has a label" in warnings
    assert report["slices_written"] == 4
    assert json.loads((tmp_path / "w" / "_reports" / "preprocess_report.json").read_text())["slices_written"] == 4


def test_window_configuration_errors() -> None:
    with pytest.raises(PreprocessError, match=r"unknown window\(s\) \['bone'\]"):
        resolve_windows(PreprocessConfig(windows=("vascular", "bone")))
    with pytest.raises(PreprocessError, match="give either lo and hi, or level and width"):
        resolve_windows(PreprocessConfig(windows=("x",), custom_windows=(WindowConfig("x", lo=0, level=3),)))
    custom = resolve_windows(PreprocessConfig(windows=("pe", "lung"), custom_windows=(WindowConfig("pe", level=100, width=700),)))
    assert [(w.name, w.lo, w.hi) for w in custom] == [("pe", -250, 450), ("lung", -400, 1500)]
    with pytest.raises(ConfigError, match="CropConfig.mode: 'tight' is not one of"):
        CropConfig(mode="tight")  # type: ignore[arg-type]


def test_one_long_series_is_shared_by_the_workers(tmp_path: Path) -> None:
    """Each row group of a series' slices file is a task: one series keeps two workers busy, and the
    file they make is the one a single process makes (row groups re-cut to ``row_group_slices``)."""
    slices = make_slices(tmp_path, {"1.2.3.4.5": [chest(z=i, lungs=i < 7) for i in range(10)]},
                         ingest=IngestConfig(workers=1, row_group_slices=3))
    assert pq.ParquetFile(next(slices.glob("site=*/*.parquet"))).num_row_groups == 4
    for mode in ("dynamic", "series"):
        one, two = tmp_path / f"{mode}-1", tmp_path / f"{mode}-2"
        config = PreprocessConfig(size=64, row_group_slices=4, crop=CropConfig(mode=mode), min_slices_per_worker=1)
        alone = preprocess(str(slices), str(one), config=replace(config, workers=1))
        shared = preprocess(str(slices), str(two), config=replace(config, workers=2))
        assert (alone["timing"]["workers"], shared["timing"]["workers"]) == (1, 2)
        assert alone["timing"]["tasks"] == shared["timing"]["tasks"] == 4
        assert shared["slices_written"] == 10
        (file_1,), (file_2,) = one.glob("site=*/*.parquet"), two.glob("site=*/*.parquet")
        assert file_1.read_bytes() == file_2.read_bytes()
        assert [pq.ParquetFile(file_2).metadata.row_group(g).num_rows for g in range(3)] == [4, 4, 2]
    boxes = {(r[S.CROP_Y0], r[S.CROP_Y1], r[S.CROP_X0], r[S.CROP_X1]) for r in windows_rows(tmp_path / "series-2")}
    assert len(boxes) == 1  # series mode: one box over every chunk of the series


def test_a_small_run_does_not_start_workers_it_cannot_use(tmp_path: Path) -> None:
    slices = make_slices(tmp_path, {"1.2.3.4.5": [chest(z=i) for i in range(4)]})
    report = preprocess(str(slices), str(tmp_path / "w"), config=PreprocessConfig(size=64, workers=2, min_slices_per_worker=3))
    assert report["timing"]["workers"] == 1  # 4 slices: one worker's worth


class _Recorder(Executor):
    """Runs each task when it is submitted and records how many were in flight (not yet consumed)."""

    def __init__(self) -> None:
        self.submitted: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        self.submitted.append(future)
        return future


def test_chunks_run_ahead_of_the_writer_but_no_further() -> None:
    pool = _Recorder()
    results = stream(pool, lambda x: x * 10, range(7), ahead=3)
    assert next(results) == 0
    assert len(pool.submitted) == 3  # the workers were handed three chunks before the first was written
    assert list(results) == [10, 20, 30, 40, 50, 60]
    assert len(pool.submitted) == 7


def test_preprocess_reports_progress_off_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PE_TRIAGE_PROGRESS", "log")
    slices = make_slices(tmp_path, {"1.2.3.4.5": [chest(z=i) for i in range(3)], "1.2.3.4.6": [chest(z=i) for i in range(2)]})
    caplog.set_level(logging.INFO, logger="pe_triage")
    preprocess(str(slices), str(tmp_path / "w"), config=CFG)
    lines = [r.getMessage() for r in caplog.records if r.name == "pe_triage.preprocess"]
    assert any(line.startswith("preprocess: 5 slice in ") for line in lines), lines


# --------------------------------------------------------------------- the fast path against the reference
def reference_lung_box(hu: np.ndarray, spacing: tuple[float, float],
                       config: CropConfig = CropConfig()) -> tuple[tuple[int, ...], bool]:
    """The lung box as the library found it before issue 17 (cv2's component statistics on an
    area-resized tissue mask), kept here so that the faster path is held to the same boxes."""
    rows, cols = hu.shape
    f = 4 if min(rows, cols) >= 256 else 2 if min(rows, cols) >= 96 else 1
    mean_hu = hu
    for _ in range(f.bit_length() - 1):
        mean_hu = cv2.pyrDown(mean_hu)
    small = (mean_hu.shape[1], mean_hu.shape[0])
    tissue = (cv2.resize((hu > -500).astype(np.uint8) * 255, small, interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)
    framed = cv2.copyMakeBorder(tissue, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(framed, None, (0, 0), 2)
    n, labels, stats, _ = cv2.connectedComponentsWithStats((framed[1:-1, 1:-1] != 2).astype(np.uint8), connectivity=4)
    assert n > 1, "a slice without a body"

    def scaled(i: int) -> tuple[int, int, int, int]:
        x, y, w, h = (int(v) for v in stats[i, :4])
        return y * f, min((y + h) * f, rows), x * f, min((x + w) * f, cols)

    body = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    body_box = scaled(body)
    dark = (cv2.erode((labels == body).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))).astype(bool)
            & (mean_hu < config.lung_hu)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    found = [scaled(i) for i in range(1, n)
             if stats[i, cv2.CC_STAT_AREA] >= config.min_lung_area_mm2 / (f * f * spacing[0] * spacing[1])
             and config.lung_mean_hu[0] <= cv2.mean(mean_hu, mask=(labels == i).astype(np.uint8))[0] <= config.lung_mean_hu[1]]
    if not found:
        return body_box, False
    y0, y1 = min(b[0] for b in found), max(b[1] for b in found)
    x0, x1 = min(b[2] for b in found), max(b[3] for b in found)
    my, mx = round(config.margin_mm / spacing[0]), round(config.margin_mm / spacing[1])
    y0, y1, x0, x1 = y0 - my, y1 + my, x0 - mx, x1 + mx
    d = abs((y1 - y0) - (x1 - x0))  # grow the shorter side to a square, then clip (shift before shrinking)
    if y1 - y0 > x1 - x0:
        x0, x1 = x0 - d // 2, x1 + d - d // 2
    else:
        y0, y1 = y0 - d // 2, y1 + d - d // 2
    h, w = min(y1 - y0, rows), min(x1 - x0, cols)
    y0, x0 = min(max(y0, 0), rows - h), min(max(x0, 0), cols - w)
    return (y0, y0 + h, x0, x0 + w), True


def reference_windows(hu: np.ndarray, box: tuple[int, ...], windows: list[Window], size: int) -> np.ndarray:
    """Crop, resize (area when shrinking) and window in float, as before issue 17."""
    crop = hu[box[0] : box[1], box[2] : box[3]]
    shrink = min(crop.shape) >= size
    patch = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.stack([(np.clip((patch.astype(np.float32) - w.lo) * np.float32(255 / w.width), 0, 255) + 0.5).astype(np.uint8)
                     for w in windows])


def test_fast_path_matches_the_reference_on_real_and_synthetic_ct(real_ct: Path) -> None:
    lidc = []
    for path in sorted((real_ct / "lidc-idri-0002").glob("*.dcm")):
        data = path.read_bytes()
        header = parse_header(data, pseudo(), complete=True)
        lidc.append((decode_hu(data, header, padding_hu=-1000, min_hu=-1024), header.spacing))
    synthetic = [(chest(size=s, rows=r, z=z, lungs=z < 4), (0.7, 0.7))
                 for s, r in ((128, 128), (130, 126), (256, 256), (90, 90), (512, 510)) for z in range(6)]
    synthetic += [(cv2.resize(hu, (c, r), interpolation=cv2.INTER_AREA), sp)
                  for hu, sp in lidc[::40] for r, c in ((511, 509), (300, 260), (200, 200))]  # odd sizes, other pooling
    config = PreprocessConfig()
    windows = resolve_windows(config)
    out = np.empty((len(windows), config.size, config.size), np.uint8)
    worst = 0
    for i, (hu, spacing) in enumerate(lidc + synthetic):
        box, lung_found = reference_lung_box(hu, spacing)
        found = window_slice(hu, spacing, config, windows, out, union=None)
        assert (tuple(found.box), found.lung_found) == (box, lung_found), f"slice {i} {hu.shape}"
        worst = max(worst, int(np.abs(out.astype(int) - reference_windows(hu, box, windows, config.size)).max()))
    assert len(lidc) == 261 and worst <= 1  # one grey level: the tolerance of a different rounding order

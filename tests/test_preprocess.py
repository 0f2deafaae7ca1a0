"""slices -> windows: output contract, idempotence, crop modes, and bad input named in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from factories import ct_slice, pseudo, write

from pe_triage import schema as S
from pe_triage.config import ConfigError, CropConfig, IngestConfig, PreprocessConfig, WindowConfig
from pe_triage.ingest import ingest_site
from pe_triage.preprocess import PreprocessError, preprocess, resolve_windows

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


def make_slices(tmp: Path, series: dict[str, list[np.ndarray]], labels: str | None = None) -> Path:
    src = tmp / "dicom"
    for s, images in series.items():
        for i, hu in enumerate(images):
            write(ct_slice(series=s, sop=f"{s}.{i + 1}", z=float(i), instance=i + 1, hu=hu, size=hu.shape[1],
                           Rows=hu.shape[0], Columns=hu.shape[1]), src / s / f"{i}.dcm")
    if labels:
        (tmp / "labels.csv").write_text(labels)
    ingest_site("test-site", str(src), str(tmp / "slices"), pseudo=pseudo(), config=IngestConfig(workers=1),
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

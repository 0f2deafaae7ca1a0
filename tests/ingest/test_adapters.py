"""``pe-triage labels convert``: RSPECT, mask and manifest inputs made here in the published formats,
malformed rows included, converted, checked by ingest's parser and ingested unchanged."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pyarrow.dataset as pads
import pytest
from factories import ct_slice, pseudo, write

from pe_triage import schema as S
from pe_triage.cli import main
from pe_triage.config import IngestConfig, LabelsConfig
from pe_triage.ingest import ingest_site
from pe_triage.ingest.adapters import LabelConvertError, convert_labels, site_manifest
from pe_triage.ingest.adapters.rspect import COLUMNS, EXAM
from pe_triage.labels import ManifestError

# the dataset's own column order; every flag an int 0/1 (Kaggle's train.csv)
FLAGS = {k: 0 for k in EXAM}


def _rspect_row(study: str, image: int, pe: int = 0, **flags: object) -> dict[str, object]:
    return {"StudyInstanceUID": study, "SeriesInstanceUID": f"{study}.1", "SOPInstanceUID": f"{study}.1.{image}",
            "pe_present_on_image": pe, **FLAGS, **flags}


def _rspect_csv(path: Path) -> Path:
    """Exams 1.1 (PE on images 2-3 of 4), 1.2 (negative), then one of each exclusion, in row order."""
    rows = [
        *(_rspect_row("1.1", i, pe=int(i in (2, 3)), rightsided_pe=1, central_pe=1, rv_lv_ratio_gte_1=1)
          for i in range(1, 5)),                                                        # rows 2-5
        *(_rspect_row("1.2", i, negative_exam_for_pe=1) for i in range(1, 4)),          # rows 6-8
        *(_rspect_row("1.3", i, indeterminate=1) for i in range(1, 3)),                 # rows 9-10
        *(_rspect_row("1.4", i, negative_exam_for_pe=1, qa_motion=1) for i in range(1, 3)),  # rows 11-12
        _rspect_row("1.5", 1, pe=1), _rspect_row("1.5", 2, pe="yes"),                   # rows 13-14: a bad value
        _rspect_row("", 1),                                                             # row 15: no study
        _rspect_row("1.6", 1, pe=1), _rspect_row("1.6", 2, central_pe=1),               # rows 16-17: flags differ
        _rspect_row("1.7", 1, pe=1, negative_exam_for_pe=1),                            # row 18: negative with PE
        _rspect_row("1.8", 1),                                                          # row 19: positive, no PE image
        {**_rspect_row("1.9", 1), "SOPInstanceUID": ""},                                # row 20: no SOP UID
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _manifest(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_rspect_maps_pe_images_and_counts_every_exclusion(tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    report = convert_labels("rspect", [str(_rspect_csv(tmp_path / "train.csv"))], str(out), report=str(tmp_path / "r.json"))
    rows = _manifest(out)
    assert [(r["patient_id"], r["sop_uid"], r["label"], r["diagnosis"]) for r in rows] == [
        ("1.1", "", "", "pe"), ("1.1", "1.1.1.2", "pe", ""), ("1.1", "1.1.1.3", "pe", ""), ("1.2", "", "", "wnl")]
    assert report["excluded"] == {
        "exam_failing_qa": 1, "exam_indeterminate": 1, "exam_negative_with_pe_images": 1,
        "exam_positive_without_pe_images": 1, "exam_with_malformed_rows": 3, "row_whose_exam_flags_differ_from_its_exam": 1,
        "row_with_missing_uid": 1, "row_with_value_not_0_or_1": 1, "row_without_study_uid": 1}
    assert [(p["row"], p["reason"]) for p in report["problems"]] == [
        (14, "row_with_value_not_0_or_1"), (15, "row_without_study_uid"),
        (17, "row_whose_exam_flags_differ_from_its_exam"), (20, "row_with_missing_uid")]
    assert report["counts"]["rows"] == 19 and report["counts"]["exams_kept"] == 2
    assert report["counts"]["exams_with_central_pe"] == 1 and report["counts"]["exams_with_negative_exam_for_pe"] == 1
    written = (tmp_path / "r.json").read_text()
    assert json.loads(written) == report and "1.1.1" not in written  # counts and row numbers, no UID


def test_rspect_indeterminate_and_qa_failed_exams_can_be_kept(tmp_path: Path) -> None:
    cfg = LabelsConfig(exclude_indeterminate=False, exclude_qa_failed=False)
    convert_labels("rspect", [str(_rspect_csv(tmp_path / "train.csv"))], str(tmp_path / "m.csv"), cfg)
    rows = _manifest(tmp_path / "m.csv")
    assert {r["sop_uid"]: r["label"] for r in rows if r["patient_id"] == "1.3"} == {
        "": "", "1.3.1.1": "indeterminate", "1.3.1.2": "indeterminate"}
    assert {r["diagnosis"] for r in rows if r["patient_id"] in ("1.3", "1.4") and r["diagnosis"]} == {"indeterminate", "wnl"}


def test_an_input_that_is_not_rspect_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("StudyInstanceUID,label\n1.2,pe\n")
    with pytest.raises(LabelConvertError, match=r"not an RSPECT train.csv, missing column\(s\) \['SeriesInstanceUID'"):
        convert_labels("rspect", [str(tmp_path / "x.csv")], str(tmp_path / "m.csv"))
    with pytest.raises(LabelConvertError, match="no such file or folder"):
        convert_labels("rspect", [str(tmp_path / "missing.csv")], str(tmp_path / "m.csv"))
    assert not (tmp_path / "m.csv").exists()


def test_ingest_takes_the_rspect_manifest_unchanged(tmp_path: Path) -> None:
    """RSPECT's patient is its study: DICOM files whose PatientID is the StudyInstanceUID join."""
    for study, n in (("1.1", 4), ("1.2", 3)):
        for i in range(1, n + 1):
            write(ct_slice(patient=study, study=study, series=f"{study}.1", sop=f"{study}.1.{i}", z=float(i), instance=i),
                  tmp_path / "dicom" / study / f"{i}.dcm")
    manifest = tmp_path / "m.csv"
    convert_labels("rspect", [str(_rspect_csv(tmp_path / "train.csv"))], str(manifest))
    report = ingest_site("rspect", str(tmp_path / "dicom"), str(tmp_path / "slices"), pseudo=pseudo("rspect"),
                         labels=str(manifest), config=IngestConfig(workers=1, strict_labels=True))
    assert report["labels"]["unmatched_rows"] == [] and report["labels"]["inconsistent_patients"] == []
    rows = pads.dataset(tmp_path / "slices", partitioning="hive").to_table().to_pylist()
    labels = sorted((r[S.Z_MM], r[S.LABEL]) for r in rows if r[S.PATIENT_ID] == pseudo("rspect")("patient", "1.1"))
    assert labels == [(1.0, "wnl"), (2.0, "pe"), (3.0, "pe"), (4.0, "wnl")]
    assert {r[S.LABEL] for r in rows if r[S.PATIENT_ID] == pseudo("rspect")("patient", "1.2")} == {"wnl"}


def _npy_mask(folder: Path, name: str, mask: np.ndarray, **meta: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", mask)
    sidecar = {"patient_id": "P1", "study_uid": "2.1", "series_uid": "2.1.1",
               "sop_uids": [f"2.1.1.{i + 1}" for i in range(mask.shape[0])], "pixel_spacing_mm": [0.7, 0.7], **meta}
    (folder / f"{name}.json").write_text(json.dumps(sidecar))


def test_mask_slices_at_or_above_the_area_are_pe(tmp_path: Path) -> None:
    mask = np.zeros((5, 32, 32), np.uint8)
    mask[1, 0, :3] = 1      # 3 px = 1.47 mm²: indeterminate
    mask[2, :4, :4] = 1     # 16 px = 7.84 mm²: pe
    mask[4, :10, :10] = 1   # 49 mm²: pe
    _npy_mask(tmp_path / "masks", "a", mask)
    _npy_mask(tmp_path / "masks", "b", mask, sop_uids=["2.1.1.1"])  # slices do not match the sidecar
    np.save(tmp_path / "masks" / "c.npy", mask)                        # no sidecar
    (tmp_path / "masks" / "d.npy").write_bytes(b"not numpy")
    report = convert_labels("masks", [str(tmp_path / "masks")], str(tmp_path / "m.csv"))
    assert {r["sop_uid"]: r["label"] for r in _manifest(tmp_path / "m.csv")} == {
        "": "", "2.1.1.2": "indeterminate", "2.1.1.3": "pe", "2.1.1.5": "pe"}
    assert report["excluded"] == {"mask_slices_do_not_match_sidecar_sop_uids": 1, "npy_unreadable": 1,
                                  "npy_without_readable_sidecar_json": 1}
    assert [p["input"] for p in report["problems"]] == [2, 3, 4]  # the inputs' order: b.npy, c.npy, d.npy
    strict = convert_labels("masks", [str(tmp_path / "masks" / "a.npy")], str(tmp_path / "m2.csv"),
                            LabelsConfig(min_mask_area_mm2=10.0))
    assert strict["slice_labels"] == {"pe": 1, "other": 0, "indeterminate": 2}


def test_a_dicom_seg_is_matched_to_its_source_slices(tmp_path: Path) -> None:
    extra = {"PatientBirthDate": "", "PatientSex": "", "StudyDate": "", "StudyTime": "", "AccessionNumber": "",
             "ReferringPhysicianName": "", "StudyID": "", "FrameOfReferenceUID": "1.2.3.9", "SeriesNumber": 1}
    sources = [ct_slice(sop=f"1.2.3.4.5.{i + 1}", z=float(i), instance=i + 1, size=32, **extra) for i in range(4)]
    mask = np.zeros((4, 32, 32), bool)
    mask[1, 5:10, 5:10] = True  # 25 px x 0.49 mm² = 12.25 mm²
    mask[2, 0:2, 0] = True      # 0.98 mm²
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="PE", algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
            segmented_property_type=hd.sr.CodedConcept("59282003", "SCT", "Pulmonary embolism"))],
        series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    buf = io.BytesIO()
    seg.save_as(buf)
    (tmp_path / "seg.dcm").write_bytes(buf.getvalue())
    (tmp_path / "broken.dcm").write_bytes(b"DICM" * 10)
    report = convert_labels("masks", [str(tmp_path / "seg.dcm"), str(tmp_path / "broken.dcm")], str(tmp_path / "m.csv"))
    assert {(r["patient_id"], r["sop_uid"], r["label"]) for r in _manifest(tmp_path / "m.csv")} == {
        ("PAT-0001", "", ""), ("PAT-0001", "1.2.3.4.5.2", "pe"), ("PAT-0001", "1.2.3.4.5.3", "indeterminate")}
    assert report["excluded"] == {"seg_unreadable_or_not_a_segmentation": 1}


def test_manifest_format_normalises_and_refuses_by_row(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text(" Label ,Patient_ID,SOP_UID\nPE ,p1,1.2.3\n")
    convert_labels("manifest", [str(tmp_path / "in.csv")], str(tmp_path / "m.csv"))
    assert (tmp_path / "m.csv").read_text().splitlines() == [",".join(S.MANIFEST_COLUMNS), "p1,,,1.2.3,,pe,"]
    (tmp_path / "bad.csv").write_text("patient_id,sop_uid,label\np1,1.2.3,tumour\n")
    with pytest.raises(ManifestError, match="row 2, column label"):
        convert_labels("manifest", [str(tmp_path / "bad.csv")], str(tmp_path / "m.csv"))
    assert (tmp_path / "m.csv").read_text().endswith("p1,,,1.2.3,,pe,\n")  # the old output is untouched


def test_the_command_writes_manifest_and_report_and_errors_in_one_line(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    train = _rspect_csv(tmp_path / "train.csv")
    assert main(["labels", "convert", "--format", "rspect", str(train), "--out", str(tmp_path / "m.csv"),
                 "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["problems_total"] == 4
    assert main(["labels", "convert", "--format", "rspect", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "label input 1: no such file or folder" in caplog.text


def test_a_site_label_input_is_converted_beside_itself(tmp_path: Path) -> None:
    train = _rspect_csv(tmp_path / "train.csv")
    assert site_manifest(str(train), "manifest") == str(train) and site_manifest("", "rspect") == ""
    out = site_manifest(str(train), "rspect")
    assert out == f"{train}.manifest.csv" and Path(f"{train}.report.json").is_file()
    assert len(_manifest(Path(out))) == 4

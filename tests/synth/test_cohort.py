"""The cohort is what hospitals would send: valid DICOM in three site conventions, manifests, PHI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from pe_triage import schema
from pe_triage.config import SynthConfig
from pe_triage.dicom import DEMO_KEY, Pseudonymizer
from pe_triage.schema import Label, Tissue
from pe_triage.synth import CohortSummary, generate_cohort

CONFIG = SynthConfig(sites=3, patients_per_site=3, slices=10, size=64, seed=7)

#: header elements that carry PHI on purpose; anything else must be free of every PHI string
PHI_KEYWORDS = {
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientAddress", "AdditionalPatientHistory",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime", "AcquisitionTime",
    "ContentTime", "AccessionNumber", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "StationName", "StudyDescription", "InstitutionalDepartmentName", "PerformingPhysicianName", "OperatorsName",
    "StudyID", "ImageComments", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CohortSummary]:
    out = tmp_path_factory.mktemp("cohort")
    return out, generate_cohort(out, CONFIG)


@pytest.fixture(scope="module")
def headers(cohort: tuple[Path, CohortSummary]) -> dict[str, list[pydicom.Dataset]]:
    _, summary = cohort
    return {s.name: [pydicom.dcmread(f) for f in s.files] for s in summary.sites}


@pytest.fixture(scope="module")
def truth(cohort: tuple[Path, CohortSummary]) -> dict[str, list[dict]]:
    out, summary = cohort
    return {s.name: pq.read_table(out / "truth" / f"{s.name}.parquet").to_pylist() for s in summary.sites}


def _manifest(out: Path, site: str) -> list[dict[str, str]]:
    with (out / "sites" / site / "labels.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == schema.MANIFEST_COLUMNS
        return list(reader)


def test_layout_and_summary(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    assert [s.name for s in summary.sites] == ["site-a", "site-b", "site-c"]
    for s in summary.sites:
        assert s.patients == 3 and s.slices == 30 and len(s.files) == 30
        assert all(f.is_file() and (out / "sites" / s.name / "dicom") in f.parents for f in s.files)
        assert (out / "sites" / s.name / "labels.csv").is_file()
        assert (out / "truth" / f"{s.name}.parquet").is_file()
    assert sum(summary.class_counts.values()) == 9
    assert summary.class_counts == {"wnl": 3, "pe": 3, "other": 3}  # the per-site guarantee, 3 patients each
    assert sum(summary.slice_counts.values()) == 90 and summary.lesions == "realistic"
    cohort_json = json.loads((out / "truth" / "cohort.json").read_text())
    assert cohort_json["seed"] == 7 and len(cohort_json["sites"]) == 3
    assert set(json.loads((out / "truth" / "phi.json").read_text())) == {"strings", "uids"}


def test_same_seed_same_bytes_other_seed_other_bytes(cohort: tuple[Path, CohortSummary], tmp_path: Path) -> None:
    out, _ = cohort
    again = generate_cohort(tmp_path / "again", CONFIG)
    first, second = _files(out), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    assert again.phi == tuple(json.loads((out / "truth" / "phi.json").read_text())["strings"])
    other = generate_cohort(tmp_path / "other", SynthConfig(**{**CONFIG.__dict__, "seed": 8}))
    third = _files(tmp_path / "other")
    common = [k for k in set(first) & set(third) if "/dicom/" in k or k.endswith(".parquet")]
    assert len(common) > 40  # site-a and site-c name files by number, so most paths recur
    assert all(first[k] != third[k] for k in common)
    assert set(other.phi) != set(again.phi)


def test_a_patient_does_not_depend_on_cohort_size(cohort: tuple[Path, CohortSummary], tmp_path: Path) -> None:
    out, _ = cohort
    bigger = SynthConfig(**{**CONFIG.__dict__, "sites": 1, "patients_per_site": 4})
    generate_cohort(tmp_path / "bigger", bigger)
    small = _files(out / "sites" / "site-a" / "dicom")
    large = _files(tmp_path / "bigger" / "sites" / "site-a" / "dicom")
    assert set(small) < set(large)
    assert all(small[k] == large[k] for k in small)


def test_refuses_to_mix_with_a_previous_cohort(cohort: tuple[Path, CohortSummary]) -> None:
    with pytest.raises(FileExistsError):
        generate_cohort(cohort[0], CONFIG)


def test_valid_part10_files_that_round_trip(cohort: tuple[Path, CohortSummary]) -> None:
    _, summary = cohort
    for s in summary.sites:
        for f in s.files:
            data = f.read_bytes()
            assert data[128:132] == b"DICM"
            ds = pydicom.dcmread(io.BytesIO(data))
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            assert buffer.getvalue() == data  # pydicom re-encodes every element to the same bytes


def test_site_conventions(headers: dict[str, list[pydicom.Dataset]]) -> None:
    expected = {
        "site-a": (ExplicitVRLittleEndian, 1, 16, -1024.0, -2000),
        "site-b": (RLELossless, 0, 12, -1024.0, None),
        "site-c": (JPEG2000Lossless, 1, 12, 0.0, -2048),
    }
    for site, datasets in headers.items():
        syntax, representation, bits, intercept, padding = expected[site]
        for ds in datasets:
            assert ds.file_meta.TransferSyntaxUID == syntax
            assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
            assert ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.BitsAllocated == 16 and ds.BitsStored == bits and ds.HighBit == bits - 1
            assert ds.PixelRepresentation == representation
            assert float(ds.RescaleIntercept) == intercept and float(ds.RescaleSlope) == 1.0
            assert ds.get("PixelPaddingValue") == padding
            assert ds.BurnedInAnnotation == "NO" and ds.ContrastBolusAgent
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert 0.6 * 512 / 64 <= float(ds.PixelSpacing[0]) <= 0.9 * 512 / 64  # 0.6-0.9 mm at 512 px
            arr = ds.pixel_array
            low = -(1 << (bits - 1)) if representation else 0
            high = (1 << (bits - 1)) - 1 if representation else (1 << bits) - 1
            assert low <= arr.min() and arr.max() <= high
        manufacturers = {ds.Manufacturer for ds in datasets}
        assert len(manufacturers) == 1


def test_geometry_and_instance_order(headers: dict[str, list[pydicom.Dataset]]) -> None:
    for site, datasets in headers.items():
        series: dict[str, list[pydicom.Dataset]] = {}
        for ds in datasets:
            series.setdefault(ds.SeriesInstanceUID, []).append(ds)
        for slices in series.values():
            slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
            z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
            step = float(slices[0].SpacingBetweenSlices)
            assert np.allclose(np.diff(z), step, atol=0.02)
            assert 1.0 <= float(slices[0].SliceThickness) <= 5.0
            assert all(float(ds.SliceLocation) == zi for ds, zi in zip(slices, z, strict=True))
            numbers = [int(ds.InstanceNumber) for ds in slices]
            assert sorted(numbers) == list(range(1, len(slices) + 1))
            descending = numbers == sorted(numbers, reverse=True)
            assert descending == (site == "site-b")  # site-b: InstanceNumber 1 = most superior
            assert len({ds.FrameOfReferenceUID for ds in slices}) == 1


def test_hu_matches_the_truth_tissue_map(headers: dict[str, list[pydicom.Dataset]], truth: dict[str, list[dict]]) -> None:
    medians = {Tissue.LUNG: (-900, -780), Tissue.FAT: (-140, -50), Tissue.MUSCLE: (0, 90),
               Tissue.CONTRAST_BLOOD: (150, 420), Tissue.BONE: (250, 1100), Tissue.AIR: (-1024, -950)}
    for site, datasets in headers.items():
        rows = {r[schema.M_SOP_UID]: r for r in truth[site]}
        pooled: dict[Tissue, list[np.ndarray]] = {t: [] for t in medians}
        for ds in datasets:
            row = rows[ds.SOPInstanceUID]
            stored = ds.pixel_array
            hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            tissue = np.frombuffer(row[schema.T_TISSUE], np.uint8).reshape(ds.Rows, ds.Columns)
            padding = ds.get("PixelPaddingValue")
            inside = stored != padding if padding is not None else np.ones_like(stored, bool)
            assert np.all(tissue[~inside] == Tissue.AIR)
            assert hu[inside].min() >= -1024
            for t in medians:
                pooled[t].append(hu[inside & (tissue == t)])
        for t, (lo, hi) in medians.items():
            values = np.concatenate(pooled[t])
            assert values.size and lo <= np.median(values) <= hi, (site, t.name, np.median(values))


def test_truth_rows_describe_the_files(cohort: tuple[Path, CohortSummary], headers: dict[str, list[pydicom.Dataset]],
                                       truth: dict[str, list[dict]]) -> None:
    out, summary = cohort
    table = pq.read_table(out / "truth" / "site-a.parquet")
    assert table.schema.equals(schema.TRUTH_SCHEMA)
    assert pq.ParquetFile(out / "truth" / "site-a.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    for s in summary.sites:
        rows = {r[schema.M_SOP_UID]: r for r in truth[s.name]}
        assert len(rows) == len(s.files)
        for f, ds in zip(s.files, headers[s.name], strict=True):
            row = rows[ds.SOPInstanceUID]
            assert row[schema.SOURCE_HMAC] == Pseudonymizer(DEMO_KEY, s.name).source_digest(f.read_bytes())
            assert row[schema.Z_MM] == float(ds.ImagePositionPatient[2])
            assert (row[schema.M_PATIENT_ID], row[schema.M_STUDY_UID], row[schema.M_SERIES_UID]) == (
                ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
            mask = np.frombuffer(row[schema.T_MASK], np.uint8)
            assert mask.size == ds.Rows * ds.Columns and set(np.unique(mask)) <= {0, 1}
            assert (row[schema.LABEL] == Label.WNL.value) == (not mask.any())
            if row[schema.LABEL] == Label.PE.value:  # a PE sliver may leave a "pe" lesion indeterminate or other
                assert row[schema.T_LESION] == "pe"
            assert row[schema.T_LESION] in ("pe", "consolidation", "ggo", "nodule", "effusion", "none")


def test_no_tissue_maps_when_not_asked(tmp_path: Path) -> None:
    small = SynthConfig(sites=1, patients_per_site=1, slices=3, size=48, write_tissue_maps=False)
    generate_cohort(tmp_path, small)
    rows = pq.read_table(tmp_path / "truth" / "site-a.parquet").to_pylist()
    assert len(rows) == 3 and all(r[schema.T_TISSUE] is None and r[schema.T_MASK] for r in rows)


def test_every_site_has_every_class_and_pe_spans_slices(cohort: tuple[Path, CohortSummary],
                                                        truth: dict[str, list[dict]]) -> None:
    out, _ = cohort
    for site_json in json.loads((out / "truth" / "cohort.json").read_text())["sites"]:
        classes = {p["class"] for p in site_json["patients"]}
        assert classes == {"wnl", "pe", "other"}
        for patient in site_json["patients"]:
            rows = sorted((r for r in truth[site_json["name"]] if r[schema.M_PATIENT_ID] == patient["patient_id"]),
                          key=lambda r: r[schema.Z_MM])
            labels = "".join(r[schema.LABEL][0] for r in rows)  # w / p / o per slice, in z order
            if patient["class"] == "pe":
                assert "pp" in labels and patient["emboli"]
            elif patient["class"] == "other":
                assert "o" in labels and "p" not in labels
            else:
                assert set(labels) == {"w"}


def test_manifest_references_existing_slices(cohort: tuple[Path, CohortSummary],
                                             headers: dict[str, list[pydicom.Dataset]],
                                             truth: dict[str, list[dict]]) -> None:
    out, _ = cohort
    for site, datasets in headers.items():
        rows = _manifest(out, site)
        by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
        by_number = {(ds.SeriesInstanceUID, int(ds.InstanceNumber)): ds for ds in datasets}
        labels = {r[schema.M_SOP_UID]: r[schema.LABEL] for r in truth[site]}
        patients = [r for r in rows if r[schema.M_DIAGNOSIS]]
        assert len(patients) == 3 and all(not r[schema.M_LABEL] and not r[schema.M_SERIES_UID] for r in patients)
        listed = set()
        for r in rows:
            if r[schema.M_DIAGNOSIS]:
                continue
            assert r[schema.M_LABEL] in ("pe", "other", "indeterminate")
            if site == "site-b":
                assert not r[schema.M_SOP_UID]
                ds = by_number[(r[schema.M_SERIES_UID], int(r[schema.M_INSTANCE_NUMBER]))]
            else:
                assert not r[schema.M_INSTANCE_NUMBER]
                ds = by_uid[r[schema.M_SOP_UID]]
            assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
                r[schema.M_PATIENT_ID], r[schema.M_STUDY_UID], r[schema.M_SERIES_UID])
            assert labels[ds.SOPInstanceUID] == r[schema.M_LABEL]
            listed.add(ds.SOPInstanceUID)
        assert listed == {uid for uid, label in labels.items() if label != "wnl"}


def test_every_phi_string_is_in_a_header_and_nowhere_else(cohort: tuple[Path, CohortSummary],
                                                          headers: dict[str, list[pydicom.Dataset]]) -> None:
    out, summary = cohort
    phi = json.loads((out / "truth" / "phi.json").read_text())
    assert phi["strings"] == list(summary.phi)
    assert all(len(s) >= 6 for s in phi["strings"])
    blob = b"".join(f.read_bytes() for s in summary.sites for f in s.files)
    for value in phi["strings"] + phi["uids"]:
        assert value.encode() in blob, value
    uids = {ds.StudyInstanceUID for d in headers.values() for ds in d} | {
        ds.SOPInstanceUID for d in headers.values() for ds in d}
    assert uids <= set(phi["uids"])
    for datasets in headers.values():
        for ds in datasets:
            public = [e for e in ds if not e.tag.is_private and e.keyword != "PixelData"]
            rest = " ".join(str(e.value) for e in public if e.keyword not in PHI_KEYWORDS)
            assert not [s for s in phi["strings"] if s in rest]
    paths = " ".join(str(f.relative_to(out)) for s in summary.sites for f in s.files)
    assert not [s for s in phi["strings"] if s in paths]


def test_private_block_carries_the_mrn(cohort: tuple[Path, CohortSummary]) -> None:
    _, summary = cohort
    ds = pydicom.dcmread(summary.sites[0].files[0])
    block = ds.private_block(0x0029, "ACME HOSPITAL PACS")
    assert ds.PatientID in block[0x10].value


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("signed, bits", [(True, 16), (False, 12), (True, 12)])
def test_lossless_encoders_round_trip_bit_exactly(syntax: str, signed: bool, bits: int) -> None:
    rng = np.random.default_rng(0)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    arr = rng.integers(low, high + 1, (64, 64)).astype(np.int16 if signed else np.uint16)
    arr[0, :2] = low, high
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    ds.PixelData = arr.tobytes()
    ds.compress(syntax, arr, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    assert np.array_equal(ds.pixel_array, arr)

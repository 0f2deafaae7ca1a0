"""Small DICOM files made in code, each test breaking them in one way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from pe_triage import schema as S
from pe_triage.config import Config
from pe_triage.dicom import DEMO_KEY, Pseudonymizer
from pe_triage.training.train import train

#: (site, patient_id, slice_index) of one stored slice
Key = tuple[str, str, int]


def pseudo(site: str = "test-site") -> Pseudonymizer:
    return Pseudonymizer(DEMO_KEY, site)


def ct_slice(
    *,
    patient: str = "PAT-0001",
    study: str = "1.2.3.4",
    series: str = "1.2.3.4.5",
    sop: str = "1.2.3.4.5.1",
    z: float = 0.0,
    instance: int = 1,
    size: int = 32,
    spacing: float = 0.7,
    modality: str = "CT",
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    hu: np.ndarray | None = None,
    pixels: bool = True,
    **extra: object,
) -> Dataset:
    """A small valid CT slice (signed, intercept -1024) that tests then break in one way."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage if modality == "MR" else CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop
    ds.Modality = modality
    ds.PatientID = patient
    ds.PatientName = "DOE^JANE"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-100.0, -100.0, z]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    for key, value in extra.items():
        setattr(ds, key, value)
    if pixels:
        if hu is None:
            yy, xx = np.mgrid[:size, :size]
            hu = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2, 40, -1000) + int(z) % 7
        ds.PixelData = (np.asarray(hu) + 1024).astype("<i2").tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, n: int = 5, *, series: str = "1.2.3.4.5", name: str = "IM{:04d}.dcm", **kw: object) -> list[Path]:
    """``n`` slices 1 mm apart, InstanceNumber running opposite to z like many scanners."""
    return [
        write(ct_slice(series=series, sop=f"{series}.{i + 1}", z=float(i), instance=n - i, **kw), folder / name.format(i))
        for i in range(n)
    ]


def truth(cohort: Path) -> list[dict]:
    """The generator's per-slice ground truth of a synthetic cohort."""
    files = [str(p) for p in sorted((cohort / "truth").glob("*.parquet"))]
    return pads.dataset(files, format="parquet").to_table().to_pylist()



#: window definitions of the hand-made windows datasets
DEFS = [
    {"name": "vascular", "lo": 0.0, "hi": 650.0},
    {"name": "mediastinal", "lo": 40.0, "hi": 400.0},
    {"name": "lung", "lo": -400.0, "hi": 1500.0},
]


def write_windows(
    root: Path,
    series: dict[tuple[str, str], list[str | None]],
    *,
    defs: list[dict[str, float | str]] = DEFS,
    size: int = 16,
    seed: int = 0,
    image: np.ndarray | None = None,
    images: dict[tuple[str, str], np.ndarray] | None = None,
    row_group: int = 4,
) -> dict[Key, np.ndarray]:
    """One Parquet file per patient (one series) in ``root/site=<site>/``; returns the stored stacks.

    Every stack holds a 0 at [:, 0, 0] and a 255 at [:, 0, 1]; ``image`` (one stack for every slice) or
    ``images`` (per patient ``[n, C, H, W]``) replace the random pixels.
    """
    rng = np.random.default_rng(seed)
    schema = S.windows_schema(len(defs), size).with_metadata({S.META_WINDOWS: json.dumps(defs)})
    stored: dict[Key, np.ndarray] = {}
    for (site, pid), labels in series.items():
        n = len(labels)
        if images is not None:
            stacks = images[site, pid].copy()
        elif image is not None:
            stacks = np.stack([image] * n)
        else:
            stacks = rng.integers(0, 256, (n, len(defs), size, size), dtype=np.uint8)
        stacks[:, :, 0, 0], stacks[:, :, 0, 1] = 0, 255
        stored.update({(site, pid, i): stacks[i] for i in range(n)})
        cols = {
            S.SITE: [site] * n, S.PATIENT_ID: [pid] * n, S.STUDY_UID: ["st"] * n, S.SERIES_UID: [f"se-{pid}"] * n,
            S.SOP_UID: [f"{pid}-{i}" for i in range(n)], S.SLICE_INDEX: list(range(n)), S.Z_MM: [float(i) for i in range(n)],
            S.SOURCE_HMAC: ["0" * 64] * n, S.LABEL: labels,
            S.CROP_Y0: [0] * n, S.CROP_Y1: [size] * n, S.CROP_X0: [0] * n, S.CROP_X1: [size] * n, S.LUNG_FOUND: [True] * n,
        }
        arrays = [pa.array(cols[f.name], f.type) for f in schema if f.name != S.WINDOWS]
        arrays.append(S.windows_array(stacks))
        path = root / f"site={site}" / f"se-{pid}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path, row_group_size=row_group)
    return stored


def write_splits(path: Path, assignment: dict[tuple[str, str], str], fold: str = S.DEFAULT_FOLD) -> Path:
    rows = [(fold, site, pid, "wnl", split) for (site, pid), split in assignment.items()]
    pq.write_table(pa.table(list(map(list, zip(*rows, strict=True))), schema=S.SPLITS_SCHEMA), path)
    return path


def _square_images(labels: list[str], rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise; disease slices carry a bright square (vascular window), PE ones a dark hole in it."""
    stacks = rng.integers(60, 100, (len(labels), 3, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        if label != "wnl":
            y, x = rng.integers(4, size - 12, 2)
            stacks[i, 0, y : y + 8, x : x + 8] = 230
            if label == "pe":
                stacks[i, 0, y + 2 : y + 6, x + 2 : x + 6] = 20
    return stacks


def write_toy_cohort(root: Path, size: int = 32) -> tuple[str, str]:
    """12 patients of 10 slices (4 wnl, 3 pe, 3 other) on two sites, split 6/4/2 by patient, with a
    visible, learnable difference between the classes: (windows dataset, splits file)."""
    rng = np.random.default_rng(0)
    series, images, assignment = {}, {}, {}
    splits = ["train"] * 6 + ["val"] * 4 + ["test"] * 2
    for p in range(12):
        key = ("site-a" if p % 2 else "site-b", f"p{p}")
        labels = ["wnl"] * 4 + ["pe"] * 3 + ["other"] * 3
        series[key], images[key], assignment[key] = labels, _square_images(labels, rng, size), splits[p]
    write_windows(root / "windows", series, size=size, images=images)
    return str(root / "windows"), str(write_splits(root / "splits.parquet", assignment))


def train_toy_pair(root: Path, config: Config) -> tuple[str, str, str, str]:
    """Both stages trained on :func:`write_toy_cohort` under ``root``: (windows, splits, stage1, stage2)."""
    windows, splits = write_toy_cohort(root, 32)
    for stage in (1, 2):
        train(windows, splits, str(root / f"stage{stage}"), stage=stage, config=config)
    return windows, splits, str(root / "stage1"), str(root / "stage2")


def write_exam_cohort(root: Path, size: int = 32) -> tuple[str, str]:
    """15 patients of 10 slices on two sites, five of each patient class (WNL only; other disease;
    PE beside other disease), split 9/3/3 by patient with every class in every split, so each
    patient-level figure (sensitivities, specificities, AUROC) is measurable: (windows, splits)."""
    rng = np.random.default_rng(1)
    kinds = {"wnl": ["wnl"] * 10, "other": ["wnl"] * 5 + ["other"] * 5, "pe": ["wnl"] * 4 + ["pe"] * 3 + ["other"] * 3}
    series, images, assignment = {}, {}, {}
    for p in range(15):
        key = ("site-a" if p % 2 else "site-b", f"p{p}")
        labels = kinds[("wnl", "other", "pe")[p % 3]]
        series[key], images[key] = list(labels), _square_images(labels, rng, size)
        assignment[key] = "train" if p < 9 else "val" if p < 12 else "test"
    write_windows(root / "windows", series, size=size, images=images)
    return str(root / "windows"), str(write_splits(root / "splits.parquet", assignment))


def train_exam_trio(root: Path, config: Config) -> tuple[str, str, str, str, str]:
    """Both stages and the exam model (thresholds set on val) trained on :func:`write_exam_cohort`
    under ``root``: (windows, splits, stage1, stage2, exam)."""
    from pe_triage.evaluation.exam import calibrate_exam
    from pe_triage.training.exam import train_exam

    windows, splits = write_exam_cohort(root, 32)
    for stage in (1, 2):
        train(windows, splits, str(root / f"stage{stage}"), stage=stage, config=config)
    stage1, stage2 = str(root / "stage1"), str(root / "stage2")
    train_exam(windows, splits, stage1, stage2, str(root / "exam-trained"), config=config)
    calibrate_exam(stage1, stage2, str(root / "exam-trained"), windows, splits, str(root / "exam"), config=config)
    return windows, splits, stage1, stage2, str(root / "exam")


def write_site_windows(root: Path, sites: tuple[str, ...] = ("site-a", "site-b", "site-c"), size: int = 32) -> str:
    """A windows dataset of several sites (leave one site out): per site 2 WNL, 2 PE and 2 other-disease
    patients of 6 slices, with the learnable squares of :func:`write_toy_cohort`."""
    rng = np.random.default_rng(0)
    series, images = {}, {}
    classes = {"wnl": ["wnl"] * 6, "pe": ["wnl"] * 2 + ["pe"] * 2 + ["other"] * 2, "other": ["wnl"] * 3 + ["other"] * 3}
    for site in sites:
        for p, cls in enumerate(["wnl", "wnl", "pe", "pe", "other", "other"]):
            key = (site, f"{site}-p{p}")
            series[key], images[key] = classes[cls], _square_images(classes[cls], rng, size)
    write_windows(root / "windows", series, size=size, images=images)
    return str(root / "windows")


def write_evaluation(folder: Path, fold: str, *, windows_digest: str = "w1", splits_digest: str | None = None,
                     **summary: object) -> str:
    """An ``evaluate`` output folder with the parts a leave-one-site-out summary reads."""
    base = {"slice_stage1_auroc": 0.95, "slice_stage2_auroc": 0.9, "patient_pe_sensitivity": 1.0,
            "patient_disease_sensitivity": 1.0, "slices": 60, "patients": 6}
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "summary": base | summary,
        "test_data": {"windows_digest": windows_digest,
                      "splits_digest": splits_digest or ("s-main" if fold == S.DEFAULT_FOLD else "s-loso"),
                      "split": "test", "fold": fold}}))
    return str(folder)

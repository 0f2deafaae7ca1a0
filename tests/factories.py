"""Small DICOM files made in code, each test breaking them in one way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from pe_triage.dicom import DEMO_KEY, Pseudonymizer


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


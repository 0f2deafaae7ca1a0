"""A synthetic multi-site CTPA cohort: hospital-format DICOM + label manifests, and the ground truth.

Layout under ``out``::

    sites/<site>/dicom/<nested folders>/<files>   what ingest reads
    sites/<site>/labels.csv                        the site's label manifest
    truth/<site>.parquet                           per-slice ground truth (TRUTH_SCHEMA), kept apart
    truth/phi.json                                 every PHI string and clear UID written
    truth/cohort.json                              conventions, per-patient class and lesions, seed,
                                                   lesion preset and visibility minima

Everything is a function of ``SynthConfig``: random draws come from generators seeded per
(seed, site, patient), UIDs from the same keys, dates from the generators; so the same config
gives byte-identical files and a patient does not depend on how many others the cohort holds.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.pixels.encoders import JPEG2000LosslessEncoder, RLELosslessEncoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from pe_triage import schema
from pe_triage.config import SynthConfig, to_dict
from pe_triage.dicom import DEMO_KEY, Pseudonymizer
from pe_triage.schema import Label, Tissue

from .anatomy import Anatomy
from .patient import LESION_PRESETS, LesionPreset, add_emboli, add_other_disease, draw_anatomy
from .phantom import Grid, RenderedSlice, make_grid, render_slice, scanner
from .phi import PatientPHI, SitePHI, patient_phi, site_phi
from .sites import SiteConventions, shifted, site_conventions, site_name

_IMPLEMENTATION_UID = generate_uid(entropy_srcs=["pe-triage synthetic CT"])
_FOV_MM = (320.0, 460.0)  # reconstruction diameters a technologist would pick for a chest
_MAX_DISEASE_DRAWS = 20
#: patient classes (a slice may also be indeterminate; a patient is not)
_CLASSES = (Label.PE, Label.OTHER, Label.WNL)
#: the elements that change from slice to slice, in tag order
_SLICE_TAGS = (Tag(0x0008, 0x0018), Tag(0x0020, 0x0013), Tag(0x0020, 0x0032), Tag(0x0020, 0x1041), Tag(0x7FE0, 0x0010))
_ENCODERS = {RLELossless: RLELosslessEncoder, JPEG2000Lossless: JPEG2000LosslessEncoder}


@dataclass(frozen=True)
class SiteSummary:
    name: str
    patients: int
    slices: int
    files: tuple[Path, ...]  # DICOM files written, in writing order


@dataclass(frozen=True)
class CohortSummary:
    out: Path
    sites: tuple[SiteSummary, ...]
    class_counts: Mapping[str, int]  # patients per class (wnl, pe, other)
    phi: tuple[str, ...]  # every PHI string injected (also in truth/phi.json)
    slice_counts: Mapping[str, int]  # slices per Label value
    lesions: str  # the lesion preset (SynthConfig.lesions)


@dataclass(frozen=True, eq=False)
class _Patient:
    index: int
    label: Label
    phi: PatientPHI
    anatomy: Anatomy
    spacing: float  # pixel spacing, mm
    z: np.ndarray  # slice positions, ascending
    slices: tuple[RenderedSlice, ...]
    labels: tuple[Label, ...]  # per slice, as a radiologist marks it
    outside: np.ndarray  # pixels outside the reconstruction circle
    noise: np.random.Generator
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: tuple[str, ...]


def generate_cohort(out: Path, config: SynthConfig, *, key: bytes = DEMO_KEY) -> CohortSummary:
    """Write the cohort under ``out`` (which must not hold a previous cohort: nothing is deleted).
    ``key``: the pseudonym key the cohort will be ingested with, which keys the truth's source digests."""
    out = Path(out)
    preset = LESION_PRESETS[config.lesions]
    for name in ("pe_fraction", "other_fraction", "pe_comorbid_fraction"):
        if not 0 <= getattr(config, name) <= 1:
            raise ValueError(f"synth.{name} {getattr(config, name)}: expected a fraction in [0, 1]")
    unknown = sorted(set(config.site_shift.sites) - {site_name(i) for i in range(config.sites)})
    if unknown:
        raise ValueError(f"synth.site_shift.sites {unknown}: not sites of this cohort (site-a .. {site_name(config.sites - 1)})")
    for sub in ("sites", "truth"):
        if (out / sub).exists() and any((out / sub).iterdir()):
            raise FileExistsError(f"{out / sub} is not empty; generate into a new directory")
    (out / "truth").mkdir(parents=True, exist_ok=True)
    phi: list[str] = []
    uids: list[str] = []
    sites: list[SiteSummary] = []
    site_json: list[dict[str, object]] = []
    counts = {label.value: 0 for label in _CLASSES}
    slice_counts = {label.value: 0 for label in Label}
    for index in range(config.sites):
        conv = shifted(site_conventions(index), config.site_shift)
        hospital = site_phi(index)
        phi += hospital.strings()
        plan = _class_plan(config, index)
        root = out / "sites" / conv.name
        files: list[Path] = []
        truth: list[dict[str, object]] = []
        manifest: list[dict[str, str]] = []
        patients: list[dict[str, object]] = []
        for p in range(config.patients_per_site):
            pat = _patient(config, preset, conv, index, p, plan)
            counts[pat.label.value] += 1
            for label in pat.labels:
                slice_counts[label.value] += 1
            phi += pat.phi.strings()
            uids += [pat.study_uid, pat.series_uid, pat.frame_uid, *pat.sop_uids]
            files += _write_patient(root / "dicom", conv, hospital, pat, config, truth, Pseudonymizer(key, conv.name))
            manifest += _manifest_rows(conv, pat)
            patients.append(_patient_json(pat))
        _write_manifest(root / "labels.csv", manifest)
        pq.write_table(pa.Table.from_pylist(truth, schema=schema.TRUTH_SCHEMA), out / "truth" / f"{conv.name}.parquet",
                       compression="zstd")
        sites.append(SiteSummary(conv.name, config.patients_per_site, len(truth), tuple(files)))
        site_json.append({"name": conv.name, "conventions": _conventions_json(conv), "patients": patients})
    phi_unique = tuple(dict.fromkeys(phi))
    (out / "truth" / "phi.json").write_text(
        json.dumps({"strings": list(phi_unique), "uids": list(dict.fromkeys(uids))}, indent=1) + "\n")
    (out / "truth" / "cohort.json").write_text(json.dumps({
        "seed": config.seed, "lesions": config.lesions, "min_visible_area_mm2": to_dict(config.min_visible_area_mm2),
        "config": to_dict(config), "sites": site_json}, indent=1) + "\n")
    return CohortSummary(out, tuple(sites), counts, phi_unique, slice_counts, config.lesions)


def _class_plan(config: SynthConfig, site: int) -> list[Label]:
    """Classes forced on a site's first patients so every site has each class (with fraction > 0)."""
    if config.patients_per_site < 3:
        return []
    fractions = _fractions(config)
    forced = [label for label in _CLASSES if fractions[label] > 0]
    order = np.random.default_rng(np.random.SeedSequence([config.seed % 2**63, site])).permutation(len(forced))
    return [forced[i] for i in order]


def _fractions(config: SynthConfig) -> dict[Label, float]:
    wnl = max(0.0, 1.0 - config.pe_fraction - config.other_fraction)
    return {Label.PE: config.pe_fraction, Label.OTHER: config.other_fraction, Label.WNL: wnl}


def _patient(config: SynthConfig, preset: LesionPreset, conv: SiteConventions, site: int, index: int,
             plan: list[Label]) -> _Patient:
    seq = np.random.SeedSequence([config.seed % 2**63, site], spawn_key=(index,))
    r_class, r_anat, r_disease, r_phi, r_geom, r_noise = (np.random.default_rng(s) for s in seq.spawn(6))
    if index < len(plan):
        label = plan[index]
    else:
        fr = _fractions(config)
        p = np.array([fr[Label.PE], fr[Label.OTHER], fr[Label.WNL]])
        label = _CLASSES[int(r_class.choice(3, p=p / p.sum()))]
    female = bool(r_class.random() < 0.5)
    normal = draw_anatomy(r_anat, female=female)
    fov = float(np.clip(np.ceil((2.0 * max(normal.body_a) + r_geom.uniform(20.0, 50.0)) / 10.0) * 10.0, *_FOV_MM))
    spacing = round(fov / config.size, 4)
    center = normal.z(float(r_geom.uniform(0.44, 0.56)))
    z = np.round(center + (np.arange(config.slices) - (config.slices - 1) / 2.0) * conv.spacing, 2)
    grid = make_grid(normal, config.size, spacing)
    outside = _outside_fov(grid)
    for _ in range(_MAX_DISEASE_DRAWS):
        anatomy = _disease(normal, r_disease, label, z, config, preset, spacing)
        slices = tuple(_cut_fov(render_slice(anatomy, grid, float(zi)), outside) for zi in z)
        labels = tuple(s.label(config.min_visible_area_mm2) for s in slices)
        if _shows(label, slices, labels):
            break
    else:
        raise RuntimeError(f"{conv.name} patient {index}: could not place {label.value} disease in the scanned range")
    keys = [f"pe-triage-synth/{config.seed}/{conv.name}/{index}"]
    return _Patient(
        index=index, label=label, phi=patient_phi(r_phi, conv.letter, index, female=female), anatomy=anatomy,
        spacing=spacing, z=z, slices=slices, labels=labels, outside=outside, noise=r_noise,
        study_uid=generate_uid(entropy_srcs=keys + ["study"]),
        series_uid=generate_uid(entropy_srcs=keys + ["series"]),
        frame_uid=generate_uid(entropy_srcs=keys + ["frame"]),
        sop_uids=tuple(generate_uid(entropy_srcs=keys + [f"sop/{i}"]) for i in range(len(z))),
    )


def _disease(an: Anatomy, rng: np.random.Generator, label: Label, z: np.ndarray, config: SynthConfig,
             preset: LesionPreset, spacing: float) -> Anatomy:
    if label is Label.PE:
        an = add_emboli(an, rng, z, config.pe_extent_slices, spacing, preset)
        if rng.random() < config.pe_comorbid_fraction:
            an = add_other_disease(an, rng, z, int(rng.choice([1, 2], p=[0.7, 0.3])), spacing, preset)
    elif label is Label.OTHER:
        an = add_other_disease(an, rng, z, int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])), spacing, preset)
    return an


def _shows(label: Label, slices: tuple[RenderedSlice, ...], labels: tuple[Label, ...]) -> bool:
    """A radiologist would give the patient its class: visible PE on two consecutive slices (when
    there are two); visible other disease and no clot at all, not even a sliver; no lesion pixel on
    any slice of a WNL patient."""
    if label is Label.PE:
        if len(labels) < 2:
            return Label.PE in labels
        return any(a is Label.PE and b is Label.PE for a, b in itertools.pairwise(labels))
    if label is Label.OTHER:
        return Label.OTHER in labels and not any("pe" in s.areas_mm2 for s in slices)
    return not any(s.areas_mm2 for s in slices)


def _outside_fov(grid: Grid) -> np.ndarray:
    """Pixels outside the reconstruction circle (its diameter is the image width)."""
    r = grid.size * grid.spacing / 2.0
    return grid.px[None, :] ** 2 + grid.py[:, None] ** 2 > r * r


def _cut_fov(s: RenderedSlice, outside: np.ndarray) -> RenderedSlice:
    tissue = s.tissue.copy()
    tissue[outside] = Tissue.AIR
    return RenderedSlice(s.hu, tissue, s.kind, s.spacing)


def _stored(conv: SiteConventions, hu: np.ndarray, outside: np.ndarray) -> np.ndarray:
    values = np.clip(np.rint(hu), -1024, conv.max_hu) - conv.intercept
    values[outside] = conv.outside_stored
    return values.astype(conv.dtype)


def _relative_path(conv: SiteConventions, pat: _Patient, instance: int, sop_uid: str) -> Path:
    """Three export styles; folder names carry indices only, never PHI."""
    series = f"{conv.series_number:04d}"
    if conv.layout == 0:
        return Path(f"P{pat.index + 1:04d}", "ST0001", f"SE{series}", f"IM{instance:06d}.dcm")
    if conv.layout == 1:
        return Path(f"S{pat.index + 1:04d}", f"SE{series}", sop_uid)
    return Path("DICOM", f"{pat.index + 1:08d}", "00000001", f"{conv.series_number:08d}", f"I{instance:07d}")


def _ds(v: float) -> str:
    """Decimal string that stays within DICOM's 16 characters and prints identically everywhere."""
    text = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _series_dataset(conv: SiteConventions, hospital: SitePHI, pat: _Patient, config: SynthConfig) -> Dataset:
    """Everything but the per-slice elements and the pixels, one DICOM module (PS3.3, CT Image IOD) at
    a time; the assignment order is free, as the writer encodes elements in tag order."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PETRIAGE_SYNTH"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"  # SOP Common
    ds.SOPClassUID = CTImageStorage
    _patient_modules(ds, pat.phi)
    _study_module(ds, pat)
    _series_modules(ds, conv, hospital, pat)
    _image_modules(ds, conv, pat, config)
    _pixel_modules(ds, conv, config)
    block = ds.private_block(0x0029, "ACME HOSPITAL PACS", create=True)  # PHI in a private tag, as real exports carry
    block.add_new(0x10, "LO", pat.phi.private_value)
    return ds


def _patient_modules(ds: Dataset, phi: PatientPHI) -> None:
    """Patient and Patient Study."""
    ds.PatientName = phi.name
    ds.PatientID = phi.mrn
    ds.PatientBirthDate = phi.birth_date
    ds.PatientSex = phi.sex
    ds.OtherPatientIDs = phi.other_id
    ds.PatientAddress = phi.address
    ds.PatientAge = phi.age
    ds.AdditionalPatientHistory = phi.history


def _study_module(ds: Dataset, pat: _Patient) -> None:
    """General Study."""
    phi = pat.phi
    ds.StudyInstanceUID = pat.study_uid
    ds.StudyDate = phi.study_date
    ds.StudyTime = phi.study_time
    ds.AccessionNumber = phi.accession
    ds.ReferringPhysicianName = phi.person(phi.referring, "Dr")
    ds.StudyID = phi.study_id
    ds.StudyDescription = phi.study_description


def _series_modules(ds: Dataset, conv: SiteConventions, hospital: SitePHI, pat: _Patient) -> None:
    """General Series, Frame of Reference and General Equipment."""
    phi = pat.phi
    ds.Modality = "CT"
    ds.SeriesInstanceUID = pat.series_uid
    ds.SeriesNumber = conv.series_number
    ds.SeriesDate = phi.study_date
    ds.SeriesTime = phi.series_time
    ds.SeriesDescription = f"CTPA {conv.thickness:g}mm {conv.kernel}"
    ds.PerformingPhysicianName = phi.person(phi.performing)
    ds.OperatorsName = phi.person(phi.operator)
    ds.BodyPartExamined = "CHEST"
    ds.ProtocolName = "CT PULMONARY ANGIOGRAM"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = pat.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = conv.manufacturer
    ds.ManufacturerModelName = conv.model
    ds.InstitutionName = hospital.institution
    ds.InstitutionAddress = hospital.address
    ds.InstitutionalDepartmentName = hospital.department
    ds.StationName = hospital.station


def _image_modules(ds: Dataset, conv: SiteConventions, pat: _Patient, config: SynthConfig) -> None:
    """General Image, Image Plane (but for the per-slice position), Contrast/Bolus and CT Image."""
    phi = pat.phi
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = ds.ContentDate = phi.study_date
    ds.AcquisitionTime = ds.ContentTime = phi.acquisition_time
    ds.ImageComments = phi.image_comments
    ds.BurnedInAnnotation = "NO"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds(pat.spacing), _ds(pat.spacing)]
    ds.SliceThickness = _ds(conv.thickness)
    ds.SpacingBetweenSlices = _ds(conv.spacing)
    ds.ContrastBolusAgent = conv.contrast_agent
    ds.ContrastBolusRoute = "IV"
    ds.ScanOptions = "HELICAL MODE"
    ds.KVP = _ds(conv.kvp)
    ds.XRayTubeCurrent = 250
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(pat.spacing * config.size)
    ds.ConvolutionKernel = conv.kernel
    ds.RescaleIntercept = _ds(conv.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"


def _pixel_modules(ds: Dataset, conv: SiteConventions, config: SynthConfig) -> None:
    """Image Pixel (with the equipment's pixel padding value) and VOI LUT."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = config.size
    ds.BitsAllocated = 16
    ds.BitsStored = conv.bits_stored
    ds.HighBit = conv.bits_stored - 1
    ds.PixelRepresentation = int(conv.signed)
    if conv.padding is not None:
        ds.add_new(0x00280120, "SS" if conv.signed else "US", conv.padding)
    ds.WindowCenter = [_ds(v) for v in conv.window_center]
    ds.WindowWidth = [_ds(v) for v in conv.window_width]


class _SeriesWriter:
    """Encodes a series' constant header once; each slice then only encodes its own elements.

    pydicom's ``save_as`` re-encodes ~80 elements per file, which costs more than drawing the
    slice. The output is byte-identical to ``Dataset.save_as(..., enforce_file_format=True)``.
    """

    def __init__(self, template: Dataset, conv: SiteConventions) -> None:
        self.conv = conv
        self.meta = FileMetaDataset(template.file_meta)
        self.meta.TransferSyntaxUID = conv.transfer_syntax
        groups: list[list[DataElement]] = [[] for _ in range(len(_SLICE_TAGS) + 1)]
        for elem in template:
            groups[sum(elem.tag > tag for tag in _SLICE_TAGS)].append(elem)
        self.segments = [self._encode(group) for group in groups]
        self.pixel_kwargs = {
            "rows": template.Rows, "columns": template.Columns, "samples_per_pixel": 1, "bits_allocated": 16,
            "bits_stored": template.BitsStored, "pixel_representation": template.PixelRepresentation,
            "photometric_interpretation": "MONOCHROME2", "number_of_frames": 1,
        }

    @staticmethod
    def _encode(elements: list[DataElement]) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        for elem in elements:
            write_data_element(fp, elem)
        return fp.getvalue()

    def file_bytes(self, sop: str, instance: int, position: list[str], stored: np.ndarray) -> bytes:
        encoder = _ENCODERS.get(self.conv.transfer_syntax)
        if encoder is None:
            pixels = DataElement(0x7FE00010, "OW", stored.tobytes())
        else:
            frame = encoder.encode(stored, encoding_plugin="pylibjpeg", **self.pixel_kwargs)
            pixels = DataElement(0x7FE00010, "OB", encapsulate([frame]), is_undefined_length=True)
        changing = [DataElement(0x00080018, "UI", sop), DataElement(0x00200013, "IS", str(instance)),
                    DataElement(0x00200032, "DS", position), DataElement(0x00201041, "DS", position[2]), pixels]
        self.meta.MediaStorageSOPInstanceUID = UID(sop)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, self.meta, enforce_standard=True)
        parts = [fp.getvalue()]
        for segment, elem in zip(self.segments[:-1], changing, strict=True):
            parts += [segment, self._encode([elem])]
        parts.append(self.segments[-1])
        return b"".join(parts)


def _instance_numbers(conv: SiteConventions, n: int) -> list[int]:
    """InstanceNumber of each slice in ascending z."""
    return [n - i for i in range(n)] if conv.instances_descending else [i + 1 for i in range(n)]


def _write_patient(root: Path, conv: SiteConventions, hospital: SitePHI, pat: _Patient, config: SynthConfig,
                   truth: list[dict[str, object]], pseudo: Pseudonymizer) -> list[Path]:
    writer = _SeriesWriter(_series_dataset(conv, hospital, pat, config), conv)
    sigma = conv.noise_sigma * pat.anatomy.scale**1.5
    origin = _ds(-(config.size - 1) / 2.0 * pat.spacing)
    written: list[Path] = []
    rows: dict[int, dict[str, object]] = {}
    numbers = _instance_numbers(conv, len(pat.z))
    for i in sorted(range(len(pat.z)), key=lambda i: numbers[i]):
        s, z, sop = pat.slices[i], float(pat.z[i]), pat.sop_uids[i]
        stored = _stored(conv, scanner(s.hu + conv.hu_offset, pat.noise, sigma, pat.spacing), pat.outside)
        data = writer.file_bytes(sop, numbers[i], [origin, origin, _ds(z)], stored)
        path = root / _relative_path(conv, pat, numbers[i], sop)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
        rows[i] = {
            schema.SITE: conv.name,
            schema.M_PATIENT_ID: pat.phi.mrn,
            schema.M_STUDY_UID: pat.study_uid,
            schema.M_SERIES_UID: pat.series_uid,
            schema.M_SOP_UID: sop,
            schema.SOURCE_HMAC: pseudo.source_digest(data),
            schema.Z_MM: z,
            schema.ROWS: config.size,
            schema.COLS: config.size,
            schema.LABEL: pat.labels[i].value,
            schema.T_LESION: s.lesion,
            schema.T_MASK: s.lesion_mask(pat.labels[i]).astype(np.uint8).tobytes(),
            schema.T_TISSUE: s.tissue.tobytes() if config.write_tissue_maps else None,
        }
    truth += [rows[i] for i in range(len(pat.z))]
    return written


def _manifest_rows(conv: SiteConventions, pat: _Patient) -> list[dict[str, str]]:
    """A patient row with the diagnosis, then one row per non-WNL slice, indeterminate ones included
    (unlisted slices are WNL)."""
    rows = [{schema.M_PATIENT_ID: pat.phi.mrn, schema.M_STUDY_UID: pat.study_uid, schema.M_DIAGNOSIS: pat.label.value}]
    numbers = _instance_numbers(conv, len(pat.z))
    for i in sorted(range(len(pat.z)), key=lambda i: numbers[i]):
        label = pat.labels[i]
        if label is Label.WNL:
            continue
        row = {schema.M_PATIENT_ID: pat.phi.mrn, schema.M_STUDY_UID: pat.study_uid,
               schema.M_SERIES_UID: pat.series_uid, schema.M_LABEL: label.value}
        if conv.manifest_by_instance:
            row[schema.M_INSTANCE_NUMBER] = str(numbers[i])
        else:
            row[schema.M_SOP_UID] = pat.sop_uids[i]
        rows.append(row)
    return rows


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=schema.MANIFEST_COLUMNS, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _conventions_json(conv: SiteConventions) -> dict[str, object]:
    d = dataclasses.asdict(conv)
    d["transfer_syntax"] = str(conv.transfer_syntax)
    return d


def _patient_json(pat: _Patient) -> dict[str, object]:
    labels = pat.labels
    an = pat.anatomy
    return {
        "index": pat.index,
        "patient_id": pat.phi.mrn,
        "class": pat.label.value,
        "slices": len(labels),
        "pe_slices": labels.count(Label.PE),
        "other_slices": labels.count(Label.OTHER),
        "indeterminate_slices": labels.count(Label.INDETERMINATE),
        "pixel_spacing_mm": pat.spacing,
        "emboli": [{"location": e.location, "fraction": round(e.fraction, 3), "hu": round(e.hu, 1),
                    "z_mm": [round(e.z_lo, 2), round(e.z_hi, 2)]} for e in an.emboli],
        "lesions": [{"kind": b.kind, "hu": round(b.hu, 1), "center_z_mm": round(b.center[2], 2)} for b in an.blobs]
        + [{"kind": "effusion", "hu": round(e.hu, 1), "top_z_mm": round(e.z_top, 2)} for e in an.effusions],
    }


def cohort_overview(cohort: CohortSummary) -> dict[str, Any]:
    """Counts only: the summary's file list and injected PHI strings stay out of logs and reports."""
    return {
        "lesions": cohort.lesions,
        "sites": {s.name: {"patients": s.patients, "slices": s.slices} for s in cohort.sites},
        "patients_per_class": dict(cohort.class_counts),
        "slices_per_label": dict(cohort.slice_counts),
    }

"""The result objects that go back to the source PACS: a TID 1500 measurement report (Comprehensive
3D SR) and a key image (Secondary Capture of the most suspicious slice, the model's evidence map
over it: ``Triage.evidence``, which maps it from the model input back through the lung crop).

Both copy the patient and study modules from the source slices (highdicom does, from the
referenced datasets) and get fresh UIDs under ``PacsConfig.uid_root``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_modality_lut
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pe_triage.config import PacsConfig
from pe_triage.pacs.source import SourceSlice

#: private coding scheme (DICOM PS3.16: a designator starting with 99) for the triage concepts
SCHEME = "99PETRIAGE"
FINDING = Code("121071", "DCM", "Finding")
TRIAGE_CODES = {
    "pe": Code("pe-suspected", SCHEME, "PE suspected"),
    "other": Code("other-disease", SCHEME, "Other disease"),
    "wnl": Code("no-finding", SCHEME, "No finding"),
}
P_PE = Code("p-pe", SCHEME, "Probability of pulmonary embolism")
P_DISEASE = Code("p-disease", SCHEME, "Probability of disease")
DISCLAIMER = Code("121106", "DCM", "Comment")
PROCEDURE = Code("24627-2", "LN", "CT Chest")
NO_UNITS = Code("1", "UCUM", "no units")
#: series numbers of the result series, far above a scanner's (1-20), so viewers list them last
SR_SERIES_NUMBER, KEY_IMAGE_SERIES_NUMBER = 9901, 9902
#: mediastinal window (level, width in HU): where a filling defect in the pulmonary arteries shows
_WINDOW = (40.0, 400.0)
#: the evidence map's opacity at its hottest: the slice stays readable under the heat (overlay_png's 0.6)
_OPACITY = 0.6
#: the ring around the map's peak: magenta, which neither the grey slice (white: contrast, bone) nor
#: jet over it can show
_MARKER = (255, 0, 255)


@dataclass(frozen=True)
class SliceResult:
    """A scored source slice: what the SR references and reports."""

    source: SourceSlice
    p_disease: float
    p_pe: float
    flagged: bool


def _group(name: str, slices: Sequence[SliceResult], algorithm: hd.sr.AlgorithmIdentification, config: PacsConfig,
           triage: str | None = None, p: tuple[float, float] | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A measurement group: optional finding and probabilities, with its source images."""
    measurements = None if p is None else [
        hd.sr.Measurement(name=code, value=round(value, 6), unit=NO_UNITS, algorithm_id=algorithm)
        for code, value in ((P_DISEASE, p[0]), (P_PE, p[1])) if np.isfinite(value)]  # a study score may be -inf
    evaluations = None if triage is None else [hd.sr.QualitativeEvaluation(FINDING, TRIAGE_CODES[triage])]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(prefix=config.uid_root), identifier=name),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(s.source.header) for s in slices])


def build_sr(triage: str, scores: tuple[float, float], slices: Sequence[SliceResult], *, model: str, version: str,
             config: PacsConfig) -> hd.sr.Comprehensive3DSR:
    """The study's triage (``wnl`` | ``other`` | ``pe``) and study scores, then one group per
    referenced slice (the flagged ones, most suspicious first, at most ``config.max_slice_refs``;
    the most suspicious slice when none is flagged) with its probabilities, and the disclaimer."""
    ranked = sorted(slices, key=lambda s: -s.p_pe)
    referenced = [s for s in ranked if s.flagged][: config.max_slice_refs] or ranked[:1]
    algorithm = hd.sr.AlgorithmIdentification(name=model, version=version)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(prefix=config.uid_root), name=model, manufacturer_name=config.manufacturer,
            model_name=version))
    groups = [_group("study triage", referenced, algorithm, config, triage=triage, p=scores)]
    groups += [_group(f"slice {i}", [s], algorithm, config, p=(s.p_disease, s.p_pe)) for i, s in enumerate(referenced, 1)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE, imaging_measurements=groups)
    report[0].ContentSequence.append(hd.sr.TextContentItem(
        name=DISCLAIMER, value=config.disclaimer, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[s.source.header for s in referenced], content=report[0],
        series_instance_uid=generate_uid(prefix=config.uid_root), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(prefix=config.uid_root), instance_number=1,
        manufacturer=config.manufacturer, institution_name=config.institution,
        series_description="pe-triage result", is_complete=True)
    scheme = Dataset()  # a private coding scheme is declared in the object that uses it (PS3.3 C.12.1)
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "pe-triage triage concepts"
    scheme.CodingSchemeResponsibleOrganization = config.manufacturer
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _overlay(rgb: np.ndarray, heat: np.ndarray) -> None:
    """The evidence map in jet over ``rgb`` (in place), opaque where it is hot and absent where it is
    cold (as ``evaluation.gradcam.overlay_png``), and a ring around its peak that leaves the peak itself visible."""
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"evidence map {heat.shape} and slice {rgb.shape[:2]} differ in shape")
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0, 1)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).round().astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (_OPACITY * heat)[..., None]
    rgb[:] = (rgb * (1 - alpha) + colour * alpha).round().astype(np.uint8)
    if heat.max() > 0:
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        radius = max(6, min(heat.shape) // 24)
        cv2.circle(rgb, (int(x), int(y)), radius, _MARKER, max(1, min(heat.shape) // 256), cv2.LINE_AA)


def _picture(source: SourceSlice, caption: Sequence[str], heat: np.ndarray | None = None) -> np.ndarray:
    """The slice in the mediastinal window as RGB, the evidence map ``heat`` (when given) over it,
    framed in red, with ``caption`` burnt in."""
    ds = dcmread(source.path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    level, width = _WINDOW
    gray = np.clip((hu - level + width / 2) / width * 255, 0, 255).astype(np.uint8)
    rgb = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if heat is not None:
        _overlay(rgb, heat)
    rows, cols = gray.shape
    thick = max(2, rows // 128)
    cv2.rectangle(rgb, (0, 0), (cols - 1, rows - 1), (255, 0, 0), thick)
    scale = max(0.35, rows / 1200)
    for i, line in enumerate(caption):
        y = int((i + 1) * 28 * scale * 1.2) + thick
        cv2.putText(rgb, line, (thick + 4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1, cv2.LINE_AA)
    return rgb


def build_key_image(most_suspicious: SliceResult, triage: str, *, model: str, version: str, config: PacsConfig,
                    evidence: np.ndarray | None = None, evidence_label: str = "") -> hd.sc.SCImage:
    """A Secondary Capture of the most suspicious slice with the model's ``evidence`` map over it
    (source pixels, [0, 1]; drawn by ``evidence_label``), captioned with the result and the
    disclaimer, referencing the source slice (Source Image Sequence). Without a map, the caption says so."""
    src = most_suspicious.source
    shown = "no evidence map" if evidence is None else (
        f"overlay: {evidence_label}, ring at its peak" if np.max(evidence) > 0 else "no positive evidence on this slice")
    caption = [f"pe-triage: {TRIAGE_CODES[triage].meaning}", f"p(PE) {most_suspicious.p_pe:.2f}",
               f"{model} v{version}", *textwrap.wrap(shown, 56), *textwrap.wrap(config.disclaimer, 56)]
    spacing = src.header.get("PixelSpacing")
    image = hd.sc.SCImage.from_ref_dataset(
        src.header, _picture(src, caption, evidence), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=generate_uid(prefix=config.uid_root),
        series_number=KEY_IMAGE_SERIES_NUMBER, sop_instance_uid=generate_uid(prefix=config.uid_root),
        instance_number=1, manufacturer=config.manufacturer,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,  # type: ignore[arg-type]
        patient_orientation=("L", "P"), series_description="pe-triage key image")
    reference = Dataset()
    reference.ReferencedSOPClassUID = src.header.SOPClassUID
    reference.ReferencedSOPInstanceUID = src.header.SOPInstanceUID
    image.SourceImageSequence = [reference]
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.BurnedInAnnotation = "YES"
    image.InstitutionName = config.institution
    if "Laterality" not in image:  # General Series 2C: the chest is no paired structure, but validators ask
        image.add_new("Laterality", "CS", None)
    image.DerivationDescription = ("most suspicious slice, mediastinal window, model evidence map and result caption "
                                   "burnt in")
    return image

"""Header scan of one DICOM file: validate, pseudonymise, and find where its pixels are.

Runs on the first bytes of a file (``stop_before_pixels``), so a whole site can be planned (series
grouping, z order, geometry checks) before any pixel is decoded. Clear identifiers never leave
this module: the returned :class:`SliceHeader` carries pseudonyms only.

A plain file (see :mod:`pe_triage.dicom.raw`) is read from its raw bytes: only the elements the
checks use are converted, into the values pydicom would give (``raw.Values``), and the same checks
run on them: 0.14 ms of CPU a header against 0.66 through pydicom's Dataset. Any other file, or a
value not written in its plain form, is read by pydicom.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple, Protocol

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage

from pe_triage.config import IngestConfig
from pe_triage.dicom.deid import Pseudonymizer
from pe_triage.dicom.raw import Values, read_raw, tags_of, values
from pe_triage.schema import Reason

#: a header longer than this is re-read from the whole file
HEADER_PREFIX_BYTES = 64 * 1024
_PIXEL_TAG = {True: b"\xe0\x7f\x10\x00", False: b"\x7f\xe0\x00\x10"}  # by little-endianness
_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",  # JPEG baseline (8 bit)
    "1.2.840.10008.1.2.4.51",  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.53",
    "1.2.840.10008.1.2.4.55",
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy allowed)
}
_REQUIRED = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "RescaleIntercept",
    "RescaleSlope",
)
#: the normal of an axial slice lies within ~37° of the patient's z axis (gantry tilt allowed)
_MIN_AXIAL_COSINE = 0.8
#: every element the checks below read, with the value multiplicity it must have to be read from the
#: raw bytes (None: any); a file whose value has another goes to pydicom, which reads it as it is
_RAW_META = {"MediaStorageSOPClassUID": 1, "MediaStorageSOPInstanceUID": 1, "TransferSyntaxUID": 1}
_RAW_KEYWORDS: dict[str, int | None] = {
    "SpecificCharacterSet": None, "ImageType": None, "SOPClassUID": 1, "SOPInstanceUID": 1, "Modality": None,
    "Manufacturer": 1, "ManufacturerModelName": 1, "PatientID": 1, "ContrastBolusAgent": 1, "SliceThickness": 1,
    "KVP": 1, "ConvolutionKernel": 1, "StudyInstanceUID": 1, "SeriesInstanceUID": 1, "InstanceNumber": 1,
    "ImagePositionPatient": 3, "ImageOrientationPatient": 6, "SamplesPerPixel": 1, "PhotometricInterpretation": None,
    "NumberOfFrames": 1, "Rows": 1, "Columns": 1, "PixelSpacing": 2, "BitsAllocated": 1, "BitsStored": 1,
    "PixelRepresentation": 1, "PixelPaddingValue": 1, "PixelPaddingRangeLimit": 1, "RescaleIntercept": 1,
    "RescaleSlope": 1, "LossyImageCompression": None, "BurnedInAnnotation": None,
}
_RAW_TAGS = tags_of(_RAW_KEYWORDS)
#: character sets in which printable ASCII bytes mean what they mean in ASCII (ISO_IR 13 does not: ¥ for \\)
_PLAIN_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6", "ISO 2022 IR 100"})


class _Header(Protocol):
    """A header as the checks read it: a pydicom Dataset, or the :class:`Values` of a plain file."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def __getattr__(self, key: str) -> Any: ...


class Rejected(Exception):
    """A file that cannot be ingested; ``reason`` is a :class:`Reason` code."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SliceHeader:
    """What ingest needs of one slice, with pseudonymised ids and the pixel data's location."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    uids_derived: bool
    instance_number: int | None
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    z_mm: float
    rows: int
    cols: int
    spacing: tuple[float, float]
    slice_thickness: float | None
    manufacturer: str | None
    model: str | None
    kernel: str | None
    kvp: float | None
    contrast: bool
    transfer_syntax: str
    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    padding: tuple[int, int] | None  # inclusive range of stored values that are padding
    #: offset of the PixelData element in the file for native little-endian syntaxes, else -1
    pixel_offset: int

    @property
    def geometry_key(self) -> tuple[object, ...]:
        return geometry_key(self.rows, self.cols, self.orientation, self.spacing)


def geometry_key(rows: int, cols: int, orientation: Sequence[float], spacing: Sequence[float]) -> tuple[object, ...]:
    """What must agree between the slices of one series (cosines and spacings to 1e-3)."""
    return (rows, cols, tuple(round(v, 3) for v in orientation), tuple(round(v, 3) for v in spacing))


def _scrub(message: str) -> str:
    """Library error messages may quote header values: drop quoted text and long digit runs."""
    message = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    return re.sub(r"\d{6,}", "…", message)[:200]


def _text(ds: _Header, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MutableSequence):  # pydicom's MultiValue, or the list of a raw read
        value = "\\".join(str(v) for v in value)
    return str(value).strip() or None


def _float(ds: _Header, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _uid(value: object) -> str:
    return str(value or "").strip()


def _identity(ds: _Header, pseudo: Pseudonymizer) -> tuple[str, str, str, str, bool]:
    """Pseudonymised (patient, study, series, sop) ids, deriving stable stand-ins for empty UIDs.

    Real exports sometimes carry empty UID strings. Rather than drop such data, each missing id is
    derived from the header fields that identify that level (documented in the README); the slice
    is marked ``uids_derived`` so the shortcut stays visible downstream.
    """
    meta = getattr(ds, "file_meta", Dataset())
    study = _uid(ds.get("StudyInstanceUID"))
    series = _uid(ds.get("SeriesInstanceUID"))
    sop = _uid(ds.get("SOPInstanceUID")) or _uid(meta.get("MediaStorageSOPInstanceUID"))
    patient = _uid(ds.get("PatientID"))
    derived = not (study and series and sop and patient)

    def fields(*keywords: str) -> str:
        return "\x1e".join(str(ds.get(k, "")) for k in keywords)

    if not study:
        study = "derived-study:" + fields(
            "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "FrameOfReferenceUID"
        )
    if not patient:
        patient = "derived-patient:" + study
    if not series:
        series = f"derived-series:{study}\x1e" + fields(
            "FrameOfReferenceUID", "SeriesNumber", "SeriesDescription", "SeriesTime", "ImageOrientationPatient",
            "Rows", "Columns", "PixelSpacing", "SliceThickness", "ConvolutionKernel",
        )
    if not sop:
        sop = f"derived-sop:{series}\x1e" + fields("ImagePositionPatient", "InstanceNumber", "AcquisitionNumber")
    return pseudo("patient", patient), pseudo("study", study), pseudo("series", series), pseudo("sop", sop), derived


def _int(ds: _Header, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    try:
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise Rejected(Reason.MISSING_TAG, f"malformed {keyword}") from None


def _check_plausible(ds: _Header, config: IngestConfig) -> None:
    """Sizes the header declares, refused before any decoder allocates for them: a small file can
    claim a 65535² image, and the decoder would reserve gigabytes before finding the data short."""
    limits = (("Rows", 1, config.max_rows), ("Columns", 1, config.max_cols),
              ("NumberOfFrames", 1, config.max_frames), ("BitsAllocated", 1, config.max_bits_allocated))
    for keyword, low, high in limits:
        value = _int(ds, keyword, low)
        if value > high:
            raise Rejected(Reason.IMPLAUSIBLE_HEADER, f"{keyword} {value} > {high} (the configured limit)")
        if value < low:
            raise Rejected(Reason.IMPLAUSIBLE_HEADER, f"{keyword} {value} < {low}")


def _check_image(ds: _Header, ts: UID, config: IngestConfig) -> None:
    sop_class = _uid(ds.get("SOPClassUID")) or _uid(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID"))
    modality = _text(ds, "Modality")
    if modality != "CT":
        raise Rejected(Reason.NOT_CT, f"Modality is {modality or 'missing'}")
    if sop_class == EnhancedCTImageStorage:
        raise Rejected(Reason.UNSUPPORTED_PIXEL_FORMAT, "multi-frame Enhanced CT is not supported")
    if sop_class and sop_class != CTImageStorage:
        raise Rejected(Reason.NOT_CT, f"SOP class {UID(sop_class).name} is not CT Image Storage")
    if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
        raise Rejected(Reason.NOT_AXIAL_IMAGE, "localizer (scout) image")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise Rejected(Reason.BURNED_IN_ANNOTATION, "BurnedInAnnotation is YES: text may be burned into pixels")
    missing = [k for k in _REQUIRED if ds.get(k) in (None, "")]
    if missing:
        raise Rejected(Reason.MISSING_TAG, "missing " + ", ".join(missing))
    _check_plausible(ds, config)
    if int(ds.get("SamplesPerPixel", 1)) != 1 or _text(ds, "PhotometricInterpretation") not in (
        "MONOCHROME2",
        "MONOCHROME1",
    ):
        raise Rejected(Reason.UNSUPPORTED_PIXEL_FORMAT, "not a single-channel greyscale image")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise Rejected(Reason.UNSUPPORTED_PIXEL_FORMAT, "multi-frame image")
    if int(ds.BitsAllocated) not in (8, 16, 32) or not 1 <= int(ds.BitsStored) <= int(ds.BitsAllocated):
        raise Rejected(Reason.UNSUPPORTED_PIXEL_FORMAT, f"BitsAllocated {ds.BitsAllocated}, BitsStored {ds.BitsStored}")
    if ts in _LOSSY_SYNTAXES or str(ds.get("LossyImageCompression", "")) == "01":
        raise Rejected(
            Reason.LOSSY_COMPRESSION, f"{ts.name}: lossy compression alters HU and is not a valid CT source"
        )
    if ts.is_compressed and not _decodable(ts):
        raise Rejected(Reason.UNSUPPORTED_TRANSFER_SYNTAX, f"no decoder installed for {ts.name}")


@cache
def _decodable(ts: UID) -> bool:
    """Whether a decoder for ``ts`` is installed (pydicom looks for plugins on every call)."""
    return bool(pydicom.pixels.get_decoder(ts).is_available)


def _padding(ds: _Header) -> tuple[int, int] | None:
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    return (min(int(value), int(limit)), max(int(value), int(limit)))


def parse_header(data: bytes, pseudo: Pseudonymizer, *, complete: bool, config: IngestConfig = IngestConfig()) -> SliceHeader:
    """Validate and describe a slice from ``data``: the file's first bytes, or all of it.

    ``complete`` says whether ``data`` is the whole file; a header that runs past an incomplete
    prefix raises :class:`IncompleteHeader` so the caller re-reads the whole file. The checks run
    in a fixed order (file, transfer syntax, pixels, image, geometry): a file with several faults is
    always quarantined under the same reason. Sizes are checked against ``config``'s limits before
    anything decodes pixels.
    """
    plain = _read_plain(data)
    try:
        ds, ts, end = plain if plain is not None else _read(data, complete=complete, config=config)
        _check_image(ds, ts, config)
        return _slice_header(ds, ts, _geometry(ds), pseudo, pixel_offset=end if str(ts) in _NATIVE_LE else -1)
    except (Rejected, IncompleteHeader):
        raise
    except Exception as exc:
        if plain is not None:  # plain values cannot be malformed: this is a bug, not the file's fault
            raise
        # pydicom converts a value when it is first read, and a damaged one fails in any way (TypeError for
        # two values where one is expected, BytesLengthException, NotImplementedError for an unknown VR)
        raise Rejected(Reason.MISSING_TAG, f"malformed header value ({type(exc).__name__})") from None


def _read_plain(data: bytes | memoryview) -> tuple[Values, UID, int] | None:
    """The header of a plain file (see :mod:`pe_triage.dicom.raw`), its transfer syntax and where its
    pixels start; None for any other file, and for one whose ids must be derived (pydicom's text forms
    of other values make them)."""
    raw = read_raw(data, _RAW_TAGS)
    ds = values(raw, _RAW_KEYWORDS, _RAW_META) if raw is not None else None
    if raw is None or ds is None or ds.file_meta is None:
        return None
    charset = ds.get("SpecificCharacterSet", "")
    if not isinstance(charset, str) or charset not in _PLAIN_CHARSETS:
        return None
    sop = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
    if not all(_uid(v) for v in (ds.get("PatientID"), ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), sop)):
        return None
    return ds, UID(raw.transfer_syntax), raw.pixel_offset


def _read(data: bytes, *, complete: bool, config: IngestConfig) -> tuple[Dataset, UID, int]:
    """The header, its transfer syntax and where it ends, once the file is known to hold pixels."""
    if not data:
        raise Rejected(Reason.EMPTY_FILE, "zero-byte file")
    buf = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(buf, stop_before_pixels=True)
    except Exception as exc:  # arbitrary bytes: the parser may fail in any way
        if not complete:
            raise IncompleteHeader() from exc
        raise Rejected(Reason.UNREADABLE, f"not a readable DICOM file ({type(exc).__name__}: {_scrub(str(exc))})") from None
    ts = UID(_uid(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")) or "1.2.840.10008.1.2")
    if not ts.is_transfer_syntax:
        raise Rejected(Reason.UNSUPPORTED_TRANSFER_SYNTAX, f"unknown transfer syntax {ts}")
    if ts.is_deflated and not complete:
        raise IncompleteHeader()
    end = buf.tell()
    at_pixels = data[end : end + 4] == _PIXEL_TAG[ts.is_little_endian] and not ts.is_deflated
    if not at_pixels and not ts.is_deflated:
        if not complete:
            raise IncompleteHeader()
        if _ends_inside_an_element(data, ts):
            raise Rejected(Reason.TRUNCATED, "the file ends inside its header")
        _check_image(ds, ts, config)  # a non-image object is refused as what it is, not for its missing pixels
        raise Rejected(Reason.NO_PIXELS, "no PixelData element")
    if ts.is_deflated and "PixelData" not in pydicom.dcmread(io.BytesIO(data)):
        raise Rejected(Reason.NO_PIXELS, "no PixelData element")
    return ds, ts, end


def _ends_inside_an_element(data: bytes, ts: UID) -> bool:
    """Whether the file stops inside an element: a cut copy, which pydicom reads without complaint
    (it keeps the short value) but which is not a complete object that merely lacks pixels."""
    buf = io.BytesIO(data)
    buf.seek(132 if data[128:132] == b"DICM" else 0)
    end = buf.tell()  # where the last element read ends
    # the file meta group is explicit VR little endian whatever the transfer syntax; the rest follows it
    for implicit, little, stop in ((False, True, lambda tag, vr, length: tag.group != 2),
                                   (ts.is_implicit_VR, ts.is_little_endian, None)):
        try:
            for elem in data_element_generator(buf, implicit, little, stop_when=stop, defer_size=0):
                end = elem.value_tell + elem.length if isinstance(elem, RawDataElement) else buf.tell()
                if end > len(data):
                    return True
        except (EOFError, ValueError, NotImplementedError, OSError):  # OSError: a sequence item without its tag
            return True
        if buf.tell() < len(data):  # the meta group ended: the generator stepped back to the next element
            end = buf.tell()
    return end != len(data)  # bytes left over that do not make an element header


class _Geometry(NamedTuple):
    """The header's numbers that place the slice and scale its values, parsed and checked."""

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    spacing: tuple[float, float]
    normal: tuple[float, float, float]
    slope: float
    intercept: float
    instance_number: int | None


def _geometry(ds: _Header) -> _Geometry:
    try:
        position = tuple(float(v) for v in ds.ImagePositionPatient)
        orientation = tuple(float(v) for v in ds.ImageOrientationPatient)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        instance = ds.get("InstanceNumber")
        instance_number = int(instance) if instance not in (None, "") else None
    except (TypeError, ValueError) as exc:
        raise Rejected(Reason.MISSING_TAG, f"malformed geometry or rescale tag ({_scrub(str(exc))})") from None
    if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2 or min(spacing) <= 0:
        raise Rejected(Reason.MISSING_TAG, "malformed ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
    (r0, r1, r2), (c0, c1, c2) = orientation[:3], orientation[3:]
    normal = (r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0)  # np.cross, at a tenth of its cost
    if abs(normal[2]) < _MIN_AXIAL_COSINE * (math.hypot(*normal) or 1.0):
        raise Rejected(Reason.NOT_AXIAL_IMAGE, "slice is not axial (sagittal/coronal reformat)")
    return _Geometry(position, orientation, spacing, normal, slope, intercept, instance_number)


def _slice_header(ds: _Header, ts: UID, geo: _Geometry, pseudo: Pseudonymizer, *, pixel_offset: int) -> SliceHeader:
    """The checked header as ingest keeps it: pseudonymised ids, no clear identifier."""
    patient, study, series, sop, derived = _identity(ds, pseudo)
    return SliceHeader(
        patient_id=patient,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        uids_derived=derived,
        instance_number=geo.instance_number,
        position=geo.position,
        orientation=geo.orientation,
        z_mm=float(np.dot(geo.normal, geo.position)),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        spacing=geo.spacing,
        slice_thickness=_float(ds, "SliceThickness"),
        manufacturer=_text(ds, "Manufacturer"),
        model=_text(ds, "ManufacturerModelName"),
        kernel=_text(ds, "ConvolutionKernel"),
        kvp=_float(ds, "KVP"),
        contrast=_text(ds, "ContrastBolusAgent") is not None,
        transfer_syntax=str(ts),
        bits_allocated=int(ds.BitsAllocated),
        bits_stored=int(ds.BitsStored),
        signed=int(ds.PixelRepresentation) == 1,
        slope=geo.slope,
        intercept=geo.intercept,
        padding=_padding(ds),
        pixel_offset=pixel_offset,
    )


class IncompleteHeader(Exception):
    """The header did not fit in the prefix that was read."""

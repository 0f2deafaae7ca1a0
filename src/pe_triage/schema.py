"""The contract between stages: every column name, Arrow schema and code list lives here.

Stages import names from this module instead of spelling strings, so a renamed column is one edit
and a reader can never disagree with a writer.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: source_sha256 (a plain hash of the identified file) became the keyed source_hmac

# ---------------------------------------------------------------------------- slices
SITE = "site"
PATIENT_ID = "patient_id"
STUDY_UID = "study_uid"
SERIES_UID = "series_uid"
SOP_UID = "sop_uid"
SLICE_INDEX = "slice_index"
INSTANCE_NUMBER = "instance_number"
Z_MM = "z_mm"
IMAGE_POSITION = "image_position"
IMAGE_ORIENTATION = "image_orientation"
ROWS = "rows"
COLS = "cols"
PIXEL_SPACING_ROW = "pixel_spacing_row_mm"
PIXEL_SPACING_COL = "pixel_spacing_col_mm"
SLICE_THICKNESS = "slice_thickness_mm"
MANUFACTURER = "manufacturer"
MODEL = "model"
KERNEL = "kernel"
KVP = "kvp"
CONTRAST = "contrast"
TRANSFER_SYNTAX = "transfer_syntax"
UIDS_DERIVED = "uids_derived"
HU = "hu_planes"
#: HMAC-SHA256 of the source file under the pseudonym key (``Pseudonymizer.source_digest``): finds
#: duplicates, yet cannot be matched against a file by anyone without the key
SOURCE_HMAC = "source_hmac"
LABEL = "label"


class Label(enum.StrEnum):
    """Per-slice class. Slices of a labelled patient that the manifest does not list are WNL."""

    WNL = "wnl"
    PE = "pe"
    OTHER = "other"
    #: a finding too small or uncertain to call on that slice: kept and counted, but left out of
    #: training and of slice metrics by default (no one can say what the model should answer)
    INDETERMINATE = "indeterminate"


#: a patient's class is the first of these among its slice labels: a definite finding outranks an
#: indeterminate one, and a patient with an indeterminate but no definite finding is not WNL
PATIENT_CLASS_ORDER = (Label.PE.value, Label.OTHER.value, Label.INDETERMINATE.value, Label.WNL.value)


def patient_class(labels: Iterable[str]) -> str:
    """The class of a patient with these slice labels (see :data:`PATIENT_CLASS_ORDER`)."""
    present = set(labels)
    return next((c for c in PATIENT_CLASS_ORDER if c in present), Label.WNL.value)


HU_ENCODING = "int16 HU, row-major, stored as two byte planes: rows*cols low bytes, then rows*cols high bytes"


def encode_hu(hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int16 HU image -> byte planes (uint8, 2*rows*cols).

    Noise lives in the low byte; the high byte of a CT slice takes a handful of values. Split
    apart, zstd-1 compresses a slice ~30% smaller, ~2.8x faster, and decompresses ~4x faster than
    the interleaved int16 bytes (measured on the LIDC series; see the ingest benchmark).
    """
    flat = np.ascontiguousarray(hu, dtype="<i2").reshape(-1).view(np.uint16)
    n = flat.size
    planes = np.empty(2 * n, np.uint8) if out is None else out
    np.bitwise_and(flat, 0xFF, out=planes[:n], casting="unsafe")
    np.right_shift(flat, 8, out=planes[n:], casting="unsafe")
    return planes


def decode_hu(planes: bytes | np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Byte planes (the ``hu_planes`` value of a slices row) -> int16 HU image [rows, cols]."""
    buf = np.frombuffer(planes, np.uint8)
    n = rows * cols
    if buf.size != 2 * n:
        raise ValueError(f"hu_planes has {buf.size} bytes, expected {2 * n} for {rows}x{cols}")
    hu = buf[n:].astype(np.uint16)
    hu <<= 8
    hu |= buf[:n]
    return hu.view("<i2").reshape(rows, cols)


#: one row per CT slice; pixels in ``hu_planes`` (see :func:`encode_hu` / :func:`decode_hu`)
SLICES_SCHEMA = pa.schema(
    [
        pa.field(SITE, pa.string(), nullable=False),
        pa.field(PATIENT_ID, pa.string(), nullable=False),
        pa.field(STUDY_UID, pa.string(), nullable=False),
        pa.field(SERIES_UID, pa.string(), nullable=False),
        pa.field(SOP_UID, pa.string(), nullable=False),
        pa.field(SLICE_INDEX, pa.int32(), nullable=False),
        pa.field(INSTANCE_NUMBER, pa.int32()),
        pa.field(Z_MM, pa.float64(), nullable=False),
        pa.field(IMAGE_POSITION, pa.list_(pa.float64(), 3), nullable=False),
        pa.field(IMAGE_ORIENTATION, pa.list_(pa.float64(), 6), nullable=False),
        pa.field(ROWS, pa.int32(), nullable=False),
        pa.field(COLS, pa.int32(), nullable=False),
        pa.field(PIXEL_SPACING_ROW, pa.float64(), nullable=False),
        pa.field(PIXEL_SPACING_COL, pa.float64(), nullable=False),
        pa.field(SLICE_THICKNESS, pa.float64()),
        pa.field(MANUFACTURER, pa.string()),
        pa.field(MODEL, pa.string()),
        pa.field(KERNEL, pa.string()),
        pa.field(KVP, pa.float64()),
        pa.field(CONTRAST, pa.bool_(), nullable=False),
        pa.field(TRANSFER_SYNTAX, pa.string(), nullable=False),
        pa.field(UIDS_DERIVED, pa.bool_(), nullable=False),
        pa.field(SOURCE_HMAC, pa.string(), nullable=False),
        pa.field(LABEL, pa.string()),
        pa.field(HU, pa.binary(), nullable=False, metadata={"encoding": HU_ENCODING}),
    ]
)

#: every slices column but the pixels: what planning and label joins read
SLICES_META_COLUMNS = [f.name for f in SLICES_SCHEMA if f.name != HU]

# ---------------------------------------------------------------------------- windows
CROP_Y0, CROP_Y1, CROP_X0, CROP_X1 = "crop_y0", "crop_y1", "crop_x0", "crop_x1"
LUNG_FOUND = "lung_found"
WINDOWS = "windows"
#: keys carried from ``slices`` into ``windows`` unchanged
WINDOWS_KEYS = [SITE, PATIENT_ID, STUDY_UID, SERIES_UID, SOP_UID, SLICE_INDEX, Z_MM, SOURCE_HMAC, LABEL]
#: file metadata keys of a windows dataset
META_WINDOWS = "pe_triage.windows"  # JSON list of {name, lo, hi}: stored = round((HU - lo) * 255 / (hi - lo))
META_PREPROCESS = "pe_triage.preprocess_config"  # JSON of PreprocessConfig
META_SOURCE_DIGEST = "pe_triage.source_digest"  # sha256 over the series' source slices and the config


def windows_schema(n_windows: int, size: int) -> pa.Schema:
    """One row per slice: keys, label, the crop box (slice pixels, half-open) and the window stack.

    The stack is a uint8 ``[n_windows, size, size]`` tensor stored as fixed-size binary with its
    shape in the field metadata: Parquet has no fixed-size list, and Arrow's fixed_shape_tensor is
    written as a list of nullable int32 values, ~7x slower to read and 26% larger (measured on 100
    slices of 3x256x256). Use :func:`windows_array` / :func:`windows_stack`.
    """
    fields = [f for f in SLICES_SCHEMA if f.name in WINDOWS_KEYS]
    return pa.schema(
        [
            *fields,
            pa.field(CROP_Y0, pa.int32(), nullable=False),
            pa.field(CROP_Y1, pa.int32(), nullable=False),
            pa.field(CROP_X0, pa.int32(), nullable=False),
            pa.field(CROP_X1, pa.int32(), nullable=False),
            pa.field(LUNG_FOUND, pa.bool_(), nullable=False),
            pa.field(WINDOWS, pa.binary(n_windows * size * size), nullable=False,
                     metadata={"shape": json.dumps([n_windows, size, size]), "dtype": "uint8"}),
        ]
    )


def windows_shape(field: pa.Field) -> tuple[int, int, int]:
    """[n_windows, H, W] of a windows column, from its field metadata."""
    shape = json.loads((field.metadata or {}).get(b"shape", b"null"))
    if not shape or len(shape) != 3:
        raise ValueError(f"column {field.name!r} has no [n_windows, H, W] shape in its metadata")
    return tuple(shape)


def windows_array(stack: np.ndarray) -> pa.Array:
    """uint8 [N, n_windows, H, W] -> a fixed-size binary array over the same memory (no copy)."""
    stack = np.ascontiguousarray(stack, dtype=np.uint8)
    width = int(np.prod(stack.shape[1:]))
    return pa.Array.from_buffers(pa.binary(width), len(stack), [None, pa.py_buffer(stack)])


def windows_stack(column: pa.Array | pa.ChunkedArray, shape: tuple[int, int, int]) -> np.ndarray:
    """A windows column -> uint8 [N, n_windows, H, W] (a view where the column is one chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError("windows column has nulls")
        data = np.frombuffer(chunk.buffers()[1], np.uint8)
        width = int(np.prod(shape))
        parts.append(data[chunk.offset * width : (chunk.offset + len(chunk)) * width].reshape(len(chunk), *shape))
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty((0, *shape), np.uint8)


# ---------------------------------------------------------------------------- stages and predictions
P_DISEASE = "p_disease"  # stage 1's probability
P_PE = "p_pe"  # stage 2's probability (computed for every slice, so the cascade can be formed)


@dataclass(frozen=True)
class Stage:
    """One stage of the cascade: the slice labels it learns from, which of them its single logit
    calls positive, and the column its probability goes to. Dataset targets, training, metrics,
    Grad-CAM samples and the operating point all read this one table, so they cannot disagree."""

    number: int
    #: the stage's key in metrics.json and the registry tags ("stage1")
    name: str
    positive_labels: tuple[str, ...]
    negative_labels: tuple[str, ...]
    column: str
    #: the class words of the logit's two sides ("wnl" / "disease")
    negative_name: str
    positive_name: str

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label whose slices enter the stage (indeterminate never does: it has no target)."""
        return (*self.negative_labels, *self.positive_labels)


STAGES: dict[int, Stage] = {
    1: Stage(1, "stage1", positive_labels=(Label.OTHER.value, Label.PE.value), negative_labels=(Label.WNL.value,),
             column=P_DISEASE, negative_name=Label.WNL.value, positive_name="disease"),
    2: Stage(2, "stage2", positive_labels=(Label.PE.value,), negative_labels=(Label.OTHER.value,),
             column=P_PE, negative_name=Label.OTHER.value, positive_name=Label.PE.value),
}
#: the keys and truth of a slice in a prediction frame
PREDICTION_KEYS = [SITE, PATIENT_ID, SERIES_UID, SLICE_INDEX, LABEL]
#: one row per slice of an evaluated split, each stage's probability beside its keys: what the metrics read
PREDICTION_COLUMNS = [*PREDICTION_KEYS, *(stage.column for stage in STAGES.values())]

# ---------------------------------------------------------------------------- splits
FOLD = "fold"  # "default" for the ratio split; the held-out site for leave-one-site-out folds
PATIENT_CLASS = "patient_class"  # schema.patient_class of its slice labels: pe > other > indeterminate > wnl
SPLIT = "split"
SPLITS = ("train", "val", "test")
DEFAULT_FOLD = "default"
SPLITS_SCHEMA = pa.schema(
    [
        pa.field(FOLD, pa.string(), nullable=False),
        pa.field(SITE, pa.string(), nullable=False),
        pa.field(PATIENT_ID, pa.string(), nullable=False),
        pa.field(PATIENT_CLASS, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
    ]
)

# ---------------------------------------------------------------------------- quarantine
PATH_PSEUDONYM = "path_pseudonym"
SIZE_BYTES = "size_bytes"
REASON = "reason"
DETAIL = "detail"


class Reason(enum.StrEnum):
    """Why a source file was not ingested. Every file seen is ingested, a duplicate, or one of these."""

    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"  # not DICOM, a header that does not parse, a file or folder that cannot be read
    TRUNCATED = "truncated"  # the file ends inside its header or its pixel data
    NOT_CT = "not_ct"
    NOT_AXIAL_IMAGE = "not_axial_image"  # localizer / scout, or not a cross-sectional slice
    NO_PIXELS = "no_pixels"
    MISSING_TAG = "missing_tag"
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"  # colour, multi-frame, odd bit depths
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"  # no decoder installed here
    LOSSY_COMPRESSION = "lossy_compression"  # lossy JPEG / JPEG-LS / JPEG 2000: HU altered
    UNDECODABLE = "undecodable"  # a supported syntax whose pixel data failed to decode
    INCONSISTENT_GEOMETRY = "inconsistent_geometry"  # differs from the rest of its series
    DUPLICATE_POSITION = "duplicate_position"  # another slice of the series at the same z
    CONFLICTING_UID = "conflicting_uid"  # same SOP Instance UID, different content
    BURNED_IN_ANNOTATION = "burned_in_annotation"
    DUPLICATE = "duplicate"  # same content as another file of this scan
    OUTSIDE_SOURCE = "outside_source"  # a symbolic link that leads out of the source folder: never read
    IMPLAUSIBLE_HEADER = "implausible_header"  # declares sizes beyond the configured limits: never decoded


QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field(SITE, pa.string(), nullable=False),
        pa.field(PATH_PSEUDONYM, pa.string(), nullable=False),
        pa.field(SOURCE_HMAC, pa.string()),
        pa.field(SIZE_BYTES, pa.int64(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string(), nullable=False),
    ]
)

# ---------------------------------------------------------------------------- label manifest
# The hospital-supplied CSV, in clear identifiers (joined before pseudonymisation). Two kinds of
# rows: a slice row has ``label`` and ``sop_uid`` (or ``series_uid``/``study_uid`` +
# ``instance_number``); a patient row has ``diagnosis`` and no slice identifiers.
M_PATIENT_ID = "patient_id"
M_STUDY_UID = "study_uid"
M_SERIES_UID = "series_uid"
M_SOP_UID = "sop_uid"
M_INSTANCE_NUMBER = "instance_number"
M_LABEL = "label"
M_DIAGNOSIS = "diagnosis"
MANIFEST_COLUMNS = [M_PATIENT_ID, M_STUDY_UID, M_SERIES_UID, M_SOP_UID, M_INSTANCE_NUMBER, M_LABEL, M_DIAGNOSIS]

# ---------------------------------------------------------------------------- synthetic ground truth
# Written by the generator beside (never inside) the hospital-format data, keyed by the clear
# synthetic ids and by ``source_hmac``, computed with the key the cohort is ingested with (the demo key
# unless the generator is given another), so it joins the ingested slices.
T_LESION = "lesion"  # pe | consolidation | ggo | nodule | effusion | none
T_MASK = "lesion_mask"  # uint8 0/1, rows*cols
T_TISSUE = "tissue_map"  # uint8 Tissue codes, rows*cols (null when not written)


class Tissue(enum.IntEnum):
    """Codes of the generator's per-pixel label map."""

    AIR = 0
    TABLE = 1
    FAT = 2
    MUSCLE = 3
    BONE = 4
    CONTRAST_BLOOD = 5  # contrast-filled heart chambers, aorta, pulmonary arteries
    LUNG = 6
    AIRWAY = 7
    SOFT_TISSUE = 8  # heart wall, mediastinum, liver
    PE = 9
    OTHER_LESION = 10
    LUNG_VESSEL = 11


TRUTH_SCHEMA = pa.schema(
    [
        pa.field(SITE, pa.string(), nullable=False),
        pa.field(M_PATIENT_ID, pa.string(), nullable=False),
        pa.field(M_STUDY_UID, pa.string(), nullable=False),
        pa.field(M_SERIES_UID, pa.string(), nullable=False),
        pa.field(M_SOP_UID, pa.string(), nullable=False),
        pa.field(SOURCE_HMAC, pa.string(), nullable=False),
        pa.field(Z_MM, pa.float64(), nullable=False),
        pa.field(ROWS, pa.int32(), nullable=False),
        pa.field(COLS, pa.int32(), nullable=False),
        pa.field(LABEL, pa.string(), nullable=False),
        pa.field(T_LESION, pa.string(), nullable=False),
        pa.field(T_MASK, pa.binary(), nullable=False),
        pa.field(T_TISSUE, pa.binary()),
    ]
)

"""Pixel decoding and HU conversion.

Native little-endian pixel data is read straight from the file bytes at the offset found by the
header scan (no second parse); every other transfer syntax goes through pydicom's decoders
(pylibjpeg plugins for RLE, JPEG lossless, JPEG-LS and JPEG 2000). Both paths end in the same
:func:`to_hu`, so every lossless encoding of a slice gives identical HU.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom

from pe_triage.dicom.header import Rejected, SliceHeader
from pe_triage.dicom.raw import IMPLICIT_LE, UNDEFINED, element_at
from pe_triage.schema import Reason


def stored_values(data: bytes | memoryview, header: SliceHeader) -> np.ndarray:
    """The stored pixel values (before the modality LUT) as a 2-D array; for native pixel data a view of
    ``data``, which must outlive it."""
    if header.pixel_offset >= 0 and header.bits_allocated == 16:
        return _native(data, header)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        raise Rejected(Reason.UNDECODABLE, f"{pydicom.uid.UID(header.transfer_syntax).name}: {type(exc).__name__}") from None
    if arr.shape != (header.rows, header.cols):
        raise Rejected(Reason.UNDECODABLE, f"decoded shape {arr.shape} != {header.rows}x{header.cols}")
    return arr


def _native(data: bytes | memoryview, header: SliceHeader) -> np.ndarray:
    """The pixel values where the header scan found them: the element header is read with ``struct``, the
    values are not copied."""
    elem = element_at(data, header.pixel_offset, header.transfer_syntax == IMPLICIT_LE)
    if elem is None:
        raise Rejected(Reason.TRUNCATED, "pixel data element unreadable")
    _, _, start, length = elem
    if length == UNDEFINED:
        raise Rejected(Reason.UNDECODABLE, "native pixel data of undefined length")
    expected = header.rows * header.cols * 2
    available = min(length, len(data) - start)
    if available < expected:
        raise Rejected(Reason.TRUNCATED, f"pixel data has {max(available, 0)} of {expected} bytes")
    arr = np.frombuffer(data, dtype="<i2" if header.signed else "<u2", count=header.rows * header.cols, offset=start)
    arr = arr.reshape(header.rows, header.cols)
    if header.bits_stored < 16:  # the bits above BitsStored are not part of the value
        shift = 16 - header.bits_stored
        arr = (arr << shift) >> shift if header.signed else arr & np.uint16((1 << header.bits_stored) - 1)
    return arr


def to_hu(stored: np.ndarray, header: SliceHeader, *, padding_hu: int, min_hu: int) -> np.ndarray:
    """Modality LUT (slope/intercept) to int16 HU; padding becomes air, nothing below ``min_hu``.

    Pixel padding marks pixels outside the reconstructed field of view; left as is it would be
    -2000 or -3024 "HU", which no tissue has and which distorts every window and crop. Scalars are
    given in the array's own type: numpy's clip with Python ints takes a slow path (~10x).
    """
    i16 = np.iinfo(np.int16)
    if header.slope == 1.0 and float(header.intercept).is_integer():
        intercept = int(header.intercept)
        # stay in int16 when the actual values allow it: half the memory traffic of int32
        fits = i16.min <= int(stored.min()) + intercept and int(stored.max()) + intercept <= i16.max
        hu = np.add(stored, intercept, dtype=np.int16 if fits else np.int32)
    else:
        hu = np.rint(stored.astype(np.float32) * header.slope + header.intercept).astype(np.int32)
    kind = hu.dtype.type
    if header.padding is not None:
        lo, hi = header.padding
        np.copyto(hu, kind(padding_hu), where=stored == lo if lo == hi else (stored >= lo) & (stored <= hi))
    np.clip(hu, kind(min_hu), kind(i16.max), out=hu)
    return hu.astype("<i2", copy=False)


def decode_hu(data: bytes | memoryview, header: SliceHeader, *, padding_hu: int, min_hu: int) -> np.ndarray:
    """HU of one slice, in a new array (``data`` may be reused once it returns)."""
    return to_hu(stored_values(data, header), header, padding_hu=padding_hu, min_hu=min_hu)

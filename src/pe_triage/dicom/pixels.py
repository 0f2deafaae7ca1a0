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
from pydicom.filereader import data_element_generator

from pe_triage.dicom.header import Rejected, SliceHeader
from pe_triage.schema import Reason


def stored_values(data: bytes, header: SliceHeader) -> np.ndarray:
    """The stored pixel values (before the modality LUT) as a 2-D array."""
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


def _native(data: bytes, header: SliceHeader) -> np.ndarray:
    implicit = header.transfer_syntax == "1.2.840.10008.1.2"
    buf = io.BytesIO(data)
    buf.seek(header.pixel_offset)
    try:
        elem = next(data_element_generator(buf, implicit, True, defer_size=None))
    except (StopIteration, EOFError, ValueError) as exc:
        raise Rejected(Reason.TRUNCATED, f"pixel data element unreadable ({type(exc).__name__})") from None
    expected = header.rows * header.cols * 2
    if elem.value is None or len(elem.value) < expected:
        got = 0 if elem.value is None else len(elem.value)
        raise Rejected(Reason.TRUNCATED, f"pixel data has {got} of {expected} bytes")
    arr = np.frombuffer(elem.value, dtype="<i2" if header.signed else "<u2", count=header.rows * header.cols)
    arr = arr.reshape(header.rows, header.cols)
    if header.bits_stored < 16:  # the bits above BitsStored are not part of the value
        shift = 16 - header.bits_stored
        arr = (arr << shift) >> shift if header.signed else arr & ((1 << header.bits_stored) - 1)
    return arr


def to_hu(stored: np.ndarray, header: SliceHeader, *, padding_hu: int, min_hu: int) -> np.ndarray:
    """Modality LUT (slope/intercept) to int16 HU; padding becomes air, nothing below ``min_hu``.

    Pixel padding marks pixels outside the reconstructed field of view; left as is it would be
    -2000 or -3024 "HU", which no tissue has and which distorts every window and crop.
    """
    if header.slope == 1.0 and float(header.intercept).is_integer():
        hu = stored.astype(np.int32) + int(header.intercept)
    else:
        hu = np.rint(stored.astype(np.float32) * header.slope + header.intercept).astype(np.int32)
    if header.padding is not None:
        lo, hi = header.padding
        hu[(stored >= lo) & (stored <= hi)] = padding_hu
    np.clip(hu, min_hu, np.iinfo(np.int16).max, out=hu)
    return hu.astype("<i2")


def decode_hu(data: bytes, header: SliceHeader, *, padding_hu: int, min_hu: int) -> np.ndarray:
    return to_hu(stored_values(data, header), header, padding_hu=padding_hu, min_hu=min_hu)

"""The wanted top-level elements of a DICOM header, read straight from its bytes.

pydicom builds a Dataset of every element and converts values on access: about 1 ms a slice, as
long as decoding its pixels. Ingest needs a few dozen values, so this walks the element headers
with ``struct`` and keeps the value bytes of the wanted tags. It reads only what it fully
understands: the preamble, an explicit-VR meta group, then a little-endian dataset (implicit or
explicit VR) whose sequences nest exactly, up to a PixelData element. Anything else (big endian,
deflate, a command group, an unknown VR, a value running past the data, an item that does not fill
its length, another pixel element) gives None, and the caller reads the file with pydicom, which
then decides and explains.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA})  # where pydicom stops before pixels
_TRANSFER_SYNTAX = 0x00020010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
#: VRs whose explicit encoding has 2 reserved bytes and a 4-byte length; the others have a 2-byte length
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_U32 = struct.Struct("<L")
#: deeper nesting than any scanner writes; a crafted file could otherwise recurse without end
_MAX_DEPTH = 8
_NUMBER_SIZES = {"UL": 4, "US": 2, "SL": 4, "SS": 2, "FL": 4, "FD": 8}
_CHARSET = 0x00080005

Elements = dict[int, tuple[bytes | None, bytes]]  # tag -> (explicit VR or None, value bytes)


@dataclass(frozen=True, slots=True)
class RawHeader:
    """What the walk found: the values still in their bytes, converted only on request (:func:`values`)."""

    transfer_syntax: str  # as written, trailing NUL and spaces removed
    implicit: bool
    meta: Elements
    elements: Elements  # the wanted tags of the dataset's top level; a repeated tag keeps its last value
    pixel_offset: int  # where the PixelData element starts


def read_raw(data: bytes | memoryview, wanted: frozenset[int]) -> RawHeader | None:
    """The header of ``data`` (a whole file or its first bytes), or None when it is not plain."""
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        return None
    meta: Elements = {}
    pos = _walk_meta(data, 132, meta)
    syntax = meta.get(_TRANSFER_SYNTAX)
    if pos is None or syntax is None or syntax[0] != b"UI":
        return None
    ts = bytes(syntax[1]).rstrip(b"\0 ").decode("ascii", "replace")
    implicit = ts == IMPLICIT_LE
    if not (implicit or ts == EXPLICIT_LE or _encapsulated(ts)) or not _encoding_agrees(data, pos, implicit):
        return None
    elements: Elements = {}
    pixel_offset = _walk(data, pos, len(data), implicit, 0, wanted, elements)
    if pixel_offset is None:
        return None
    return RawHeader(ts, implicit, meta, elements, pixel_offset)


def _encapsulated(ts: str) -> bool:
    """A compressed syntax: its dataset is explicit VR little endian (PS3.5 A.4)."""
    uid = UID(ts)
    return uid.is_transfer_syntax and uid.is_compressed and uid.is_little_endian and not uid.is_deflated


def _encoding_agrees(data: bytes | memoryview, pos: int, implicit: bool) -> bool:
    """pydicom checks the first element against the syntax and reads the other encoding if they disagree:
    such a file is not plain. A command group (0000,xxxx) is not either."""
    if pos + 8 > len(data) or _U32.unpack_from(data, pos)[0] & 0xFFFF == 0:
        return False
    vr = bytes(data[pos + 4 : pos + 6])
    looks_explicit = 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B
    return looks_explicit != implicit


def element_at(data: bytes | memoryview, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int] | None:
    """(tag, VR, value start, value length) of the element at ``pos``; None when cut or of an unknown VR."""
    if pos + 8 > len(data):
        return None
    if implicit:
        group, elem, length = _IMPLICIT.unpack_from(data, pos)
        return group << 16 | elem, None, pos + 8, length
    group, elem, vr, length = _EXPLICIT.unpack_from(data, pos)
    tag = group << 16 | elem
    if tag >> 16 == 0xFFFE:  # item and delimiter tags carry a 4-byte length, never a VR
        return tag, None, pos + 8, _IMPLICIT.unpack_from(data, pos)[2]
    if vr in _SHORT_VRS:
        return tag, vr, pos + 8, length
    if vr in _LONG_VRS and pos + 12 <= len(data):
        return tag, vr, pos + 12, _U32.unpack_from(data, pos + 8)[0]
    return None


def _walk_meta(data: bytes | memoryview, pos: int, meta: Elements) -> int | None:
    """The file meta group (always explicit VR): where the dataset starts. pydicom converts some of its
    values while reading, so each must have its dictionary VR and a length that VR allows."""
    while pos + 8 <= len(data) and _U32.unpack_from(data, pos)[0] & 0xFFFF == 0x0002:
        found = element_at(data, pos, implicit=False)
        if found is None or found[1] is None or found[3] == UNDEFINED or found[2] + found[3] > len(data):
            return None
        tag, vr, start, length = found
        try:
            expected = dictionary_VR(tag)
        except KeyError:
            return None
        if vr != expected.encode() or length % _NUMBER_SIZES.get(expected, 1):
            return None
        meta[tag] = (vr, bytes(data[start : start + length]))
        pos = start + length
    return pos


def _walk(data: bytes | memoryview, pos: int, end: int, implicit: bool, depth: int, wanted: frozenset[int],
          found: Elements) -> int | None:
    """Elements from ``pos``. At the top level (depth 0) up to PixelData, returning its offset; in an
    item up to ``end`` exactly (a defined length) or through its delimiter (``end`` < 0)."""
    while True:
        if end >= 0 and pos == end and depth:
            return pos
        elem = element_at(data, pos, implicit)
        if elem is None:
            return None
        tag, vr, start, length = elem
        if depth == 0 and tag in _PIXEL_TAGS:
            return pos if tag == PIXEL_DATA else None
        if tag == _ITEM_END and depth and end < 0:
            return start
        if tag >> 16 == 0xFFFE or (depth and tag == _CHARSET):  # pydicom converts an item's character set
            return None
        if length == UNDEFINED:
            if not _is_sequence(tag, vr):
                return None
            after = _sequence(data, start, implicit, depth + 1)
            if after is None:
                return None
            pos = after
            continue
        pos = start + length
        if pos > len(data) or (end >= 0 and pos > end):
            return None
        if depth == 0 and tag in wanted:
            found[tag] = (vr, bytes(data[start:pos]))


def _is_sequence(tag: int, vr: bytes | None) -> bool:
    """Whether pydicom reads an element of undefined length as a sequence (else it scans for a delimiter)."""
    if vr is not None:
        return vr in (b"SQ", b"UN")
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:  # a private tag: pydicom looks ahead for an item; this reader does not guess
        return False


def _sequence(data: bytes | memoryview, pos: int, implicit: bool, depth: int) -> int | None:
    """The items of a sequence of undefined length: where its delimiter ends."""
    if depth > _MAX_DEPTH:
        return None
    while pos + 8 <= len(data):
        group, elem, length = _IMPLICIT.unpack_from(data, pos)
        tag = group << 16 | elem
        if tag == _SEQUENCE_END:
            return pos + 8
        if tag != _ITEM:
            return None
        start = pos + 8
        if length != UNDEFINED and start + length > len(data):
            return None
        if not _item_encoding_agrees(data, start, length, implicit):
            return None
        after = _walk(data, start, -1 if length == UNDEFINED else start + length, implicit, depth, frozenset(), {})
        if after is None:
            return None
        pos = after
    return None


def _item_encoding_agrees(data: bytes | memoryview, start: int, length: int, implicit: bool) -> bool:
    """pydicom reads an item of an explicit-VR dataset as implicit when its first VR is not two capitals."""
    if implicit or length == 0 or start + 8 > len(data) or _IMPLICIT.unpack_from(data, start)[0] == 0xFFFE:
        return True
    vr = bytes(data[start + 4 : start + 6])
    return 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B


# -- values, as pydicom converts them -----------------------------------------------------------

#: a DS or IS value as the standard writes it (PS3.5 6.2); anything else is left to pydicom
_DS = re.compile(r" *[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})? *")
_IS = re.compile(r" *[+-]?\d{1,12} *")
_EMPTY_TEXT = ("CS", "LO", "SH", "UI")  # pydicom gives "" for these when empty, None for numbers


class NotPlain(Exception):
    """A value not in its plain form: the caller reads the file with pydicom instead."""


class Values:
    """What pydicom's ``Dataset.get`` and attribute access give for the elements read. Asking for an
    element that was not read is a programming error (add it to the reader's keywords), not an
    absent element."""

    __slots__ = ("_values", "_keywords", "file_meta")

    def __init__(self, values: dict[str, Any], keywords: Collection[str], file_meta: Values | None = None) -> None:
        self._values, self._keywords, self.file_meta = values, keywords, file_meta

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._keywords:
            raise RuntimeError(f"the raw header reader does not read {key}: add it to its keywords")
        return self._values.get(key, default)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key not in self._keywords:
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None


def values(raw: RawHeader, keywords: Mapping[str, int | None], meta_keywords: Mapping[str, int | None]) -> Values | None:
    """The elements named in ``keywords`` (keyword -> value multiplicity, None for any) as pydicom would
    convert them, or None when one of them is not written in its plain form."""
    try:
        meta = Values(_convert(raw.meta, meta_keywords, implicit=False, signed=False), meta_keywords)
        rep = _convert(raw.elements, {"PixelRepresentation": 1}, implicit=raw.implicit, signed=False)
        signed = rep.get("PixelRepresentation") not in (None, 0)
        return Values(_convert(raw.elements, keywords, implicit=raw.implicit, signed=signed), keywords, meta)
    except NotPlain:
        return None


def tags_of(keywords: Collection[str]) -> frozenset[int]:
    """The tags of ``keywords``, to pass to :func:`read_raw`."""
    return frozenset(_entry(k)[0] for k in keywords)


@cache
def _entry(keyword: str) -> tuple[int, str]:
    """The tag and dictionary VR of ``keyword`` (looked up once: pydicom's lookups cost more than a value)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword} is not a DICOM keyword")
    return tag, dictionary_VR(tag)


def _convert(elements: Elements, keywords: Mapping[str, int | None], *, implicit: bool, signed: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keyword, vm in keywords.items():
        tag, vr = _entry(keyword)
        if tag not in elements:
            continue
        written, value = elements[tag]
        if vr == "US or SS":  # pydicom settles it by PixelRepresentation when the file does not say
            vr = "SS" if signed else "US"
            if written is not None and written in (b"US", b"SS"):
                vr = written.decode()
        if not implicit and written != vr.encode():
            raise NotPlain
        out[keyword] = _value(vr, value, vm)
    return out


def _value(vr: str, raw: bytes, vm: int | None) -> Any:
    """One element's value as pydicom converts it, for the VRs the header checks read."""
    if not raw:
        return "" if vr in _EMPTY_TEXT else None
    if vr in ("US", "SS"):
        if len(raw) != 2:
            raise NotPlain
        return int.from_bytes(raw, "little", signed=vr == "SS")
    if not raw.isascii():
        raise NotPlain
    text = raw.decode("ascii")
    if vr == "DS":
        items = text.strip().rstrip(" \0").split("\\")
    elif vr in ("IS", "CS", "UI"):
        items = text.rstrip(" \0").split("\\")
    elif vr in ("LO", "SH"):
        items = [v.rstrip("\0 ") for v in text.split("\\")]
    else:
        raise NotPlain
    if (vm is not None and len(items) != vm) or not all(v.isprintable() for v in items):
        raise NotPlain
    parsed: list[Any] = items
    if vr == "DS":
        if not all(_DS.fullmatch(v) for v in items):
            raise NotPlain
        parsed = [float(v) for v in items]
        if not all(math.isfinite(v) for v in parsed):
            raise NotPlain
    elif vr == "IS":
        if not all(_IS.fullmatch(v) for v in items):
            raise NotPlain
        parsed = [int(v) for v in items]
    return parsed[0] if len(parsed) == 1 else parsed

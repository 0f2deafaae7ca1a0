"""DICOM reading: header scan and validation, pixel decoding to HU, de-identification."""

from pe_triage.dicom.deid import DEMO_KEY, KEY_ENV, MissingKeyError, Pseudonymizer, load_key
from pe_triage.dicom.header import (
    HEADER_PREFIX_BYTES,
    IncompleteHeader,
    Rejected,
    SliceHeader,
    parse_header,
)
from pe_triage.dicom.pixels import decode_hu, stored_values, to_hu

__all__ = [
    "DEMO_KEY",
    "HEADER_PREFIX_BYTES",
    "KEY_ENV",
    "IncompleteHeader",
    "MissingKeyError",
    "Pseudonymizer",
    "Rejected",
    "SliceHeader",
    "decode_hu",
    "load_key",
    "parse_header",
    "stored_values",
    "to_hu",
]

"""Header scan, HU conversion and pseudonyms on real and crafted DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from factories import ct_slice, pseudo

from pe_triage.dicom import (
    DEMO_KEY,
    HEADER_PREFIX_BYTES,
    KEY_ENV,
    IncompleteHeader,
    MissingKeyError,
    Pseudonymizer,
    Rejected,
    SliceHeader,
    decode_hu,
    load_key,
    parse_header,
)
from pe_triage.schema import Reason


def header_of(data: bytes, site: str = "test-site") -> SliceHeader:
    try:
        return parse_header(data[:HEADER_PREFIX_BYTES], pseudo(site), complete=len(data) <= HEADER_PREFIX_BYTES)
    except IncompleteHeader:
        return parse_header(data, pseudo(site), complete=True)


def hu_of(path: Path) -> np.ndarray:
    data = path.read_bytes()
    return decode_hu(data, header_of(data), padding_hu=-1000, min_hu=-1024)


LOSSLESS = [
    "CTImage.dcm",
    "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm",
    "CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm",
    "CTImage.dcm_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm",
    "CTImage.dcm_DeflatedExplicitVRLittleEndianTransferSyntax_1.2.840.10008.1.2.1.99.dcm",
    "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm",
    "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm",
    "CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm",
    "CTImage.dcm_JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57.dcm",
    "CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm",
]
LOSSY = [
    "CTImage.dcm_JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50.dcm",
    "CTImage.dcm_JPEGProcess2_4TransferSyntax_1.2.840.10008.1.2.4.51.dcm",
    "CTImage.dcm_JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53.dcm",
    "CTImage.dcm_JPEGProcess10_12TransferSyntax_1.2.840.10008.1.2.4.55.dcm",
    "CTImage.dcm_JPEGLSLossyTransferSyntax_1.2.840.10008.1.2.4.81.dcm",
    "CTImage.dcm_JPEG2000TransferSyntax_1.2.840.10008.1.2.4.91.dcm",
]


def test_every_lossless_transfer_syntax_gives_identical_hu(real_ct: Path) -> None:
    folder = real_ct / "transfer-syntaxes"
    reference = hu_of(folder / LOSSLESS[0])
    assert reference.shape == (512, 512) and reference.dtype == np.dtype("<i2")
    assert reference.min() >= -1024 and reference.max() > 1000  # bone present
    for name in LOSSLESS[1:]:
        np.testing.assert_array_equal(hu_of(folder / name), reference, err_msg=name)


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_encodings_are_rejected(real_ct: Path, name: str) -> None:
    with pytest.raises(Rejected) as exc:
        header_of((real_ct / "transfer-syntaxes" / name).read_bytes())
    assert exc.value.reason == Reason.LOSSY_COMPRESSION


def test_fast_native_path_matches_pydicom(real_ct: Path) -> None:
    import pydicom

    path = real_ct / "lidc-idri-0002" / "000100.dcm"
    header = header_of(path.read_bytes())
    assert header.pixel_offset > 0  # the native path was taken
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected[ds.pixel_array == ds.PixelPaddingValue] = -1000
    np.testing.assert_array_equal(hu_of(path), np.clip(expected, -1024, None).astype(np.int16))


def test_padding_becomes_air_not_minus_2000(real_ct: Path) -> None:
    hu = hu_of(real_ct / "lidc-idri-0002" / "000100.dcm")
    assert hu.min() >= -1024
    corner = hu[:20, :20]  # outside the circular field of view
    assert np.all(corner == -1000)


def test_empty_uids_get_stable_derived_ids(real_ct: Path) -> None:
    files = sorted((real_ct / "totalsegmentator-example").iterdir())
    headers = [header_of(p.read_bytes()) for p in files]
    assert all(h.uids_derived for h in headers)
    assert len({h.series_uid for h in headers}) == 1  # one series
    assert len({h.sop_uid for h in headers}) == len(files)  # distinct slices
    again = header_of(files[0].read_bytes())
    assert again == headers[0]  # stable


def test_bits_stored_12_unsigned_is_masked() -> None:
    hu = np.full((8, 8), 0, np.int16)
    ds = ct_slice(size=8, hu=hu, PixelRepresentation=0, BitsStored=12, HighBit=11)
    raw = np.full((8, 8), 1024 | 0xF000, "<u2")  # garbage in the 4 unused high bits
    ds.PixelData = raw.tobytes()
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    out = decode_hu(data, header_of(data), padding_hu=-1000, min_hu=-1024)
    assert np.all(out == 0)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modality": "MR"}, Reason.NOT_CT),
        ({"pixels": False}, Reason.NO_PIXELS),
        ({"BurnedInAnnotation": "YES"}, Reason.BURNED_IN_ANNOTATION),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, Reason.NOT_AXIAL_IMAGE),
        ({"orientation": (0, 1, 0, 0, 0, -1)}, Reason.NOT_AXIAL_IMAGE),
        ({"SamplesPerPixel": 3}, Reason.UNSUPPORTED_PIXEL_FORMAT),
    ],
)
def test_bad_headers_are_rejected_with_a_reason(change: dict, reason: Reason) -> None:
    import io

    buf = io.BytesIO()
    ct_slice(**change).save_as(buf, enforce_file_format=True)
    with pytest.raises(Rejected) as exc:
        header_of(buf.getvalue())
    assert exc.value.reason == reason


def test_missing_rescale_is_a_missing_tag() -> None:
    import io

    ds = ct_slice()
    del ds.RescaleIntercept
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(Rejected) as exc:
        header_of(buf.getvalue())
    assert exc.value.reason == Reason.MISSING_TAG and "RescaleIntercept" in exc.value.detail


def test_non_dicom_and_empty_bytes() -> None:
    for data, reason in [(b"", Reason.EMPTY_FILE), (b"hello, not dicom" * 10, Reason.UNREADABLE)]:
        with pytest.raises(Rejected) as exc:
            header_of(data)
        assert exc.value.reason == reason


def test_pseudonyms_are_stable_keyed_and_site_specific() -> None:
    a = Pseudonymizer(DEMO_KEY, "site-a")
    assert a("patient", "MRN-1") == a("patient", "MRN-1")
    assert a("patient", "MRN-1") != Pseudonymizer(DEMO_KEY, "site-b")("patient", "MRN-1")
    assert a("patient", "MRN-1") != Pseudonymizer(b"another secret of enough length", "site-a")("patient", "MRN-1")
    assert "MRN-1" not in a("patient", "MRN-1")
    assert DEMO_KEY.decode() not in repr(a)


def test_key_is_required_outside_demo_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(MissingKeyError, match=KEY_ENV):
        load_key()
    assert load_key(demo=True) == DEMO_KEY
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(MissingKeyError):
        load_key()
    monkeypatch.setenv(KEY_ENV, "a deployment secret of 32 bytes!")
    assert load_key() == b"a deployment secret of 32 bytes!"


def _bytes(ds: object) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"Rows": 40000}, "Rows 40000 > 4096"),
        ({"Columns": 65535}, "Columns 65535 > 4096"),
        ({"NumberOfFrames": 100000}, "NumberOfFrames 100000 > 4096"),
        ({"BitsAllocated": 64}, "BitsAllocated 64 > 32"),
        ({"Rows": 0}, "Rows 0 < 1"),
    ],
)
def test_implausible_headers_are_rejected_before_any_decode(change: dict, detail: str) -> None:
    with pytest.raises(Rejected) as exc:
        header_of(_bytes(ct_slice(**change)))
    assert exc.value.reason == Reason.IMPLAUSIBLE_HEADER and exc.value.detail.startswith(detail)


def test_header_limits_are_configurable() -> None:
    from pe_triage.config import IngestConfig

    data = _bytes(ct_slice(size=64))
    assert parse_header(data, pseudo(), complete=True).rows == 64
    with pytest.raises(Rejected) as exc:
        parse_header(data, pseudo(), complete=True, config=IngestConfig(max_cols=32))
    assert exc.value.reason == Reason.IMPLAUSIBLE_HEADER


@pytest.mark.parametrize("cut", [150, 200, 300, 400, 600])
def test_a_cut_header_is_truncated(cut: int) -> None:
    with pytest.raises(Rejected) as exc:
        header_of(_bytes(ct_slice())[:cut])
    assert exc.value.reason == Reason.TRUNCATED


def test_a_complete_file_without_pixels_is_not_called_truncated() -> None:
    for change, reason in (({"pixels": False}, Reason.NO_PIXELS), ({"pixels": False, "modality": "MR"}, Reason.NOT_CT)):
        with pytest.raises(Rejected) as exc:
            header_of(_bytes(ct_slice(**change)))
        assert exc.value.reason == reason


def test_source_digest_is_keyed() -> None:
    import hashlib

    data = _bytes(ct_slice())
    a = Pseudonymizer(DEMO_KEY, "site-a")
    assert a.source_digest(data) == a.source_digest(bytes(data)) == Pseudonymizer(DEMO_KEY, "site-b").source_digest(data)
    assert a.source_digest(data) != Pseudonymizer(b"another secret of enough length", "site-a").source_digest(data)
    assert a.source_digest(data) != hashlib.sha256(data).hexdigest() and len(a.source_digest(data)) == 64
    assert a.source_digest(data) != a.source_digest(data[:-1])

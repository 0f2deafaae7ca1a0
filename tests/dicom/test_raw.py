"""The raw header reader: whatever it accepts, it reads exactly as pydicom does; the rest goes to pydicom."""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import pydicom
import pytest
from factories import ct_slice, pseudo
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pe_triage.dicom import IncompleteHeader, Rejected, parse_header
from pe_triage.dicom import header as header_mod
from pe_triage.schema import Reason


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return buf.getvalue()


def outcome(data: bytes, *, raw: bool, complete: bool = True) -> object:
    """The header, or why there is none: with the raw reader allowed, or with pydicom only."""
    original = header_mod._read_plain
    if not raw:
        header_mod._read_plain = lambda data: None  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the broken files below
            return parse_header(data, pseudo(), complete=complete)
    except Rejected as r:
        return ("rejected", r.reason, r.detail)
    except IncompleteHeader:
        return "incomplete"
    finally:
        header_mod._read_plain = original


def assert_same(data: bytes, *, complete: bool = True) -> None:
    assert outcome(data, raw=True, complete=complete) == outcome(data, raw=False, complete=complete)


def with_sequences(*, undefined: bool) -> Dataset:
    """A slice carrying nested sequences (defined or undefined lengths), a private block and an icon."""
    ds = ct_slice(Manufacturer="ACME", ConvolutionKernel="B30f", KVP="120", SliceThickness="1.25")
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator = "113691", "DCM"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.9"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    icon = Dataset()
    icon.Rows = icon.Columns = 2
    icon.BitsAllocated = 16
    icon.add_new(0x7FE00010, "OW", b"\0" * 8)  # PixelData inside an item: not the slice's
    ds.IconImageSequence = Sequence([icon])
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "private value")
    for elem in (ds["ReferencedImageSequence"], ds["IconImageSequence"], item["PurposeOfReferenceCodeSequence"]):
        elem.is_undefined_length = undefined
    return ds


VARIANTS = {
    "plain": ct_slice(),
    "padding signed": ct_slice(PixelPaddingValue=-2000),
    "text values": ct_slice(Manufacturer=" GE MEDICAL ", ManufacturerModelName="LightSpeed", KVP="120.0",
                            ContrastBolusAgent="Omnipaque", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]),
    "exponents and signs": ct_slice(ImagePositionPatient=["-1.5e2", "+100", ".5"], RescaleIntercept="-1.024E3",
                                    InstanceNumber="+7"),
    "multi-valued text": ct_slice(ConvolutionKernel=["B30f", "3"], Modality="CT"),
    "latin-1 charset": ct_slice(SpecificCharacterSet="ISO_IR 100", Manufacturer="Hôpital"),
    "japanese charset": ct_slice(SpecificCharacterSet="ISO_IR 13"),
    "empty uids": ct_slice(StudyInstanceUID="", SeriesInstanceUID=""),
    "empty optional": ct_slice(SliceThickness=None, InstanceNumber=None, Manufacturer=""),
    "localizer": ct_slice(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
    "lossy flag": ct_slice(LossyImageCompression="01"),
    "burned in": ct_slice(BurnedInAnnotation="YES"),
    "not ct": ct_slice(modality="MR"),
    "sagittal": ct_slice(orientation=(0, 1, 0, 0, 0, -1)),
    "no pixels": ct_slice(pixels=False),
    "too large": ct_slice(Rows=40000),
    "two paddings": ct_slice(PixelPaddingValue=[1, 2]),
    "sequences defined": with_sequences(undefined=False),
    "sequences undefined": with_sequences(undefined=True),
}


#: what the raw reader leaves to pydicom: values not in plain form, other character sets, derived ids
NOT_PLAIN = {"multi-valued text", "latin-1 charset", "japanese charset", "empty uids", "no pixels", "two paddings"}


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_crafted_headers_read_as_pydicom_reads_them(name: str, implicit: bool) -> None:
    data = encode(VARIANTS[name], implicit=implicit)
    assert (header_mod._read_plain(data) is not None) == (name not in NOT_PLAIN)
    assert_same(data)


def test_every_real_sample_reads_as_pydicom_reads_it(real_ct: Path) -> None:
    files = sorted(p for p in real_ct.rglob("*") if p.is_file() and p.suffix != ".md")
    assert len(files) > 250
    for path in files:
        data = path.read_bytes()
        assert outcome(data, raw=True) == outcome(data, raw=False), path.name


def test_plain_files_do_not_go_through_pydicom(real_ct: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the raw reader: a plain slice (uncompressed or compressed) is checked without pydicom."""
    samples = [real_ct / "lidc-idri-0002" / "000100.dcm",
               real_ct / "transfer-syntaxes" / "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm"]
    expected = [outcome(p.read_bytes(), raw=True) for p in samples]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pydicom read a plain file")

    monkeypatch.setattr(header_mod.pydicom, "dcmread", refuse)
    for path, header in zip(samples, expected, strict=True):
        assert outcome(path.read_bytes(), raw=True) == header and not isinstance(header, tuple)
    assert not isinstance(outcome(encode(ct_slice(), implicit=True), raw=True), tuple)


@pytest.mark.parametrize("name", ["plain", "sequences undefined", "padding signed"])
def test_damaged_headers_read_as_pydicom_reads_them(name: str) -> None:
    """Random byte changes and cuts in the header: the raw reader never accepts what pydicom reads otherwise."""
    data = encode(VARIANTS[name])
    end = data.index(b"\xe0\x7f\x10\x00") + 12  # the header and the pixel element's own header
    rng = random.Random(17)
    for _ in range(150):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(128, end)] = rng.randrange(256)
        assert_same(bytes(damaged))
        cut = rng.randrange(132, end)
        assert_same(bytes(damaged[:cut]), complete=False)
        assert_same(bytes(damaged[:cut]))


def test_a_value_repeated_where_one_is_expected_is_quarantined_not_a_crash() -> None:
    """Two values in PixelPaddingValue, PixelRepresentation or SamplesPerPixel used to raise TypeError out
    of the header scan, which ended the whole ingest."""
    for change in ({"PixelPaddingValue": [1, 2]}, {"PixelRepresentation": [1, 1]}, {"SamplesPerPixel": [1, 1]},
                   {"BitsStored": [16, 16]}):
        for raw in (True, False):
            found = outcome(encode(ct_slice(**change)), raw=raw)
            assert isinstance(found, tuple) and found[1] == Reason.MISSING_TAG, (change, found)
            assert found[2].startswith("malformed")


def test_the_raw_reader_finds_the_pixel_data_where_pydicom_does() -> None:
    for implicit in (False, True):
        data = encode(with_sequences(undefined=True), implicit=implicit)  # an icon has PixelData of its own
        buf = io.BytesIO(data)
        pydicom.dcmread(buf, stop_before_pixels=True)
        assert parse_header(data, pseudo(), complete=True).pixel_offset == buf.tell()

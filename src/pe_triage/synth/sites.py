"""Per-site scanner and export conventions, fixed by the site's index.

Each site differs where real hospitals differ, so that ingest onboarding meets every variant:
pixel representation and rescale, padding, transfer syntax, slice geometry, InstanceNumber order,
file naming, and which key the label manifest uses for slices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from pe_triage.config import SiteShift


@dataclass(frozen=True)
class SiteConventions:
    index: int
    name: str  # site-a, site-b, ...
    letter: str  # A, B, ... (used in MRNs)
    manufacturer: str
    model: str
    kernel: str
    kvp: float
    contrast_agent: str
    signed: bool  # PixelRepresentation 1
    bits_stored: int
    intercept: float
    #: PixelPaddingValue written in the header, or None (then ``outside_stored`` is plain air)
    padding: int | None
    #: stored value outside the reconstruction circle
    outside_stored: int
    max_hu: int  # largest HU the stored range holds
    transfer_syntax: UID
    thickness: float  # SliceThickness, mm
    spacing: float  # SpacingBetweenSlices = z step of ImagePositionPatient, mm
    noise_sigma: float  # HU, for an average-sized patient
    instances_descending: bool  # InstanceNumber 1 = most superior slice
    layout: int  # file naming style, see cohort._relative_path
    manifest_by_instance: bool  # slice rows keyed by InstanceNumber instead of SOP Instance UID
    series_number: int
    window_center: tuple[float, ...]
    window_width: tuple[float, ...]
    #: added to every HU inside the reconstruction circle (``SiteShift``): 0 for a calibrated scanner
    hu_offset: float = 0.0

    @property
    def dtype(self) -> str:
        return "<i2" if self.signed else "<u2"


_VENDORS = (
    ("GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD", 120.0, "Omnipaque 350"),
    ("SIEMENS", "SOMATOM Definition Edge", "Br40d", 100.0, "Ultravist 370"),
    ("Philips", "iCT 256", "B", 120.0, "Iomeron 400"),
    ("CANON_MEC", "Aquilion ONE", "FC08", 100.0, "Visipaque 320"),
)
#: (SliceThickness, SpacingBetweenSlices): contiguous, thin slices exported every 5 mm, overlapping
_GEOMETRY = ((5.0, 5.0), (2.5, 5.0), (5.0, 4.0), (1.25, 4.0))
_NOISE = (14.0, 22.0, 10.0, 18.0)


def site_name(index: int) -> str:
    """site-a ... site-z, then site-aa, site-ab, ..."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return f"site-{letters}"


def site_conventions(index: int) -> SiteConventions:
    """Pixel/transfer-syntax conventions cycle with period 3 (a, b, c), the rest with period 4."""
    name = site_name(index)
    vendor = _VENDORS[index % len(_VENDORS)]
    thickness, spacing = _GEOMETRY[index % len(_GEOMETRY)]
    kind = index % 3
    if kind == 0:  # GE style: signed, stored = HU + 1024, padding -2000 outside the circle
        pixel = {"signed": True, "bits_stored": 16, "intercept": -1024.0, "padding": -2000, "outside_stored": -2000,
                 "max_hu": 3071, "transfer_syntax": ExplicitVRLittleEndian}
    elif kind == 1:  # Siemens style: unsigned 12 bit, stored = HU + 1024, air (0) outside, no padding tag
        pixel = {"signed": False, "bits_stored": 12, "intercept": -1024.0, "padding": None, "outside_stored": 0,
                 "max_hu": 3071, "transfer_syntax": RLELossless}
    else:  # stored = HU, signed 12 bit, padding at the 12-bit minimum
        pixel = {"signed": True, "bits_stored": 12, "intercept": 0.0, "padding": -2048, "outside_stored": -2048,
                 "max_hu": 2047, "transfer_syntax": JPEG2000Lossless}
    return SiteConventions(
        index=index,
        name=name,
        letter=name.removeprefix("site-").upper(),
        manufacturer=vendor[0],
        model=vendor[1],
        kernel=vendor[2],
        kvp=vendor[3],
        contrast_agent=vendor[4],
        thickness=thickness,
        spacing=spacing,
        noise_sigma=_NOISE[index % len(_NOISE)],
        instances_descending=kind == 1,
        layout=kind,
        manifest_by_instance=kind == 1,
        series_number=(3, 5, 201)[kind],
        window_center=(40.0, -600.0) if kind != 1 else (100.0,),
        window_width=(400.0, 1500.0) if kind != 1 else (700.0,),
        **pixel,  # type: ignore[arg-type]
    )


def shifted(conv: SiteConventions, shift: SiteShift) -> SiteConventions:
    """``conv`` with ``shift`` applied when the site is one of ``shift.sites`` (else unchanged)."""
    if conv.name not in shift.sites:
        return conv
    return replace(conv, kernel=shift.kernel or conv.kernel, noise_sigma=conv.noise_sigma * shift.noise_scale,
                   hu_offset=shift.hu_offset)

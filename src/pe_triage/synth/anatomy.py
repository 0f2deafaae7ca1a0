"""A synthetic patient's anatomy: parameters plus the analytic shapes shared by drawing and sampling.

Coordinates are millimetres in the patient's *body frame*: x toward the patient's left (image
right), y posterior (image down), z superior (the DICOM patient axes before the patient's small
in-plane rotation). Heights are mostly expressed as the lung level ``u = (z_apex - z) / lung_height``
(0 = lung apex, 1 = diaphragm dome; negative = neck, above 1 = upper abdomen), so every structure
moves and scales with the patient's lung height. Shape functions broadcast over arrays of x, y and
z, which lets the vessel-tree builder sample points inside the lungs with the very functions the
renderer draws them with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Array = np.ndarray

#: lesion kinds of "other disease", in their ``lesion kind`` codes (1-based; 0 = none)
OTHER_KINDS = ("consolidation", "ggo", "nodule", "effusion")


@dataclass(frozen=True, eq=False)
class Tubes:
    """Straight vessel or airway pieces with linearly tapering radius (3D capsules).

    A tree is a list of pieces whose ``parent`` piece ends where the child starts, so the cross
    sections move smoothly from slice to slice and shrink toward the periphery.
    """

    a: Array  # (n, 3) start points
    b: Array  # (n, 3) end points
    r0: Array  # radius at a
    r1: Array  # radius at b
    hu: Array  # lumen HU
    tissue: Array  # uint8 Tissue code of the lumen
    parent: Array  # index of the upstream piece, -1 for a root
    clipped: Array  # bool: drawn only inside the lungs / hila (intrapulmonary pieces)
    wall: Array  # wall thickness in mm (airways), 0 for vessels

    @property
    def z_lo(self) -> Array:
        return np.minimum(self.a[:, 2], self.b[:, 2]) - np.maximum(self.r0, self.r1)

    @property
    def z_hi(self) -> Array:
        return np.maximum(self.a[:, 2], self.b[:, 2]) + np.maximum(self.r0, self.r1)

    def __len__(self) -> int:
        return len(self.r0)


@dataclass(frozen=True, eq=False)
class Embolus:
    """A filling defect along a chain of connected pulmonary-artery pieces, within a z slab."""

    pieces: tuple[int, ...]  # indices into Anatomy.arteries, upstream first
    z_lo: float
    z_hi: float
    fraction: float  # defect radius / lumen radius (1 = occlusive)
    direction: tuple[float, float, float]  # eccentric offset direction; zero vector = centred
    hu: float
    location: str  # central | lobar | segmental


@dataclass(frozen=True, eq=False)
class Blob:
    """Consolidation, ground glass or nodule: a lobulated ellipsoid painted over lung tissue."""

    kind: str
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float
    harmonics: tuple[tuple[float, float, float], ...]  # (amplitude, phase, twist per radius of z)


@dataclass(frozen=True, eq=False)
class Effusion:
    """Dependent pleural fluid: a posterior crescent of one hemithorax, thickest at the base."""

    side: int  # -1 = right (image left), +1 = left
    z_top: float
    thickness: float  # mm at full depth
    ramp: float  # mm of z over which it reaches full thickness
    hu: float


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Everything needed to draw any axial slice of one patient (no randomness left)."""

    # placement in the scanner (patient frame) and size
    center: tuple[float, float]  # body centre, mm, patient x/y
    rotation: float  # radians, in-plane
    z_apex: float
    lung_height: float
    scale: float  # overall size (lateral)
    scale_ap: float  # antero-posterior size
    body_a: tuple[float, float]  # skin half-widths (right, left)
    body_b: tuple[float, float]  # skin half-depths (anterior, posterior)
    fat: float  # subcutaneous fat thickness, lateral
    muscle: float  # chest-wall muscle thickness
    cavity_a: float  # thoracic cavity half-width
    cavity_b: float  # thoracic cavity half-depth
    cavity_y: float  # thoracic cavity centre y
    female: bool
    # mediastinum and heart
    heart_center: tuple[float, float]
    heart_axes: tuple[float, float]
    heart_angle: float
    heart_u: tuple[float, float]  # top and bottom level
    dome_u: tuple[float, float]  # right and left diaphragm dome tops
    spine_y: float
    spine_r: float
    vertebra_pitch: float
    # densities
    hu_fat: float
    hu_muscle: float
    hu_liver: float
    hu_pa: float  # pulmonary arteries and right heart (brightest in CTPA)
    hu_systemic: float  # left heart and aorta
    hu_lung: float
    hu_cortex: float
    hu_marrow: float
    # tubular structures
    arteries: Tubes  # pulmonary arteries: central (trunk, RPA, LPA) + intrapulmonary trees
    veins: Tubes  # pulmonary veins
    airways: Tubes  # trachea, main and lobar bronchi
    systemic: Tubes  # aorta and branches, SVC, brachiocephalic vein, IVC, oesophagus
    hila: tuple[tuple[float, float, float], ...]  # where trees leave the mediastinum
    # disease
    emboli: tuple[Embolus, ...] = ()
    blobs: tuple[Blob, ...] = ()
    effusions: tuple[Effusion, ...] = ()

    def u(self, z: Array | float) -> Array:
        return (self.z_apex - np.asarray(z, dtype=np.float64)) / self.lung_height

    def z(self, u: float) -> float:
        return self.z_apex - u * self.lung_height


def _interp(u: Array, knots: tuple[float, ...], values: tuple[float, ...]) -> Array:
    return np.interp(u, knots, values)


def _ellipse(x: Array, y: Array, cx: Array | float, cy: Array | float, ax: Array | float, by: Array | float) -> Array:
    ax = np.maximum(ax, 1e-6)
    by = np.maximum(by, 1e-6)
    return ((x - cx) / ax) ** 2 + ((y - cy) / by) ** 2 <= 1.0


def cavity_scale(u: Array) -> Array:
    """Thoracic cavity size relative to mid-chest: the narrow inlet at the apex, none in the neck."""
    return _interp(u, (-0.04, 0.0, 0.12, 0.35, 1.0, 1.3), (0.0, 0.55, 0.78, 1.0, 1.0, 0.95))


def cavity_mask(an: Anatomy, x: Array, y: Array, z: Array | float) -> Array:
    k = cavity_scale(an.u(z))
    return _ellipse(x, y, 0.0, an.cavity_y, an.cavity_a * k, an.cavity_b * k)


def heart_profile(an: Anatomy, u: Array) -> Array:
    """Heart cross-section scale: 0 outside its levels, rising to 1 mid-heart."""
    top, bottom = an.heart_u
    t = np.clip((u - top) / (bottom - top), 0.0, 1.0)
    return np.sqrt(np.sin(np.pi * t))


def heart_mask(an: Anatomy, x: Array, y: Array, z: Array | float, margin: float = 1.0) -> Array:
    k = heart_profile(an, an.u(z)) * margin
    c, s = np.cos(an.heart_angle), np.sin(an.heart_angle)
    dx, dy = x - an.heart_center[0], y - an.heart_center[1]
    return _ellipse(c * dx + s * dy, -s * dx + c * dy, 0.0, 0.0, an.heart_axes[0] * k, an.heart_axes[1] * k)


def dome_scale(an: Anatomy, u: Array, side: int) -> Array:
    """Diaphragm dome cross-section scale: an ellipsoid cap below the dome top, then widening."""
    top = an.dome_u[0 if side < 0 else 1]
    depth = 0.26
    d = np.clip((u - top) / depth, 0.0, None)
    cap = np.sqrt(np.clip(1.0 - (1.0 - np.minimum(d, 1.0)) ** 2, 0.0, 1.0))
    return cap + np.clip(d - 1.0, 0.0, None) * 2.5


def dome_mask(an: Anatomy, x: Array, y: Array, z: Array | float, side: int) -> Array:
    k = dome_scale(an, an.u(z), side)
    cx = side * an.cavity_a * 0.42
    cy = an.cavity_y - an.cavity_b * 0.12
    return _ellipse(x, y, cx, cy, an.cavity_a * 0.62 * k, an.cavity_b * 0.95 * k)


def mediastinum_halfwidth(u: Array) -> Array:
    return _interp(u, (0.0, 0.1, 0.3, 0.42, 0.55, 1.0), (26.0, 30.0, 34.0, 40.0, 22.0, 20.0))


def spine_keepout(an: Anatomy, x: Array, y: Array) -> Array:
    """Vertebra and paraspinal muscles: the lungs wrap around them in the paravertebral gutters."""
    return _ellipse(x, y, 0.0, an.spine_y + an.spine_r * 0.9, an.spine_r + 11.0 * an.scale, an.spine_r * 2.4)


def lung_mask(an: Anatomy, x: Array, y: Array, z: Array | float, side: int) -> Array:
    """One lung (side -1 = right lung, image left) as cavity minus mediastinum, heart, dome, spine."""
    u = an.u(z)
    g = _interp(u, (0.0, 0.04, 0.12, 0.3), (0.12, 0.42, 0.7, 1.0))
    cy = an.cavity_y + an.cavity_b * _interp(u, (0.0, 0.3), (0.3, 0.05))
    hemi = _ellipse(x, y, side * an.cavity_a * 0.5, cy, an.cavity_a * 0.62 * g, an.cavity_b * 1.05 * g)
    shift = _interp(u, (0.0, 0.5, 1.0), (0.0, 3.0, 8.0)) * an.scale
    medial = side * (x - shift) > mediastinum_halfwidth(u) * an.scale
    m = hemi & medial & (u >= 0.0) & cavity_mask(an, x, y, z)
    m &= ~heart_mask(an, x, y, z, margin=1.1)
    m &= ~dome_mask(an, x, y, z, side)
    m &= ~spine_keepout(an, x, y)
    return m

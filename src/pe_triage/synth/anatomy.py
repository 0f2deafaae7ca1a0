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

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

Array = np.ndarray

#: lesion kinds of "other disease", in their ``lesion kind`` codes (1-based; 0 = none)
OTHER_KINDS = ("consolidation", "ggo", "nodule", "effusion")

#: tube groups, drawn in this order (the heart goes between airways and systemic vessels)
ARTERY, VEIN, AIRWAY, SYSTEMIC = 0, 1, 2, 3


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
    group: Array  # ARTERY (pulmonary), VEIN (pulmonary), AIRWAY or SYSTEMIC (incl. oesophagus)

    def __len__(self) -> int:
        return len(self.r0)


@dataclass(frozen=True, eq=False)
class Embolus:
    """A filling defect along a chain of connected pulmonary-artery pieces, within a z slab."""

    pieces: tuple[int, ...]  # indices into Anatomy.tubes (pulmonary arteries), upstream first
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
    #: pulmonary arteries (central trunk, RPA, LPA + intrapulmonary trees), pulmonary veins,
    #: trachea and bronchi, aorta and its branches, SVC, brachiocephalic veins, IVC, oesophagus
    tubes: Tubes
    hila: tuple[tuple[float, float, float], ...]  # where trees leave the mediastinum
    # disease
    emboli: tuple[Embolus, ...] = ()
    blobs: tuple[Blob, ...] = ()
    effusions: tuple[Effusion, ...] = ()

    def u(self, z: Array | float) -> Array | float:
        return (self.z_apex - z) / self.lung_height

    def z(self, u: float) -> float:
        return self.z_apex - u * self.lung_height


Memo = Callable[[tuple[object, ...], Callable[[], Array]], Array]


def _no_memo(key: tuple[object, ...], make: Callable[[], Array]) -> Array:
    return make()


def _s(v: Array | float) -> Array | float:
    """Python float for scalars: a numpy float64 scalar would promote the float32 grids to float64."""
    return float(v) if np.ndim(v) == 0 else v


def _interp(u: Array | float, knots: tuple[float, ...], values: tuple[float, ...]) -> Array | float:
    return _s(np.interp(u, knots, values))


def _ellipse(x: Array, y: Array, cx: Array | float, cy: Array | float, ax: Array | float, by: Array | float) -> Array:
    dx = (x - cx) / np.maximum(ax, 1e-6)
    dy = (y - cy) / np.maximum(by, 1e-6)
    return dx * dx + dy * dy <= 1.0


def cavity_scale(u: Array | float) -> Array | float:
    """Thoracic cavity size relative to mid-chest: the narrow inlet at the apex, none in the neck."""
    return _interp(u, (-0.04, 0.0, 0.05, 0.12, 0.35, 1.0, 1.3), (0.0, 0.35, 0.6, 0.8, 1.0, 1.0, 0.95))


def cavity_center_y(an: Anatomy, u: Array | float) -> Array | float:
    """The lung apices rise behind the clavicles: the cavity's centre moves back toward the apex."""
    return an.cavity_y + an.cavity_b * _interp(u, (0.0, 0.25), (0.22, 0.0))


def cavity_mask(an: Anatomy, x: Array, y: Array, z: Array | float) -> Array:
    u = an.u(z)
    k = cavity_scale(u)
    return _ellipse(x, y, 0.0, cavity_center_y(an, u), an.cavity_a * k, an.cavity_b * k)


def heart_profile(an: Anatomy, u: Array | float) -> Array | float:
    """Heart cross-section scale: 0 outside its levels, rising to 1 mid-heart."""
    top, bottom = an.heart_u
    t = np.clip((np.asarray(u) - top) / (bottom - top), 0.0, 1.0)
    return _s(np.sqrt(np.sin(np.pi * t)))


def heart_mask(an: Anatomy, x: Array, y: Array, z: Array | float, margin: float = 1.0) -> Array:
    k = heart_profile(an, an.u(z)) * margin
    c, s = float(np.cos(an.heart_angle)), float(np.sin(an.heart_angle))
    dx, dy = x - an.heart_center[0], y - an.heart_center[1]
    return _ellipse(c * dx + s * dy, -s * dx + c * dy, 0.0, 0.0, an.heart_axes[0] * k, an.heart_axes[1] * k)


def dome_scale(an: Anatomy, u: Array | float, side: int) -> Array | float:
    """Diaphragm dome cross-section scale: an ellipsoid cap below the dome top, then widening."""
    top = an.dome_u[0 if side < 0 else 1]
    d = np.clip((np.asarray(u) - top) / 0.26, 0.0, None)
    cap = np.sqrt(np.clip(1.0 - (1.0 - np.minimum(d, 1.0)) ** 2, 0.0, 1.0))
    return _s(cap + np.clip(d - 1.0, 0.0, None) * 2.5)


def dome_mask(an: Anatomy, x: Array, y: Array, z: Array | float, side: int) -> Array:
    k = dome_scale(an, an.u(z), side)
    cx = side * an.cavity_a * 0.42
    cy = an.cavity_y - an.cavity_b * 0.12
    return _ellipse(x, y, cx, cy, an.cavity_a * 0.62 * k, an.cavity_b * 0.95 * k)


def mediastinum_halfwidth(u: Array | float) -> Array | float:
    return _interp(u, (0.0, 0.1, 0.3, 0.42, 0.55, 1.0), (9.0, 11.0, 13.0, 14.0, 10.0, 9.0))


def spine_keepout(an: Anatomy, x: Array, y: Array) -> Array:
    """Vertebra and paraspinal muscles: the lungs wrap around them in the paravertebral gutters."""
    return _ellipse(x, y, 0.0, an.spine_y + an.spine_r * 0.9, an.spine_r + 11.0 * an.scale, an.spine_r * 2.4)


def lung_masks(an: Anatomy, x: Array, y: Array, z: Array | float, cavity: Array | None = None,
               mediastinum: Array | None = None, memo: Memo | None = None) -> tuple[Array, Array]:
    """Right and left lung: cavity minus mediastinum, heart, diaphragm domes and spine.

    ``mediastinum`` (the renderer passes the outline of the heart, great vessels and airways)
    replaces the heart; a midline band, narrowing in front (anterior junction line), always
    separates the lungs. ``memo`` (key, make) may return shapes kept from an earlier slice.
    """
    if memo is None:
        memo = _no_memo
    u = an.u(z)
    u = _s(u)
    common = cavity_mask(an, x, y, z) if cavity is None else cavity.copy()
    common &= np.asarray(u >= 0.0)
    if mediastinum is not None:
        common &= ~mediastinum
    elif np.ndim(u) or heart_profile(an, u) > 0:
        common &= ~heart_mask(an, x, y, z, margin=1.1)
    common &= ~memo(("spine",), lambda: spine_keepout(an, x, y))
    shift = _interp(u, (0.0, 0.5, 1.0), (0.0, 3.0, 8.0)) * an.scale
    half = mediastinum_halfwidth(u) * an.scale
    ry = (y - (an.cavity_y - 0.05 * an.cavity_b)) / an.cavity_b
    dx = x - shift
    outside = dx * dx > (half * half) * np.maximum(1.0 - ry * ry, 0.02)
    g = _interp(u, (0.0, 0.04, 0.12, 0.3), (0.15, 0.45, 0.72, 1.0))
    cy = an.cavity_y + an.cavity_b * _interp(u, (0.0, 0.3), (0.3, 0.05))
    out = []
    for side in (-1, 1):
        m = common & outside & (side * dx > 0)
        hemi = partial(_ellipse, x, y, side * an.cavity_a * 0.5, cy, an.cavity_a * 0.62 * g, an.cavity_b * 1.05 * g)
        m &= memo(("hemi", side, g, cy), hemi)
        if np.ndim(u) or dome_scale(an, u, side) > 0:
            m &= ~dome_mask(an, x, y, z, side)
        out.append(m)
    return out[0], out[1]

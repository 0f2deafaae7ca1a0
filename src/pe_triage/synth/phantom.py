"""Draw one axial CTPA slice of a synthetic patient: HU image, tissue map and lesion kinds.

Pure numpy. Structures are painted back to front (air, table, body, cavity, abdomen, lungs,
pulmonary vessels with emboli, airways, heart, systemic vessels, bones, lung disease). Large shapes
are evaluated inside their bounding windows, the several hundred vessel pieces of a slice in a few
vectorised batches, and shapes that repeat from slice to slice are kept per grid: about 7 ms per
256 px slice and 15 ms per 512 px slice on one core. :func:`scanner` then adds blur and noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from pe_triage.config import LesionVisibility
from pe_triage.schema import Label, Tissue

from .anatomy import (
    AIRWAY,
    ARTERY,
    OTHER_KINDS,
    SYSTEMIC,
    VEIN,
    Anatomy,
    Embolus,
    Tubes,
    cavity_center_y,
    cavity_mask,
    cavity_scale,
    dome_mask,
    dome_scale,
    heart_mask,
    heart_profile,
    lung_masks,
)

Array = np.ndarray
Window = tuple[slice, slice]

#: heart chambers: (centre along / across the long axis, half-axes) as fractions of the heart's
#: half-axes, the heart levels (0 = top, 1 = bottom) they occupy, and whether right heart
_CHAMBERS = (
    ((0.2, 0.35), (0.5, 0.33), (0.25, 0.95), False),  # left ventricle (thick wall)
    ((0.1, -0.55), (0.55, 0.32), (0.15, 0.95), True),  # right ventricle
    ((-0.6, -0.35), (0.32, 0.4), (0.2, 0.8), True),  # right atrium
    ((-0.55, 0.5), (0.38, 0.32), (0.0, 0.45), False),  # left atrium
)
#: which rib (0 = first) ends how far round the chest, as a fraction of the way to the sternum
_RIB_END = (0.9, 0.92, 0.92, 0.92, 0.92, 0.92, 0.9, 0.8, 0.7, 0.6, 0.45, 0.35)
_RIB_START = 0.1 * np.pi
_RIB_PITCH_U = 0.105
#: mediastinal fat (mm) around the great vessels and central airways
_FAT_MARGIN = 5.0
#: densest lung parenchyma (dependent lung at full inspiration)
_LUNG_MAX_HU = -790.0
#: standard deviation of the scanner's in-plane point spread
_PSF_MM = 0.5


@dataclass(frozen=True, eq=False)
class Grid:
    """Pixel grid of a series, with the body-frame coordinates (mm) of every pixel centre."""

    size: int
    spacing: float
    x: Array  # body-frame x per pixel, float32 (size, size)
    y: Array
    px: Array  # patient-frame x of each column (1D)
    py: Array  # patient-frame y of each row (1D)
    center: tuple[float, float]
    cos: float  # of the patient's in-plane rotation
    sin: float
    #: shapes that repeat from slice to slice (body outline, cavity), keyed by their parameters
    cache: dict[tuple[object, ...], Any] = field(default_factory=dict)

    def memo(self, key: tuple[object, ...], make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def to_pixel(self, xb: Array | float, yb: Array | float) -> tuple[Array | float, Array | float]:
        """Row, column of body-frame points."""
        x = self.center[0] + self.cos * xb - self.sin * yb
        y = self.center[1] + self.sin * xb + self.cos * yb
        return (y - float(self.py[0])) / self.spacing, (x - float(self.px[0])) / self.spacing

    def pixel_box(self, xb: Array | float, yb: Array | float, rx: Array | float, ry: Array | float
                  ) -> tuple[Array | float, Array | float, Array | float, Array | float]:
        """Row/column centre and half-extents (pixels) of body-frame boxes (xb ± rx, yb ± ry)."""
        i, j = self.to_pixel(xb, yb)
        c, s = abs(self.cos), abs(self.sin)
        return i, j, (s * rx + c * ry) / self.spacing + 1.5, (c * rx + s * ry) / self.spacing + 1.5


def make_grid(an: Anatomy, size: int, spacing: float) -> Grid:
    """Grid centred on the scanner isocentre (patient x = y = 0), the patient placed by ``an``."""
    coords = (np.arange(size) - (size - 1) / 2.0) * spacing
    dx = coords[None, :] - an.center[0]
    dy = coords[:, None] - an.center[1]
    c, s = float(np.cos(an.rotation)), float(np.sin(an.rotation))
    x = (c * dx + s * dy).astype(np.float32)
    y = (-s * dx + c * dy).astype(np.float32)
    return Grid(size, spacing, x, y, coords, coords, an.center, c, s)


@dataclass(frozen=True, eq=False)
class RenderedSlice:
    hu: Array  # float32 HU, noiseless
    tissue: Array  # uint8 Tissue codes
    kind: Array  # uint8: 1 + index into OTHER_KINDS where an other-disease lesion was painted
    spacing: float  # pixel spacing, mm

    def lesion_mask(self, label: Label) -> Array:
        """The pixels of the lesion ``label`` is about: the clot alone on a PE slice (an effusion beside
        it is not what the label claims, and a Grad-CAM peak on it must not count as finding the
        clot), every lesion pixel otherwise."""
        if label is Label.PE:
            return self.tissue == Tissue.PE
        return (self.tissue == Tissue.PE) | (self.tissue == Tissue.OTHER_LESION)

    @cached_property
    def areas_mm2(self) -> dict[str, float]:
        """Cross-section of each lesion kind on the slice ("pe" or an OTHER_KINDS name; kinds absent
        from the slice left out): its pixels times the pixel area, at the native resolution."""
        pixel = self.spacing * self.spacing
        counts = np.bincount(self.kind[self.tissue == Tissue.OTHER_LESION], minlength=len(OTHER_KINDS) + 1)
        areas = {kind: int(n) * pixel for kind, n in zip(OTHER_KINDS, counts[1:].tolist(), strict=True) if n}
        pe = int(np.count_nonzero(self.tissue == Tissue.PE))
        return {"pe": pe * pixel, **areas} if pe else areas

    def label(self, visible: LesionVisibility) -> Label:
        """The slice as a radiologist marks it: PE where a clot's cross-section reaches its kind's
        visible minimum, else other disease where one does, else indeterminate where only slivers
        of lesions cut the slice, else WNL."""
        seen = {kind for kind, area in self.areas_mm2.items() if area >= getattr(visible, kind)}
        if "pe" in seen:
            return Label.PE
        if seen:
            return Label.OTHER
        return Label.INDETERMINATE if self.areas_mm2 else Label.WNL

    @cached_property
    def lesion(self) -> str:
        """The dominant lesion kind: PE wins, else the other-disease kind with most pixels."""
        areas = self.areas_mm2
        if "pe" in areas:
            return "pe"
        return max(areas, key=areas.__getitem__) if areas else "none"


class _Painter:
    def __init__(self, grid: Grid) -> None:
        n = grid.size
        self.g = grid
        self.hu = np.full((n, n), -1000.0, np.float32)
        self.tissue = np.zeros((n, n), np.uint8)
        self.kind = np.zeros((n, n), np.uint8)
        self.full: Window = (slice(0, n), slice(0, n))

    def window(self, xb: float, yb: float, rx: float, ry: float | None = None) -> Window | None:
        """Pixel window holding the body-frame box (xb ± rx, yb ± ry); None when off the image."""
        i, j, ri, rj = self.g.pixel_box(xb, yb, rx, rx if ry is None else ry)
        n = self.g.size
        i0, i1 = max(int(i - ri), 0), min(int(i + ri) + 2, n)
        j0, j1 = max(int(j - rj), 0), min(int(j + rj) + 2, n)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(i0, i1), slice(j0, j1)

    def xy(self, w: Window) -> tuple[Array, Array]:
        return self.g.x[w], self.g.y[w]

    def paint(self, w: Window, mask: Array, hu: float | Array, tissue: int) -> None:
        np.copyto(self.hu[w], hu, where=mask)
        np.copyto(self.tissue[w], np.uint8(tissue), where=mask)

    def ellipse(self, cx: float, cy: float, ax: float, by: float, hu: float, tissue: int,
                angle: float = 0.0, keep: Array | None = None) -> None:
        if ax <= 0 or by <= 0:
            return
        r = max(ax, by)
        w = self.window(cx, cy, r) if angle else self.window(cx, cy, ax, by)
        if w is None:
            return
        x, y = self.xy(w)
        m = _in_ellipse(x - cx, y - cy, ax, by, angle)
        if keep is not None:
            m &= keep[w]
        self.paint(w, m, hu, tissue)

    def bone(self, cx: float, cy: float, ax: float, by: float, an: Anatomy, angle: float = 0.0,
             cortex: float = 1.5) -> None:
        """Cortical shell around cancellous bone."""
        self.ellipse(cx, cy, ax, by, an.hu_cortex, Tissue.BONE, angle)
        self.ellipse(cx, cy, ax - cortex, by - cortex, an.hu_marrow, Tissue.BONE, angle)


def _in_ellipse(dx: Array, dy: Array, ax: float, by: float, angle: float = 0.0) -> Array:
    if angle:
        c, s = float(np.cos(angle)), float(np.sin(angle))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    dx = dx * (1.0 / ax)
    dy = dy * (1.0 / by)
    return dx * dx + dy * dy <= 1.0


def render_slice(an: Anatomy, grid: Grid, z: float) -> RenderedSlice:
    """The noiseless slice at height ``z`` (mm, patient axis) of patient ``an`` on ``grid``."""
    p = _Painter(grid)
    z = float(z)
    u = float(an.u(z))
    tubes = _SliceTubes(p, an, z, min_r=0.75 * grid.spacing)
    _base(p, an, u)
    _breasts(p, an, u)
    k = float(cavity_scale(u))
    cy = float(cavity_center_y(an, u))
    allowed = np.zeros((grid.size, grid.size), bool)
    if k > 0:
        wc = p.window(0.0, cy, an.cavity_a * k, an.cavity_b * k)
        if wc is not None:
            x, y = p.xy(wc)
            cav = grid.memo(("cavity", k, cy), lambda: cavity_mask(an, x, y, z))
            p.paint(wc, cav, an.hu_fat + 10.0, Tissue.FAT)
            _abdomen(p, an, z, u, wc, cav)

            def memo(key: tuple[object, ...], make: Callable[[], Array]) -> Array:
                return grid.memo(("lungs", k, cy, *key), make)

            med = tubes.mediastinum(an, u, wc)
            right, left = lung_masks(an, x, y, z, cavity=cav, mediastinum=med, memo=memo)
            lungs = right | left
            p.paint(wc, lungs, an.hu_lung + (y - an.cavity_y) * (40.0 / an.cavity_b), Tissue.LUNG)
            allowed[wc] = lungs
    _neck(p, an, u)
    _paraspinal(p, an, u)
    for hx, hy, hz in an.hila:
        if abs(hz - z) < 30.0 * an.scale:
            w = p.window(hx, hy, 22.0 * an.scale)
            if w is not None:
                x, y = p.xy(w)
                allowed[w] |= (x - hx) ** 2 + (y - hy) ** 2 <= (22.0 * an.scale) ** 2
    for group in (ARTERY, VEIN, AIRWAY):
        tubes.draw(group, allowed)
    _heart(p, an, u)
    tubes.draw(SYSTEMIC, allowed)
    _spine(p, an, z, u)
    _ribs(p, an, u)
    _lesions(p, an, z, u)
    return RenderedSlice(p.hu, p.tissue, p.kind, grid.spacing)


def _table(p: _Painter, an: Anatomy) -> None:
    """Curved carbon-fibre cradle under the patient: dense shells around a foam core."""
    top = an.center[1] + an.body_b[1] + 4.0
    rows = np.flatnonzero((p.g.py > top - 40.0) & (p.g.py < top + 20.0))
    if not len(rows):
        return
    w = (slice(rows[0], rows[-1] + 1), p.full[1])
    x = p.g.px[None, :]
    y = p.g.py[rows][:, None]
    surface = top - x**2 / 2400.0
    depth = y - surface
    band = (depth >= 0) & (depth <= 14.0) & (np.abs(x) <= 230.0)
    shell = band & ((depth < 2.5) | (depth > 11.5))
    p.paint(w, band, -180.0, Tissue.TABLE)
    p.paint(w, shell, 180.0, Tissue.TABLE)


def _body_axes(an: Anatomy, u: float) -> tuple[float, float, float]:
    """Skin ellipse scale (lateral, AP) and centre shift: the neck above the shoulders."""
    lat = float(np.interp(u, (-0.3, -0.16, -0.06, 0.0), (0.42, 0.5, 0.95, 1.0)))
    ap = float(np.interp(u, (-0.3, -0.12, 0.0), (0.55, 0.75, 1.0)))
    shift = float(np.interp(u, (-0.3, -0.05), (18.0, 0.0))) * an.scale
    return lat, ap, shift


def _base(p: _Painter, an: Anatomy, u: float) -> None:
    """Table and body wall; the same for every slice with the same outline (the whole chest)."""
    axes = _body_axes(an, u)

    def make() -> tuple[Array, Array]:
        _table(p, an)
        _body(p, an, *axes)
        return p.hu.copy(), p.tissue.copy()

    hu, tissue = p.g.memo(("base", *axes), make)
    np.copyto(p.hu, hu)
    np.copyto(p.tissue, tissue)


def _breasts(p: _Painter, an: Anatomy, u: float) -> None:
    """Flattened breasts of a supine woman, over the fat in front of the chest wall."""
    if not an.female or not 0.25 < u < 0.85:
        return
    s = an.scale
    k = float(np.sin(np.pi * (u - 0.25) / 0.6))
    outside_muscle = (p.tissue == Tissue.FAT) | (p.tissue == Tissue.AIR)
    for side in (-1, 1):
        cx, cy = side * 72.0 * s, -an.body_b[0] + 14.0 * s
        p.ellipse(cx, cy, 62.0 * s * k, 24.0 * s * k, an.hu_fat, Tissue.FAT, side * 0.25, keep=outside_muscle)
        p.ellipse(cx, cy + 4.0 * s, 34.0 * s * k, 11.0 * s * k, 25.0, Tissue.SOFT_TISSUE, side * 0.25,
                  keep=outside_muscle)


def _body(p: _Painter, an: Anatomy, lat: float, ap: float, shift: float) -> None:
    """Skin/fat, chest-wall muscle with a fat plane: levels of one normalised radius.

    The quadrant-wise ellipse (different left/right and front/back half-axes) is evaluated once;
    inner outlines are its level sets, so fat and muscle layers scale with the local half-axis.
    """
    a0, a1 = an.body_a[0] * lat, an.body_a[1] * lat
    b0, b1 = an.body_b[0] * ap, an.body_b[1] * ap
    w = p.window(0.5 * (a1 - a0), shift + 0.5 * (b1 - b0), 0.5 * (a0 + a1), 0.5 * (b0 + b1))
    if w is None:
        return
    x, y = p.xy(w)
    dx = x * np.where(x < 0, np.float32(1.0 / a0), np.float32(1.0 / a1))
    dy = (y - shift) * np.where(y < shift, np.float32(1.0 / b0), np.float32(1.0 / b1))
    rho2 = dx * dx + dy * dy
    mean_a = 0.5 * (a0 + a1)
    p.paint(w, rho2 <= 1.0, an.hu_fat, Tissue.FAT)
    p.paint(w, rho2 <= (1.0 - an.fat / mean_a) ** 2, an.hu_muscle, Tissue.MUSCLE)
    r_plane = 1.0 - (an.fat + 0.45 * an.muscle) / mean_a
    plane = (rho2 <= r_plane**2) & (rho2 >= (r_plane - 1.5 / mean_a) ** 2) & (y < an.cavity_y)
    p.paint(w, plane, an.hu_fat, Tissue.FAT)


def _neck(p: _Painter, an: Anatomy, u: float) -> None:
    """Visceral space of the neck with thyroid lobes beside the trachea."""
    if u >= 0.0:
        return
    s = an.scale
    _, ap, shift = _body_axes(an, u)
    p.ellipse(0.0, shift - 12.0 * s, 38.0 * s, 30.0 * s * ap, an.hu_fat + 10.0, Tissue.FAT)
    if u > -0.38:
        k = np.sqrt(np.sin(np.pi * (u + 0.38) / 0.38))
        y_trachea = float(np.interp(u, (-0.4, 0.0), (-20.0, 4.0))) * s * an.scale_ap
        for side in (-1, 1):
            p.ellipse(side * 16.0 * s, y_trachea + 2.0 * s, 9.0 * s * k, 15.0 * s * k, 100.0, Tissue.SOFT_TISSUE)


def _paraspinal(p: _Painter, an: Anatomy, u: float) -> None:
    if u < -0.05:
        return
    s = an.scale
    y = _spine_y(an, u) + an.spine_r + 24.0 * s
    for side in (-1, 1):
        p.ellipse(side * 30.0 * s, y, 24.0 * s, 21.0 * s, an.hu_muscle, Tissue.MUSCLE)


def _abdomen(p: _Painter, an: Anatomy, z: float, u: float, w: Window, cav: Array) -> None:
    """Liver under the right dome; under the left, spleen behind and the stomach in front.

    The stomach holds fluid and, being non-dependent in a supine patient, a gas bubble in front.
    """
    if u < min(an.dome_u) - 0.01:
        return
    x, y = p.xy(w)
    right = dome_mask(an, x, y, z, -1) & cav
    left = dome_mask(an, x, y, z, 1) & cav & ~right
    p.paint(w, right, an.hu_liver, Tissue.SOFT_TISSUE)
    k = min(float(dome_scale(an, u, 1)), 1.0)
    if k <= 0:
        return
    a, b, cy = an.cavity_a, an.cavity_b, an.cavity_y
    spleen = _in_ellipse(x - 0.62 * a, y - (cy + 0.4 * b), 0.3 * a * k, 0.42 * b * k, -0.5)
    p.paint(w, left & spleen, an.hu_liver - 15.0, Tissue.SOFT_TISSUE)
    sx, sy, sa, sb = 0.3 * a, cy - 0.3 * b, 0.34 * a * k, 0.4 * b * k
    stomach = left & _in_ellipse(x - sx, y - sy, sa, sb, 0.4)
    p.paint(w, stomach, 40.0, Tissue.SOFT_TISSUE)
    p.paint(w, stomach & _in_ellipse(x - sx, y - sy, sa - 4.0, sb - 4.0, 0.4), 20.0, Tissue.SOFT_TISSUE)
    if u < an.dome_u[1] + 0.35:
        p.paint(w, stomach & _in_ellipse(x - sx, y - sy, sa - 4.0, sb - 4.0, 0.4) & (y < sy - 0.25 * sb), -1000.0,
                Tissue.AIR)


@dataclass(frozen=True, eq=False)
class _Cuts:
    """Cross-sections of K pieces with one slice, each in a square pixel window of a common edge."""

    piece: Array  # (K,) indices into the Tubes
    rows: Array  # (K, E) pixel rows of each window (clamped to the image)
    cols: Array  # (K, E)
    valid: Array  # (K, E, E) inside the window proper
    x: Array  # (K, E, E) body-frame coordinates
    y: Array
    tt: Array  # (K, E, E) parameter of the closest axis point
    d2: Array  # (K, E, E) squared distance to the axis

    def pixels(self, mask: Array) -> tuple[Array, Array, Array]:
        """(piece position, row, column) of every True in a (K, E, E) mask."""
        k, i, j = np.nonzero(mask & self.valid)
        return k, self.rows[k, i], self.cols[k, j]

    def gather(self, image: Array) -> Array:
        return image[self.rows[:, :, None], self.cols[:, None, :]]

    def take(self, sel: Array) -> _Cuts:
        return _Cuts(self.piece[sel], self.rows[sel], self.cols[sel], self.valid[sel], self.x[sel], self.y[sel],
                     self.tt[sel], self.d2[sel])


class _SliceTubes:
    """All tube pieces that reach one slice, cut once and shared by the mediastinum and the drawing."""

    def __init__(self, p: _Painter, an: Anatomy, z: float, min_r: float) -> None:
        t = an.tubes
        self.p, self.t, self.z, self.min_r = p, t, z, min_r
        self.emboli: dict[int, list[Embolus]] = {}
        for e in an.emboli:
            for piece in e.pieces:
                self.emboli.setdefault(piece, []).append(e)
        self.reach = np.maximum(t.r0, t.r1) + t.wall + np.where(t.clipped, 0.0, _FAT_MARGIN)
        self.cuts = _cuts(p, t, z, _near(t, z, self.reach), self.reach)
        self.groups: dict[int, list[_Cuts]] = {}
        for c in self.cuts:
            group = t.group[c.piece]
            for g in np.unique(group).tolist():
                self.groups.setdefault(g, []).append(c.take(group == g))

    def mediastinum(self, an: Anatomy, u: float, wc: Window) -> Array:
        """Heart, great vessels and central airways with a fat margin, filled row by row.

        Filling each row between its outermost structures gives the mediastinum's lobulated
        outline: the lungs' medial surfaces hug the vessels instead of a straight band.
        """
        m = np.zeros(self.p.hu.shape, bool)
        for c in self.cuts:
            central = ~self.t.clipped[c.piece][:, None, None]
            _, i, j = c.pixels(central & (c.d2 <= (self.reach[c.piece] ** 2)[:, None, None]))
            m[i, j] = True
        inner = m[wc]
        if float(heart_profile(an, u)) > 0:
            x, y = self.p.xy(wc)
            inner |= heart_mask(an, x, y, self.z, margin=1.1)
        left = np.maximum.accumulate(inner, axis=1)
        right = np.maximum.accumulate(inner[:, ::-1], axis=1)[:, ::-1]
        return left & right

    def draw(self, group: int, allowed: Array) -> None:
        """Walls (airways), then lumens, then emboli of one group (so joints never show a wall)."""
        p, t = self.p, self.t
        for c in self.groups.get(group, ()):
            q = c.piece[:, None, None]
            clipped = t.clipped[c.piece]
            mine = c.valid.copy()
            if clipped.any():
                mine[clipped] &= c.take(clipped).gather(allowed)
            radius = (t.r0[q] + c.tt * (t.r1[q] - t.r0[q])).astype(np.float32)
            if group == AIRWAY:
                wall = t.wall[q].astype(np.float32)
                _, i, j = c.pixels(mine & (c.d2 <= (radius + wall) ** 2))
                p.hu[i, j] = 40.0
                p.tissue[i, j] = Tissue.SOFT_TISSUE
            lumen = mine & (c.d2 <= radius * radius)
            k, i, j = c.pixels(lumen)
            p.hu[i, j] = t.hu[c.piece[k]]
            p.tissue[i, j] = t.tissue[c.piece[k]]
            for m, piece in enumerate(c.piece.tolist()):
                for e in self.emboli.get(piece, ()):
                    if e.z_lo <= self.z <= e.z_hi:
                        r_vessel = float(min(t.r0[piece], t.r1[piece]))
                        _embolus(p, c, m, self.z, t.a[piece], t.b[piece], r_vessel, lumen[m], e, self.min_r)


def _near(t: Tubes, z: float, reach: Array) -> Array:
    """Pieces whose capsule reaches the plane z."""
    return np.flatnonzero((np.minimum(t.a[:, 2], t.b[:, 2]) - reach <= z) & (np.maximum(t.a[:, 2], t.b[:, 2]) + reach >= z))


def _cuts(p: _Painter, t: Tubes, z: float, idx: Array, reach: Array) -> list[_Cuts]:
    """Cross-sections of pieces ``idx`` with the plane z, in buckets of equal window size.

    One vectorised pass per bucket (window edges 8, 16, 32, ... pixels) replaces a Python loop over
    pieces, which would cost more than the arithmetic.
    """
    if not len(idx):
        return []
    a, b, rm = t.a[idx], t.b[idx], reach[idx]
    d = b - a
    dz = d[:, 2]
    flat = np.abs(dz) < 1e-9
    safe = np.where(flat, 1.0, dz)
    ta = np.where(flat, 0.0, (z - rm - a[:, 2]) / safe)
    tb = np.where(flat, 1.0, (z + rm - a[:, 2]) / safe)
    t0 = np.clip(np.minimum(ta, tb), 0.0, 1.0)
    t1 = np.clip(np.maximum(ta, tb), 0.0, 1.0)
    p0 = a[:, :2] + t0[:, None] * d[:, :2]
    p1 = a[:, :2] + t1[:, None] * d[:, :2]
    c = 0.5 * (p0 + p1)
    half = 0.5 * np.abs(p1 - p0) + rm[:, None]
    ci, cj, ri, rj = (np.asarray(v) for v in p.g.pixel_box(c[:, 0], c[:, 1], half[:, 0], half[:, 1]))
    n = p.g.size
    i0 = np.clip((ci - ri).astype(int), 0, n)
    i1 = np.clip((ci + ri).astype(int) + 2, 0, n)
    j0 = np.clip((cj - rj).astype(int), 0, n)
    j1 = np.clip((cj + rj).astype(int) + 2, 0, n)
    hgt, wid = i1 - i0, j1 - j0
    edge = 2 ** np.ceil(np.log2(np.maximum(np.maximum(hgt, wid), 8))).astype(int)
    out: list[_Cuts] = []
    for e in np.unique(edge[(hgt > 0) & (wid > 0)]).tolist():
        sel = np.flatnonzero((edge == e) & (hgt > 0) & (wid > 0))
        span = np.arange(e)
        rows = np.minimum(i0[sel, None] + span, n - 1)
        cols = np.minimum(j0[sel, None] + span, n - 1)
        valid = (span[None, :, None] < hgt[sel, None, None]) & (span[None, None, :] < wid[sel, None, None])
        x = p.g.x[rows[:, :, None], cols[:, None, :]]
        y = p.g.y[rows[:, :, None], cols[:, None, :]]
        tt, d2 = _axis_distance(x, y, z, a[sel][:, None, None, :], d[sel][:, None, None, :])
        out.append(_Cuts(idx[sel], rows, cols, valid, x, y, tt, d2))
    return out


def _axis_distance(x: Array, y: Array, z: float, a: Array, d: Array) -> tuple[Array, Array]:
    """Parameter of the closest axis point (clamped to the piece) and squared distance to it."""
    wx = x - np.asarray(a[..., 0], np.float32)
    wy = y - np.asarray(a[..., 1], np.float32)
    wz = np.float32(z) - np.asarray(a[..., 2], np.float32)
    dx, dy, dz = (np.asarray(d[..., k], np.float32) for k in range(3))
    length2 = np.maximum(dx * dx + dy * dy + dz * dz, np.float32(1e-9))
    tt = np.minimum(np.maximum((wx * dx + wy * dy + wz * dz) / length2, np.float32(0.0)), np.float32(1.0))
    ex, ey, ez = wx - tt * dx, wy - tt * dy, wz - tt * dz
    return tt, ex * ex + ey * ey + ez * ez


def _embolus(p: _Painter, c: _Cuts, m: int, z: float, a: Array, b: Array, r_vessel: float, lumen: Array,
             e: Embolus, min_r: float) -> None:
    """Hypodense clot in the lumen: occlusive, central (rim of contrast all round) or wall-adherent.

    The clot is at least ``min_r`` (0.75 px) in radius so that it always covers a pixel centre.
    """
    clot = lumen
    if e.fraction < 1.0:
        r_e = min(max(e.fraction * r_vessel, min_r), r_vessel)
        d = b - a
        v = np.asarray(e.direction)
        v = v - (v @ d) / (d @ d or 1.0) * d
        norm = float(np.linalg.norm(v))
        off = v / norm * 0.95 * (r_vessel - r_e) if norm > 1e-6 else np.zeros(3)
        _, d2 = _axis_distance(c.x[m], c.y[m], z, a + off, d)
        clot = lumen & (d2 <= r_e * r_e)
    i, j = np.nonzero(clot & c.valid[m])
    p.hu[c.rows[m, i], c.cols[m, j]] = e.hu
    p.tissue[c.rows[m, i], c.cols[m, j]] = Tissue.PE


def _heart(p: _Painter, an: Anatomy, u: float) -> None:
    k = float(heart_profile(an, u))
    if k <= 0.02:
        return
    hx, hy = an.heart_center
    ha, hb = an.heart_axes
    ang = an.heart_angle
    p.ellipse(hx, hy, ha * k * 1.08, hb * k * 1.08, an.hu_fat + 15.0, Tissue.FAT, ang)
    p.ellipse(hx, hy, ha * k, hb * k, 45.0, Tissue.SOFT_TISSUE, ang)
    top, bottom = an.heart_u
    t = (u - top) / (bottom - top)
    c, s = float(np.cos(ang)), float(np.sin(ang))
    for (cu, cv), (au, av), (t0, t1), right in _CHAMBERS:
        if not t0 < t < t1:
            continue
        kc = k * float(np.sqrt(np.sin(np.pi * (t - t0) / (t1 - t0))))
        ox, oy = cu * ha * k, cv * hb * k
        cx, cy = hx + c * ox - s * oy, hy + s * ox + c * oy
        hu = an.hu_pa if right else an.hu_systemic
        p.ellipse(cx, cy, au * ha * kc, av * hb * kc, hu, Tissue.CONTRAST_BLOOD, ang)


def _spine_y(an: Anatomy, u: float) -> float:
    return an.spine_y + float(np.interp(u, (-0.3, -0.05), (-25.0, 0.0))) * an.scale


def _spine(p: _Painter, an: Anatomy, z: float, u: float) -> None:
    """Vertebral body (or disc), neural arch, spinous and transverse processes."""
    s = an.scale
    yv = _spine_y(an, u)
    r = an.spine_r * float(np.interp(u, (-0.3, 0.0, 1.2), (0.8, 0.9, 1.15)))
    disc = ((z - an.z_apex) / an.vertebra_pitch) % 1.0 < 0.2
    if disc:
        p.ellipse(0.0, yv, r, r * 0.9, 85.0, Tissue.SOFT_TISSUE)
    else:
        p.bone(0.0, yv, r, r * 0.9, an, cortex=1.8)
    yc = yv + r * 0.9 + 7.0 * s
    if not disc:
        p.bone(0.0, yc + 20.0 * s, 3.5 * s, 12.0 * s, an)
        for side in (-1, 1):
            p.bone(side * 17.0 * s, yc + 4.0 * s, 10.0 * s, 4.0 * s, an, angle=side * 0.5)
    p.ellipse(0.0, yc + 1.0 * s, 11.0 * s, 10.0 * s, an.hu_cortex * 0.8, Tissue.BONE)
    p.ellipse(0.0, yc, 7.5 * s, 7.0 * s, 25.0, Tissue.SOFT_TISSUE)


def _ribs(p: _Painter, an: Anatomy, u: float) -> None:
    """Ribs descend from the spine toward the sternum, so each slice cuts several of them."""
    s = an.scale
    k = max(float(cavity_scale(u)), 0.55)
    ar, br = an.cavity_a * k + 5.0 * s, an.cavity_b * k + 5.0 * s
    cy = float(cavity_center_y(an, u))
    drop = 4.2 * _RIB_PITCH_U
    for rib, end in enumerate(_RIB_END):
        alpha = _RIB_START + (u - (-0.03 + rib * _RIB_PITCH_U)) / drop * (np.pi - _RIB_START)
        if not _RIB_START <= alpha <= end * np.pi:
            continue
        cartilage = alpha > 0.8 * np.pi
        for side in (-1, 1):
            x = side * ar * np.sin(alpha)
            y = cy + br * np.cos(alpha)
            ang = float(np.arctan2(-br * np.sin(alpha), side * ar * np.cos(alpha)))
            if cartilage:
                p.ellipse(x, y, 7.0 * s, 4.5 * s, 120.0, Tissue.SOFT_TISSUE, ang)
            else:
                p.bone(x, y, 7.5 * s, 4.3 * s, an, angle=ang)
    if 0.02 < u < 0.85:
        ya = an.cavity_y - an.cavity_b * k - 7.0 * s
        ax, by = (22.0, 8.0) if u < 0.22 else (14.0, 6.5) if u < 0.78 else (8.0, 5.0)
        p.bone(0.0, ya, ax * s, by * s, an)
    if -0.08 < u < 0.05:
        t = (0.05 - u) / 0.17
        for side in (-1, 1):
            x = side * (28.0 + 100.0 * t) * s
            y = an.cavity_y - an.cavity_b * 0.62 - 12.0 * s + 30.0 * t * s
            p.bone(x, y, 26.0 * s, 7.0 * s, an, angle=side * 0.25)
    if -0.08 < u < 0.55:
        kk = float(np.sqrt(np.sin(np.pi * (u + 0.08) / 0.63)))
        alpha = 0.24 * np.pi
        for side in (-1, 1):
            x = side * (ar + 14.0 * s) * np.sin(alpha)
            y = cy + (br + 14.0 * s) * np.cos(alpha)
            ang = float(np.arctan2(-br * np.sin(alpha), side * ar * np.cos(alpha)))
            p.ellipse(x, y, 38.0 * s * kk, 12.0 * s, an.hu_muscle, Tissue.MUSCLE, ang)
            p.ellipse(x, y, 32.0 * s * kk, 2.2 * s, an.hu_cortex * 0.6, Tissue.BONE, ang)


#: the tissues each lesion kind replaces. Parenchymal lesions leave the vessels: a contrast-filled
#: artery stays bright through a consolidation or past a nodule (the CT angiogram sign), and a
#: lesion painted over a lumen would draw a filling defect without a clot, PE's own sign under an
#: "other" label (stage 2's most confident false positives were such slices). Pleural fluid
#: compresses the lung, vessels and airways included.
_OVER = {
    "consolidation": (Tissue.LUNG,),
    "ggo": (Tissue.LUNG,),
    "nodule": (Tissue.LUNG,),
    "effusion": (Tissue.LUNG, Tissue.LUNG_VESSEL, Tissue.AIRWAY, Tissue.OTHER_LESION),
}


def _lesions(p: _Painter, an: Anatomy, z: float, u: float) -> None:
    for blob in an.blobs:
        cx, cy, cz = blob.center
        rx, ry, rz = blob.radii
        if abs(z - cz) >= rz:
            continue
        k = float(np.sqrt(1.0 - ((z - cz) / rz) ** 2))
        ax, by = rx * k, ry * k
        amp = sum(h[0] for h in blob.harmonics)
        w = p.window(cx, cy, max(ax, by) * (1.0 + amp))
        if w is None:
            continue
        x, y = p.xy(w)
        dx, dy = x - cx, y - cy
        theta = np.arctan2(dy, dx)
        bound = np.ones_like(theta)
        for j, (h_amp, phase, twist) in enumerate(blob.harmonics):
            bound += h_amp * np.cos((j + 2) * theta + phase + twist * (z - cz) / rz)
        rho = np.sqrt((dx / ax) ** 2 + (dy / by) ** 2) / bound
        if blob.kind == "nodule":
            _paint_lesion(p, w, rho <= 1.0, blob.hu, blob.kind)
            continue
        weight = np.clip((1.0 - rho) / 0.3, 0.0, 1.0)
        base = np.minimum(p.hu[w], np.float32(_LUNG_MAX_HU))  # vessels in the rim fade like parenchyma
        _paint_lesion(p, w, weight > 0.2, base + weight * (blob.hu - base), blob.kind)
    for eff in an.effusions:
        if z > eff.z_top:
            continue
        depth = eff.thickness * float(np.sqrt(min((eff.z_top - z) / eff.ramp, 1.0)))
        k = float(cavity_scale(u))
        if depth <= 0 or k <= 0:
            continue
        a, b = an.cavity_a * k, an.cavity_b * k
        w = p.window(eff.side * a * 0.5, an.cavity_y + b * 0.5, max(a * 0.5, b * 0.5) + 2.0)
        if w is None:
            continue
        x, y = p.xy(w)
        inside = _in_ellipse(x, y - an.cavity_y, a, b) & ~_in_ellipse(x, y - an.cavity_y + depth, a, b)
        inside &= eff.side * x > 0
        _paint_lesion(p, w, inside, eff.hu, "effusion")


def _paint_lesion(p: _Painter, w: Window, inside: Array, hu: float | Array, kind: str) -> None:
    """Paint a lesion over the tissues it can replace (``_OVER``: only pleural fluid covers vessels)."""
    inside &= np.isin(p.tissue[w], _OVER[kind])
    p.paint(w, inside, hu, Tissue.OTHER_LESION)
    np.copyto(p.kind[w], np.uint8(OTHER_KINDS.index(kind) + 1), where=inside)


def _smooth(a: Array) -> Array:
    """3x3 binomial filter: the scanner's point spread at the edges of every structure."""
    q = np.pad(a, 1, mode="edge")
    v = q[:-2] + 2.0 * q[1:-1] + q[2:]
    return (v[:, :-2] + 2.0 * v[:, 1:-1] + v[:, 2:]) / 16.0


def scanner(hu: Array, rng: np.random.Generator, sigma: float, spacing: float) -> Array:
    """Blurred image plus mildly correlated gaussian noise of standard deviation ``sigma`` HU.

    The blur is the scanner's point spread (~0.5 mm): a full 3x3 binomial at clinical pixel sizes,
    proportionally less on coarse grids, where it would otherwise smear small vessels and clots
    into their surroundings. The noise gets the 3x3 filter at every size (a reconstruction kernel's
    texture), rescaled to keep ``sigma``.
    """
    weight = np.float32(min(1.0, _PSF_MM**2 / (0.5 * spacing * spacing)))
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise *= np.float32(sigma / 0.375)
    image = _smooth(noise)
    image += hu
    if weight > 0.01:
        image += weight * (_smooth(hu) - hu)
    return image

"""Draw one axial CTPA slice of a synthetic patient: HU image, tissue map and lesion kinds.

Pure numpy. Structures are painted back to front (air, table, body, cavity, abdomen, lungs,
pulmonary vessels with emboli, airways, heart, systemic vessels, bones, lung disease). Large shapes
are evaluated over the frame, everything small only inside its own pixel window, which keeps a
512 px slice at a few milliseconds. :func:`scanner` then adds the acquisition's blur and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pe_triage.schema import Label, Tissue

from .anatomy import (
    OTHER_KINDS,
    Anatomy,
    Embolus,
    Tubes,
    cavity_mask,
    cavity_scale,
    dome_mask,
    dome_scale,
    heart_profile,
    lung_mask,
)

Array = np.ndarray
Window = tuple[slice, slice]

#: heart chambers: (centre along / across the long axis, half-axes) as fractions of the heart's
#: half-axes, the heart levels (0 = top, 1 = bottom) they occupy, and whether right heart
_CHAMBERS = (
    ((0.2, 0.35), (0.55, 0.38), (0.25, 0.95), False),  # left ventricle
    ((0.1, -0.55), (0.6, 0.35), (0.15, 0.95), True),  # right ventricle
    ((-0.6, -0.35), (0.35, 0.45), (0.2, 0.8), True),  # right atrium
    ((-0.55, 0.5), (0.4, 0.35), (0.0, 0.45), False),  # left atrium
)
#: which rib (0 = first) ends how far round the chest, as a fraction of the way to the sternum
_RIB_END = (0.9, 0.92, 0.92, 0.92, 0.92, 0.92, 0.9, 0.8, 0.7, 0.6, 0.45, 0.35)
_RIB_START = 0.1 * np.pi
_RIB_PITCH_U = 0.105


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
    rotation: float

    def to_pixel(self, xb: float, yb: float) -> tuple[float, float]:
        """Row, column of a body-frame point."""
        c, s = np.cos(self.rotation), np.sin(self.rotation)
        x = self.center[0] + c * xb - s * yb
        y = self.center[1] + s * xb + c * yb
        return (y - self.py[0]) / self.spacing, (x - self.px[0]) / self.spacing


def make_grid(an: Anatomy, size: int, spacing: float) -> Grid:
    """Grid centred on the scanner isocentre (patient x = y = 0), the patient placed by ``an``."""
    coords = (np.arange(size) - (size - 1) / 2.0) * spacing
    dx = coords[None, :] - an.center[0]
    dy = coords[:, None] - an.center[1]
    c, s = np.cos(an.rotation), np.sin(an.rotation)
    x = (c * dx + s * dy).astype(np.float32)
    y = (-s * dx + c * dy).astype(np.float32)
    return Grid(size, spacing, x, y, coords, coords, an.center, an.rotation)


@dataclass(frozen=True, eq=False)
class RenderedSlice:
    hu: Array  # float32 HU, noiseless
    tissue: Array  # uint8 Tissue codes
    kind: Array  # uint8: 1 + index into OTHER_KINDS where an other-disease lesion was painted

    @property
    def mask(self) -> Array:
        return (self.tissue == Tissue.PE) | (self.tissue == Tissue.OTHER_LESION)

    @property
    def label(self) -> Label:
        if (self.tissue == Tissue.PE).any():
            return Label.PE
        if (self.tissue == Tissue.OTHER_LESION).any():
            return Label.OTHER
        return Label.WNL

    @property
    def lesion(self) -> str:
        """The dominant lesion kind: PE wins, else the other-disease kind with most pixels."""
        if (self.tissue == Tissue.PE).any():
            return "pe"
        counts = np.bincount(self.kind[self.tissue == Tissue.OTHER_LESION], minlength=len(OTHER_KINDS) + 1)
        return OTHER_KINDS[int(np.argmax(counts[1:]))] if counts[1:].any() else "none"


class _Painter:
    def __init__(self, grid: Grid) -> None:
        n = grid.size
        self.g = grid
        self.hu = np.full((n, n), -1000.0, np.float32)
        self.tissue = np.zeros((n, n), np.uint8)
        self.kind = np.zeros((n, n), np.uint8)
        self.full: Window = (slice(0, n), slice(0, n))

    def window(self, xb: float, yb: float, radius: float) -> Window | None:
        """Pixel window holding the body-frame disc (xb, yb, radius); None when off the image."""
        i, j = self.g.to_pixel(xb, yb)
        r = radius / self.g.spacing + 1.5
        n = self.g.size
        i0, i1 = max(int(i - r), 0), min(int(i + r) + 2, n)
        j0, j1 = max(int(j - r), 0), min(int(j + r) + 2, n)
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
        w = self.window(cx, cy, max(ax, by))
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
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / ax) ** 2 + (dy / by) ** 2 <= 1.0


def render_slice(an: Anatomy, grid: Grid, z: float) -> RenderedSlice:
    """The noiseless slice at height ``z`` (mm, patient axis) of patient ``an`` on ``grid``."""
    p = _Painter(grid)
    u = float(an.u(z))
    _table(p, an)
    _body(p, an, u)
    cav = cavity_mask(an, grid.x, grid.y, z)
    p.paint(p.full, cav, an.hu_fat + 10.0, Tissue.FAT)
    _neck(p, an, u)
    _paraspinal(p, an, u)
    _abdomen(p, an, z, u, cav)
    lungs = lung_mask(an, grid.x, grid.y, z, -1) | lung_mask(an, grid.x, grid.y, z, 1)
    gradient = an.hu_lung + 40.0 * (grid.y - an.cavity_y) / an.cavity_b
    p.paint(p.full, lungs, gradient, Tissue.LUNG)
    allowed = lungs.copy()
    for hx, hy, hz in an.hila:
        if abs(hz - z) < 30.0 * an.scale:
            w = p.window(hx, hy, 22.0 * an.scale)
            if w is not None:
                x, y = p.xy(w)
                allowed[w] |= (x - hx) ** 2 + (y - hy) ** 2 <= (22.0 * an.scale) ** 2
    min_r = 0.75 * grid.spacing
    _tubes(p, an.arteries, z, allowed, an, min_r)
    _tubes(p, an.veins, z, allowed, an, min_r)
    _tubes(p, an.airways, z, allowed, an, min_r)
    _heart(p, an, z, u)
    _tubes(p, an.systemic, z, allowed, an, min_r)
    _spine(p, an, z, u)
    _ribs(p, an, u)
    _lesions(p, an, z, u)
    return RenderedSlice(p.hu, p.tissue, p.kind)


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


def _skin_ellipse(p: _Painter, an: Anatomy, u: float, inset_a: float, inset_b: float) -> Array:
    lat, ap, shift = _body_axes(an, u)
    x, y = p.g.x, p.g.y
    a = np.where(x < 0, an.body_a[0], an.body_a[1]) * lat - inset_a
    b = np.where(y < shift, an.body_b[0], an.body_b[1]) * ap - inset_b
    return (x / a) ** 2 + ((y - shift) / b) ** 2 <= 1.0


def _body(p: _Painter, an: Anatomy, u: float) -> None:
    s = an.scale
    p.paint(p.full, _skin_ellipse(p, an, u, 0.0, 0.0), an.hu_fat, Tissue.FAT)
    if an.female and 0.25 < u < 0.85:
        k = np.sin(np.pi * (u - 0.25) / 0.6)
        for side in (-1, 1):
            cx, cy = side * 68.0 * s, -an.body_b[0] + 8.0 * s
            p.ellipse(cx, cy, 55.0 * s * k, 32.0 * s * k, an.hu_fat, Tissue.FAT)
            p.ellipse(cx, cy + 6.0 * s, 30.0 * s * k, 16.0 * s * k, 25.0, Tissue.SOFT_TISSUE)
    muscle = _skin_ellipse(p, an, u, an.fat, 0.8 * an.fat)
    p.paint(p.full, muscle, an.hu_muscle, Tissue.MUSCLE)
    plane = _skin_ellipse(p, an, u, an.fat + 0.45 * an.muscle, 0.8 * an.fat + 0.45 * an.muscle)
    plane &= ~_skin_ellipse(p, an, u, an.fat + 0.45 * an.muscle + 1.5, 0.8 * an.fat + 0.45 * an.muscle + 1.5)
    plane &= p.g.y < an.cavity_y
    p.paint(p.full, plane, an.hu_fat, Tissue.FAT)


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
    s = an.scale
    y = _spine_y(an, u) + an.spine_r + 24.0 * s
    for side in (-1, 1):
        p.ellipse(side * 30.0 * s, y, 24.0 * s, 21.0 * s, an.hu_muscle, Tissue.MUSCLE)


def _abdomen(p: _Painter, an: Anatomy, z: float, u: float, cav: Array) -> None:
    """Liver under the right dome, spleen and stomach (with a gas bubble) under the left."""
    if u < min(an.dome_u) - 0.01:
        return
    x, y = p.g.x, p.g.y
    right = dome_mask(an, x, y, z, -1) & cav
    left = dome_mask(an, x, y, z, 1) & cav & ~right
    p.paint(p.full, right, an.hu_liver, Tissue.SOFT_TISSUE)
    p.paint(p.full, left & (y > an.cavity_y), an.hu_liver - 15.0, Tissue.SOFT_TISSUE)
    p.paint(p.full, left & (y <= an.cavity_y), 35.0, Tissue.SOFT_TISSUE)
    k = float(np.clip(dome_scale(an, np.float64(u), 1), 0.0, 1.0))
    if u < an.dome_u[1] + 0.3 and k > 0.2:
        s = an.scale
        keep = left & (y <= an.cavity_y)
        p.ellipse(50.0 * s, an.cavity_y - 0.5 * an.cavity_b * k, 26.0 * s * k, 14.0 * s * k, -1000.0, Tissue.AIR,
                  keep=keep)


def _tubes(p: _Painter, t: Tubes, z: float, allowed: Array, an: Anatomy, min_r: float) -> None:
    """Capsule cross-sections at z; pulmonary arteries also get their emboli."""
    if not len(t):
        return
    active = np.flatnonzero((t.z_lo <= z) & (t.z_hi >= z))
    on_piece: dict[int, list[int]] = {}
    if t is an.arteries:
        for k, e in enumerate(an.emboli):
            for piece in e.pieces:
                on_piece.setdefault(piece, []).append(k)
        active = np.union1d(active, [i for i in on_piece if t.z_lo[i] - min_r <= z <= t.z_hi[i] + min_r])
    for i in active.astype(int):
        a, b = t.a[i], t.b[i]
        r0, r1 = float(t.r0[i]), float(t.r1[i])
        if i in on_piece:
            r0, r1 = max(r0, min_r), max(r1, min_r)
        wall = float(t.wall[i])
        geo = _capsule(p, a, b, z, max(r0, r1) + wall)
        if geo is None:
            continue
        w, tt, d2, x, y = geo
        r = r0 + tt * (r1 - r0)
        lumen = d2 <= r * r
        clip = allowed[w] if t.clipped[i] else None
        if wall > 0:
            outer = d2 <= (r + wall) ** 2
            p.paint(w, outer if clip is None else outer & clip, 40.0, Tissue.SOFT_TISSUE)
        if clip is not None:
            lumen &= clip
        p.paint(w, lumen, float(t.hu[i]), int(t.tissue[i]))
        for k in on_piece.get(i, ()):
            e = an.emboli[k]
            if e.z_lo <= z <= e.z_hi:
                _embolus(p, w, x, y, z, a, b, min(r0, r1), lumen, e, min_r)


def _capsule(p: _Painter, a: Array, b: Array, z: float, rmax: float) -> tuple[Window, Array, Array, Array, Array] | None:
    """Window around the capsule's cut at z; parameter along the axis and squared axis distance."""
    d = b - a
    if abs(d[2]) > 1e-9:
        t0, t1 = sorted(((z - rmax - a[2]) / d[2], (z + rmax - a[2]) / d[2]))
        t0, t1 = max(t0, 0.0), min(t1, 1.0)
        if t0 > t1:
            return None
    else:
        t0, t1 = 0.0, 1.0
    p0, p1 = a + t0 * d, a + t1 * d
    half = 0.5 * float(np.hypot(p1[0] - p0[0], p1[1] - p0[1])) + rmax
    w = p.window(0.5 * (p0[0] + p1[0]), 0.5 * (p0[1] + p1[1]), half)
    if w is None:
        return None
    x, y = p.xy(w)
    wx, wy, wz = x - a[0], y - a[1], z - a[2]
    length2 = float(d @ d) or 1e-9
    tt = np.clip((wx * d[0] + wy * d[1] + wz * d[2]) / length2, 0.0, 1.0)
    d2 = (wx - tt * d[0]) ** 2 + (wy - tt * d[1]) ** 2 + (wz - tt * d[2]) ** 2
    return w, tt, d2, x, y


def _embolus(p: _Painter, w: Window, x: Array, y: Array, z: float, a: Array, b: Array, r_vessel: float,
             lumen: Array, e: Embolus, min_r: float) -> None:
    """Hypodense clot in the lumen: occlusive, central (rim of contrast all round) or wall-adherent."""
    if e.fraction >= 1.0:
        p.paint(w, lumen, e.hu, Tissue.PE)
        return
    r_e = min(max(e.fraction * r_vessel, min_r), r_vessel)
    d = b - a
    dn = d / (np.linalg.norm(d) or 1.0)
    v = np.asarray(e.direction)
    v = v - (v @ dn) * dn
    norm = np.linalg.norm(v)
    off = v / norm * 0.95 * (r_vessel - r_e) if norm > 1e-6 else np.zeros(3)
    a2 = a + off
    wx, wy, wz = x - a2[0], y - a2[1], z - a2[2]
    tt = np.clip((wx * d[0] + wy * d[1] + wz * d[2]) / (float(d @ d) or 1e-9), 0.0, 1.0)
    d2 = (wx - tt * d[0]) ** 2 + (wy - tt * d[1]) ** 2 + (wz - tt * d[2]) ** 2
    p.paint(w, lumen & (d2 <= r_e * r_e), e.hu, Tissue.PE)


def _heart(p: _Painter, an: Anatomy, z: float, u: float) -> None:
    k = float(heart_profile(an, np.float64(u)))
    if k <= 0.02:
        return
    hx, hy = an.heart_center
    ha, hb = an.heart_axes
    ang = an.heart_angle
    p.ellipse(hx, hy, ha * k * 1.08, hb * k * 1.08, an.hu_fat + 15.0, Tissue.FAT, ang)
    p.ellipse(hx, hy, ha * k, hb * k, 45.0, Tissue.SOFT_TISSUE, ang)
    top, bottom = an.heart_u
    t = (u - top) / (bottom - top)
    c, s = np.cos(ang), np.sin(ang)
    for (cu, cv), (au, av), (t0, t1), right in _CHAMBERS:
        if not t0 < t < t1:
            continue
        kc = k * np.sqrt(np.sin(np.pi * (t - t0) / (t1 - t0)))
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
    p.ellipse(0.0, yc, 12.5 * s, 11.0 * s, an.hu_cortex * 0.8, Tissue.BONE)
    p.ellipse(0.0, yc - 1.0 * s, 7.0 * s, 6.5 * s, 25.0, Tissue.SOFT_TISSUE)
    if not disc:
        p.bone(0.0, yc + 22.0 * s, 4.0 * s, 13.0 * s, an)
        for side in (-1, 1):
            p.bone(side * 19.0 * s, yc + 1.0 * s, 12.0 * s, 4.5 * s, an, angle=side * 0.35)


def _ribs(p: _Painter, an: Anatomy, u: float) -> None:
    """Ribs descend from the spine toward the sternum, so each slice cuts several of them."""
    s = an.scale
    k = max(float(cavity_scale(np.float64(u))), 0.55)
    ar, br = an.cavity_a * k + 5.0 * s, an.cavity_b * k + 5.0 * s
    drop = 3.2 * _RIB_PITCH_U
    for rib, end in enumerate(_RIB_END):
        alpha = _RIB_START + (u - (-0.03 + rib * _RIB_PITCH_U)) / drop * (np.pi - _RIB_START)
        if not _RIB_START <= alpha <= end * np.pi:
            continue
        cartilage = alpha > 0.8 * np.pi
        for side in (-1, 1):
            x = side * ar * np.sin(alpha)
            y = an.cavity_y + br * np.cos(alpha)
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
        alpha = 0.3 * np.pi
        for side in (-1, 1):
            x = side * (ar + 14.0 * s) * np.sin(alpha)
            y = an.cavity_y + (br + 14.0 * s) * np.cos(alpha)
            ang = float(np.arctan2(-br * np.sin(alpha), side * ar * np.cos(alpha)))
            p.ellipse(x, y, 48.0 * s * kk, 12.0 * s, an.hu_muscle, Tissue.MUSCLE, ang)
            p.ellipse(x, y, 40.0 * s * kk, 3.0 * s, an.hu_cortex * 0.75, Tissue.BONE, ang)


_OVER = {
    "consolidation": (Tissue.LUNG, Tissue.LUNG_VESSEL),
    "ggo": (Tissue.LUNG,),
    "nodule": (Tissue.LUNG, Tissue.LUNG_VESSEL),
    "effusion": (Tissue.LUNG, Tissue.LUNG_VESSEL, Tissue.AIRWAY, Tissue.OTHER_LESION),
}


def _lesions(p: _Painter, an: Anatomy, z: float, u: float) -> None:
    for blob in an.blobs:
        cx, cy, cz = blob.center
        rx, ry, rz = blob.radii
        if abs(z - cz) >= rz:
            continue
        k = np.sqrt(1.0 - ((z - cz) / rz) ** 2)
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
        inside = (dx / ax) ** 2 + (dy / by) ** 2 <= bound**2
        _paint_lesion(p, w, inside, blob.hu, blob.kind)
    for eff in an.effusions:
        if z > eff.z_top:
            continue
        depth = eff.thickness * np.sqrt(min((eff.z_top - z) / eff.ramp, 1.0))
        k = float(cavity_scale(np.float64(u)))
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


def _paint_lesion(p: _Painter, w: Window, inside: Array, hu: float, kind: str) -> None:
    inside &= np.isin(p.tissue[w], _OVER[kind])
    p.paint(w, inside, hu, Tissue.OTHER_LESION)
    np.copyto(p.kind[w], np.uint8(OTHER_KINDS.index(kind) + 1), where=inside)


def smooth(a: Array) -> Array:
    """3x3 binomial filter: the scanner's point spread at the edges of every structure."""
    q = np.pad(a, 1, mode="edge")
    v = q[:-2] + 2.0 * q[1:-1] + q[2:]
    return (v[:, :-2] + 2.0 * v[:, 1:-1] + v[:, 2:]) / 16.0


def scanner(hu: Array, rng: np.random.Generator, sigma: float) -> Array:
    """Blurred image plus mildly correlated gaussian noise of standard deviation ``sigma`` HU."""
    noise = smooth(rng.standard_normal(hu.shape, dtype=np.float32)) * np.float32(sigma / 0.375)
    return smooth(hu) + noise

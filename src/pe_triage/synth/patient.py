"""Random patients: anatomy parameters, 3D vessel and airway trees, emboli and other disease.

All randomness of one patient's body comes from the generator passed in, so a patient is fixed by
its (seed, site, patient) stream and independent of how many other patients a cohort holds.
Reference positions below are millimetres for an average adult (scale 1), body frame (see
:mod:`.anatomy`), heights as lung levels ``u``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pe_triage.config import LesionPresetName
from pe_triage.schema import Tissue

from .anatomy import AIRWAY, ARTERY, SYSTEMIC, VEIN, Anatomy, Blob, Effusion, Embolus, Tubes, lung_masks

#: emboli lengths in ``SynthConfig.pe_extent_slices`` count slices of this spacing
PE_REFERENCE_SPACING_MM = 3.0
_PROBE = np.array([1.0, 0.7, 0.4])
#: radius (mm) from which an intrapulmonary artery counts as lobar, and below which as segmental
_LOBAR_R = 3.5
_SEGMENTAL_R = 1.5


@dataclass(frozen=True)
class LesionPreset:
    """The ranges lesions are drawn from (``SynthConfig.lesions`` names one of ``LESION_PRESETS``).

    The anatomy comes from its own random stream, so for one seed presets differ in lesions only.
    """

    #: probabilities of a central, lobar and segmental embolus
    pe_locations: tuple[float, float, float]
    #: defect radius / lumen radius of non-occlusive clots
    clot_fraction: tuple[float, float]
    #: a clot runs on downstream only into arteries at least this wide (mm radius)
    clot_min_artery_r: float
    #: nodule / mass radius (mm)
    nodule_r: tuple[float, float]
    #: effusion thickness at full depth (mm, average adult)
    effusion_mm: tuple[float, float]
    ggo_hu: tuple[float, float]


LESION_PRESETS: dict[LesionPresetName, LesionPreset] = {
    #: a CTPA service's mix: a third of clots segmental, down to 5 mm nodules and thin effusions
    "realistic": LesionPreset((0.3, 0.35, 0.35), (0.4, 0.75), 0.0, (2.5, 20.0), (12.0, 40.0), (-700.0, -400.0)),
    #: every lesion plain at a glance: clots in central and lobar arteries only, filling most of the
    #: lumen; nodules from 12 mm; effusions from 25 mm; ground glass dense enough to stand out
    "conspicuous": LesionPreset((0.5, 0.5, 0.0), (0.6, 0.85), _LOBAR_R, (6.0, 20.0), (25.0, 50.0), (-550.0, -350.0)),
}


class _TubeList:
    """Accumulates capsule pieces; ``path`` chains pieces so each starts where the previous ended.

    Pieces go to the group set in ``group`` at the time they are added.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[np.ndarray, np.ndarray, float, float, float, int, int, bool, float, int]] = []
        self.group = ARTERY

    def add(self, a: np.ndarray, b: np.ndarray, r0: float, r1: float, hu: float, tissue: int,
            parent: int = -1, clipped: bool = False, wall: float = 0.0) -> int:
        self.rows.append((np.asarray(a, float), np.asarray(b, float), r0, r1, hu, tissue, parent, clipped, wall,
                          self.group))
        return len(self.rows) - 1

    def path(self, points: Sequence[np.ndarray], radii: Sequence[float], hu: float, tissue: int,
             parent: int = -1, wall: float = 0.0) -> int:
        for i in range(len(points) - 1):
            parent = self.add(points[i], points[i + 1], radii[i], radii[i + 1], hu, tissue, parent, wall=wall)
        return parent

    def build(self) -> Tubes:
        cols = list(zip(*self.rows, strict=True)) if self.rows else [()] * 10
        return Tubes(
            a=np.array(cols[0], float).reshape(-1, 3), b=np.array(cols[1], float).reshape(-1, 3),
            r0=np.array(cols[2], float), r1=np.array(cols[3], float), hu=np.array(cols[4], float),
            tissue=np.array(cols[5], np.uint8), parent=np.array(cols[6], int), clipped=np.array(cols[7], bool),
            wall=np.array(cols[8], float), group=np.array(cols[9], np.uint8),
        )


def draw_anatomy(rng: np.random.Generator, *, female: bool) -> Anatomy:
    """A normal patient: body habitus, organ sizes and positions, contrast, trees (no disease)."""

    def uni(lo: float, hi: float) -> float:  # Python floats keep the renderer's float32 grids float32
        return float(rng.uniform(lo, hi))

    s = uni(0.88, 1.12)
    s_ap = uni(0.9, 1.1)
    cavity_a = 132.0 * s * uni(0.95, 1.05)
    cavity_b = 88.0 * s * s_ap
    cavity_y = -6.0 * s
    fat = uni(6.0, 28.0) * s
    muscle = uni(9.0, 15.0) * s
    spine_r = 16.0 * s
    spine_y = cavity_y + cavity_b - 32.0 * s * s_ap
    lateral = cavity_a + muscle + fat
    anterior = cavity_b - cavity_y + muscle + 0.8 * fat
    posterior = max(cavity_y + cavity_b + 1.6 * muscle, spine_y + spine_r + 38.0 * s) + 0.8 * fat
    hu_pa = uni(280.0, 400.0)
    dome_right = uni(0.76, 0.84)
    an = Anatomy(
        center=(uni(-10.0, 10.0), 0.0),
        rotation=math.radians(uni(-4.0, 4.0)),
        z_apex=uni(-130.0, -40.0),
        lung_height=uni(215.0, 275.0) * math.sqrt(s),
        scale=s,
        scale_ap=s_ap,
        body_a=(lateral * uni(0.97, 1.03), lateral * uni(0.97, 1.03)),
        body_b=(anterior * uni(0.97, 1.03), posterior),
        fat=fat,
        muscle=muscle,
        cavity_a=cavity_a,
        cavity_b=cavity_b,
        cavity_y=cavity_y,
        female=female,
        heart_center=(uni(16.0, 28.0) * s, cavity_y - uni(24.0, 34.0) * s * s_ap),
        heart_axes=(58.0 * s * uni(0.88, 1.15), 43.0 * s * s_ap * uni(0.88, 1.15)),
        heart_angle=-0.6 + uni(-0.12, 0.12),
        heart_u=(uni(0.45, 0.5), uni(0.9, 0.96)),
        dome_u=(dome_right, dome_right + uni(0.03, 0.08)),
        spine_y=spine_y,
        spine_r=spine_r,
        vertebra_pitch=uni(24.0, 28.0) * math.sqrt(s),
        hu_fat=uni(-110.0, -85.0),
        hu_muscle=uni(40.0, 55.0),
        hu_liver=uni(60.0, 85.0),
        hu_pa=hu_pa,
        hu_systemic=uni(200.0, min(300.0, hu_pa - 40.0)),
        hu_lung=uni(-870.0, -830.0),
        hu_cortex=uni(850.0, 1000.0),
        hu_marrow=uni(300.0, 380.0),
        tubes=_TubeList().build(),
        hila=(),
    )
    return _add_tubes(an, rng)


def _add_tubes(an: Anatomy, rng: np.random.Generator) -> Anatomy:
    s, sy = an.scale, an.scale * an.scale_ap

    def p(x: float, y: float, u: float) -> np.ndarray:
        return np.array([x * s, y * sy, an.z(u)])

    u_car = rng.uniform(0.32, 0.37)
    t = _TubeList()
    blood, lung_vessel, air = int(Tissue.CONTRAST_BLOOD), int(Tissue.LUNG_VESSEL), int(Tissue.AIRWAY)
    trunk = t.path([p(24, -52, 0.53), p(18, -30, 0.43), p(16, -18, 0.40)], [14 * s, 13.5 * s, 13 * s], an.hu_pa, blood)
    rpa = t.path([p(16, -18, 0.40), p(-12, -8, 0.395), p(-38, 0, 0.41), p(-48, 4, 0.43)],
                 [11 * s, 10.5 * s, 9 * s, 8 * s], an.hu_pa, blood, parent=trunk)
    lpa = t.path([p(16, -18, 0.40), p(30, -6, 0.37), p(42, 10, 0.37), p(50, 20, 0.41)],
                 [11 * s, 10.5 * s, 9.5 * s, 8 * s], an.hu_pa, blood, parent=trunk)
    hr, hl = p(-48, 4, 0.43), p(50, 20, 0.41)
    vr, vl = p(-42, -14, 0.54), p(46, -4, 0.53)
    hu_vein = rng.uniform(170.0, an.hu_systemic)
    bronchi = []
    for side, root, parent in ((-1, hr, rpa), (1, hl, lpa)):
        first = len(t.rows)
        _grow_tree(t, rng, root, _lung_points(an, rng, side, 480), 0.55 * s, an.hu_pa, lung_vessel, parent)
        bronchi.append((first, len(t.rows), side))
    t.group = VEIN
    t.path([vr, p(-20, -6, 0.55), p(-4, 2, 0.56)], [7 * s, 7 * s, 7 * s], an.hu_systemic, blood)
    t.path([vl, p(30, 0, 0.55), p(20, 4, 0.56)], [7 * s, 7 * s, 7 * s], an.hu_systemic, blood)
    for side, root in ((-1, vr), (1, vl)):
        _grow_tree(t, rng, root, _lung_points(an, rng, side, 360), 0.6 * s, hu_vein, lung_vessel, -1)
    t.group = AIRWAY
    wall = 1.8 * s
    trachea = t.path([p(0, -20, -0.4), p(0, 4, 0.0), p(-2, 12, u_car)], [8.5 * s] * 3, -1000.0, air, wall=wall)
    t.path([p(-2, 12, u_car), p(-30, 16, u_car + 0.05)], [6.8 * s, 6.2 * s], -1000.0, air, trachea, wall=1.5 * s)
    t.path([p(-2, 12, u_car), p(34, 18, u_car + 0.09)], [6.2 * s, 5.8 * s], -1000.0, air, trachea, wall=1.5 * s)
    for first, last, side in bronchi:
        _add_bronchi(t, first, last, side, air)
    t.group = SYSTEMIC
    _systemic(t, an, rng, p)
    hila = tuple((float(h[0]), float(h[1]), float(h[2])) for h in (hr, hl, vr, vl))
    return dataclasses.replace(an, tubes=t.build(), hila=hila)


def _systemic(t: _TubeList, an: Anatomy, rng: np.random.Generator, p: Callable[[float, float, float], np.ndarray]) -> None:
    s = an.scale
    blood, soft = int(Tissue.CONTRAST_BLOOD), int(Tissue.SOFT_TISSUE)
    ao, hu_svc = an.hu_systemic, min(400.0, an.hu_pa + rng.uniform(0.0, 60.0))
    asc = t.path([p(2, -22, 0.55), p(-10, -40, 0.42), p(-12, -42, 0.3)], [15 * s] * 3, ao, blood)
    arch = t.path([p(-12, -42, 0.3), p(6, -18, 0.255), p(22, 20, 0.27)], [14 * s, 13 * s, 13 * s], ao, blood, asc)
    t.path([p(22, 20, 0.27), p(26, 34, 0.34), p(22, 36, 0.8), p(8, 34, 1.25)], [13 * s, 12 * s, 12 * s, 11 * s], ao, blood, arch)
    t.path([p(0, -28, 0.26), p(-14, -22, 0.1), p(-24, -10, -0.05), p(-28, 0, -0.4)], [7 * s, 6 * s, 5 * s, 4 * s], ao, blood)
    t.path([p(10, -20, 0.26), p(18, -8, 0.05), p(22, 0, -0.4)], [4.5 * s, 4 * s, 4 * s], ao, blood)
    t.path([p(18, 8, 0.26), p(30, 0, 0.05), p(62, -6, -0.03)], [5 * s, 5 * s, 4.5 * s], ao, blood)
    t.path([p(-34, -6, -0.4), p(-45, -20, -0.1), p(-34, -30, 0.12), p(-32, -28, 0.5), p(-30, -24, 0.56)],
           [7 * s, 7 * s, 10 * s, 10 * s, 10 * s], hu_svc, blood)
    unopacified = rng.uniform(35.0, 55.0)
    t.path([p(34, -6, -0.4), p(50, -30, 0.08), p(0, -50, 0.11), p(-34, -30, 0.13)], [6 * s] * 4, unopacified, soft)
    t.path([p(-22, 30, 1.3), p(-24, 26, 0.92), p(-24, -6, 0.86)], [12 * s] * 3, rng.uniform(60.0, 90.0), soft)
    t.path([p(4, 24, -0.4), p(6, 27, 0.4), p(10, 28, 0.9), p(22, 8, 1.15)], [6.5 * s] * 4, rng.uniform(30.0, 45.0), soft)


def _lung_points(an: Anatomy, rng: np.random.Generator, side: int, n: int) -> np.ndarray:
    """Points uniformly inside one lung (rejection sampling with the renderer's own lung shape)."""
    chunks: list[np.ndarray] = []
    count = 0
    while count < n:
        m = 4000
        x = side * rng.uniform(0.0, an.cavity_a, m)
        y = an.cavity_y + rng.uniform(-an.cavity_b, an.cavity_b, m)
        z = an.z(1.1) + rng.uniform(0.0, 1.1, m) * an.lung_height
        pts = np.stack([x, y, z], axis=1)[lung_masks(an, x, y, z)[side > 0]]
        chunks.append(pts)
        count += len(pts)
    return np.concatenate(chunks)[:n]


def _grow_tree(tubes: _TubeList, rng: np.random.Generator, root: np.ndarray, targets: np.ndarray,
               r_leaf: float, hu: float, tissue: int, parent: int) -> None:
    """Recursive bisection of target points: each piece heads for its subtree's centroid.

    Radii follow a Murray-like law of the number of leaves served, so vessels taper to the periphery.
    """
    n_nodes = len(targets)
    step = rng.uniform(0.3, 0.55, n_nodes)
    jitter = rng.normal(0.0, 1.5, (n_nodes, 3))
    split = rng.uniform(0.35, 0.65, n_nodes)
    stack = [(root, targets, parent)]
    node_index = 0
    while stack:
        node, pts, par = stack.pop()
        n = len(pts)
        r = r_leaf * n**0.47
        if n == 1:
            tubes.add(node, pts[0], r, r * 0.9, hu, tissue, par, clipped=True)
            continue
        centroid = pts.sum(axis=0) / n
        end = node + step[node_index] * (centroid - node) + jitter[node_index]
        idx = tubes.add(node, end, r, r * 0.93, hu, tissue, par, clipped=True)
        node_index += 1
        if n == 2:
            stack += [(end, pts[:1], idx), (end, pts[1:], idx)]
            continue
        d = pts - centroid
        cov = d.T @ d
        cov /= np.trace(cov) + 1e-9
        for _ in range(3):  # cov**8: its columns all point along the points' principal axis
            cov = cov @ cov
        order = np.argsort(d @ (cov @ _PROBE))
        k = min(max(round(n * split[node_index - 1]), 1), n - 1)
        stack += [(end, pts[order[:k]], idx), (end, pts[order[k:]], idx)]


def _add_bronchi(t: _TubeList, first: int, last: int, side: int, air: int) -> None:
    """Bronchi run beside the larger intrapulmonary arteries (the artery-bronchus pairs of the hilum)."""
    for a, b, r0, r1, *_ in t.rows[first:last]:
        if r0 < 2.4:
            continue
        d = b - a
        perp = np.cross(d, [0.0, 0.0, side])
        norm = np.linalg.norm(perp)
        if norm < 1e-6:
            continue
        off = perp / norm * (r0 * 2.0 + 1.5)
        t.add(a + off, b + off, r0 * 0.8, r1 * 0.8, -1000.0, air, clipped=True, wall=0.5 + 0.12 * r0)


# ---------------------------------------------------------------------------- disease


def add_emboli(an: Anatomy, rng: np.random.Generator, z_slices: np.ndarray, extent: tuple[int, int],
               pixel_mm: float, preset: LesionPreset = LESION_PRESETS["realistic"]) -> Anatomy:
    """One to three emboli (central, lobar or segmental), each over a z slab the series covers.

    Arteries carrying a clot are widened to at least 0.75 pixel in radius (a no-op at clinical
    pixel sizes), so that a clot always covers a pixel centre and its slices stay consecutive even
    on the coarse grids of tests.
    """
    tubes = an.tubes
    children: list[list[int]] = [[] for _ in range(len(tubes))]
    for i, par in enumerate(tubes.parent):
        if par >= 0:
            children[par].append(i)
    leaves = _leaf_counts(children)
    artery = tubes.group == ARTERY
    classes = {
        "central": np.flatnonzero(artery & ~tubes.clipped),
        "lobar": np.flatnonzero(artery & tubes.clipped & (tubes.r0 >= _LOBAR_R)),
        "segmental": np.flatnonzero(artery & tubes.clipped & (tubes.r0 >= _SEGMENTAL_R) & (tubes.r0 < _LOBAR_R)),
    }
    need = min(2, len(z_slices))
    emboli: list[Embolus] = []
    for _ in range(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))):
        location = str(rng.choice(["central", "lobar", "segmental"], p=list(preset.pe_locations)))
        length = rng.integers(extent[0], extent[1] + 1) * PE_REFERENCE_SPACING_MM
        embolus = None
        for attempt in range(300):
            loc = location if attempt < 200 else "central"
            start = int(rng.choice(classes[loc]))
            path = [start]
            while _z_extent(tubes, path) < length:
                kids = [k for k in children[path[-1]] if tubes.r0[k] >= preset.clot_min_artery_r]
                if not kids:
                    break
                path.append(max(kids, key=lambda k: leaves[k]) if rng.random() < 0.6 else int(rng.choice(kids)))
            lo, hi = _z_range(tubes, path)
            span = min(length, hi - lo)
            z_lo = rng.uniform(lo, hi - span)
            z_hi = z_lo + span
            if np.count_nonzero((z_slices >= z_lo) & (z_slices <= z_hi)) >= need:
                embolus = _embolus(rng, path, z_lo, z_hi, loc, preset.clot_fraction)
                break
        if embolus is not None:
            emboli.append(embolus)
    carrying = np.array(sorted({piece for e in emboli for piece in e.pieces}), int)
    r0, r1 = tubes.r0.copy(), tubes.r1.copy()
    r0[carrying] = np.maximum(r0[carrying], 0.75 * pixel_mm)
    r1[carrying] = np.maximum(r1[carrying], 0.75 * pixel_mm)
    return dataclasses.replace(an, emboli=tuple(emboli), tubes=dataclasses.replace(tubes, r0=r0, r1=r1))


def _embolus(rng: np.random.Generator, path: list[int], z_lo: float, z_hi: float, location: str,
             fraction_range: tuple[float, float]) -> Embolus:
    """Occlusive (fills the lumen), central (contrast rim all round) or eccentric (wall-adherent)."""
    style = rng.choice(["occlusive", "central", "eccentric"], p=[0.3, 0.3, 0.4])
    fraction = 1.0 if style == "occlusive" else float(rng.uniform(*fraction_range))
    direction = (0.0, 0.0, 0.0)
    if style == "eccentric":
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        direction = (float(v[0]), float(v[1]), float(v[2]))
    return Embolus(tuple(path), float(z_lo), float(z_hi), fraction, direction, float(rng.uniform(20.0, 80.0)), location)


def _leaf_counts(children: list[list[int]]) -> list[int]:
    counts = [0] * len(children)
    for i in reversed(range(len(children))):  # children always have larger indices than parents
        counts[i] = 1 if not children[i] else sum(counts[c] for c in children[i])
    return counts


def _z_range(tubes: Tubes, path: list[int]) -> tuple[float, float]:
    z = np.concatenate([tubes.a[path, 2], tubes.b[path, 2]])
    return float(z.min()), float(z.max())


def _z_extent(tubes: Tubes, path: list[int]) -> float:
    lo, hi = _z_range(tubes, path)
    return hi - lo


def add_other_disease(an: Anatomy, rng: np.random.Generator, z_slices: np.ndarray, count: int,
                      pixel_mm: float, preset: LesionPreset = LESION_PRESETS["realistic"]) -> Anatomy:
    """Consolidation, ground glass, nodules/masses and effusions placed where the series looks."""
    dz = abs(float(z_slices[1] - z_slices[0])) if len(z_slices) > 1 else 5.0
    inner = z_slices[1:-1] if len(z_slices) > 2 else z_slices
    blobs: list[Blob] = list(an.blobs)
    effusions: list[Effusion] = list(an.effusions)
    for _ in range(count):
        kind = str(rng.choice(["consolidation", "ggo", "nodule", "effusion"], p=[0.3, 0.25, 0.25, 0.2]))
        if kind == "effusion":
            side = int(rng.choice([-1, 1]))
            z_top = min(an.z(rng.uniform(0.6, 0.95)), float(inner.max()))
            z_top = max(z_top, float(z_slices.min()) + 1.5 * dz)
            effusions.append(Effusion(side, float(z_top), float(rng.uniform(*preset.effusion_mm) * an.scale),
                                      float(rng.uniform(20.0, 50.0)), float(rng.uniform(0.0, 20.0))))
            continue
        center = _lesion_center(an, rng, inner, dz)
        if kind == "nodule":
            r = max(rng.uniform(*preset.nodule_r), 1.6 * pixel_mm)
            radii = (r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15), r)
            amp, hu = 0.08, rng.uniform(0.0, 60.0)
        elif kind == "consolidation":
            radii = (rng.uniform(18.0, 45.0), rng.uniform(15.0, 40.0), rng.uniform(15.0, 45.0))
            amp, hu = 0.15, rng.uniform(-100.0, 40.0)
        else:
            radii = (rng.uniform(15.0, 40.0), rng.uniform(15.0, 40.0), rng.uniform(12.0, 35.0))
            amp, hu = 0.18, rng.uniform(*preset.ggo_hu)
        harmonics = tuple((float(rng.uniform(0.3, 1.0) * amp), float(rng.uniform(0.0, 2.0 * np.pi)),
                           float(rng.uniform(-2.0, 2.0))) for _ in range(3))
        blobs.append(Blob(kind, center, (float(radii[0]), float(radii[1]), float(radii[2])), float(hu), harmonics))
    return dataclasses.replace(an, blobs=tuple(blobs), effusions=tuple(effusions))


def _lesion_center(an: Anatomy, rng: np.random.Generator, z_slices: np.ndarray, dz: float) -> tuple[float, float, float]:
    """A point inside a lung, on (or near) a slice plane so that even a small nodule is seen."""
    for _ in range(200):
        side = int(rng.choice([-1, 1]))
        m = 400
        z = rng.choice(z_slices, m) + rng.uniform(-0.3, 0.3, m) * dz
        x = side * rng.uniform(0.0, an.cavity_a, m)
        y = an.cavity_y + rng.uniform(-an.cavity_b, an.cavity_b, m)
        inside = np.flatnonzero(lung_masks(an, x, y, z)[side > 0])
        if len(inside):
            i = inside[0]
            return float(x[i]), float(y[i]), float(z[i])
    raise RuntimeError("no lung tissue in the scanned range")

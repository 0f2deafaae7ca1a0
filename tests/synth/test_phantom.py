"""The phantom draws plausible CTPA anatomy: tissue densities, two lungs, emboli inside arteries."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from scipy import ndimage

from pe_triage.config import LesionVisibility
from pe_triage.schema import Label, Tissue
from pe_triage.synth.anatomy import ARTERY, Anatomy
from pe_triage.synth.patient import add_emboli, add_other_disease, draw_anatomy
from pe_triage.synth.phantom import RenderedSlice, make_grid, render_slice, scanner

SIZE = 96
#: visibility minima under which every lesion pixel gets its slice a label (the painting tests)
EVERY_PIXEL = LesionVisibility(pe=0.0, consolidation=0.0, ggo=0.0, nodule=0.0, effusion=0.0)

#: HU bounds every pixel of a tissue must respect on a noiseless slice
HU_RANGES = {
    Tissue.AIR: (-1000, -1000),
    Tissue.TABLE: (-200, 200),
    Tissue.FAT: (-120, -60),
    Tissue.MUSCLE: (35, 60),
    Tissue.BONE: (300, 1000),
    Tissue.CONTRAST_BLOOD: (200, 400),
    Tissue.LUNG: (-920, -780),
    Tissue.AIRWAY: (-1000, -1000),
    Tissue.SOFT_TISSUE: (20, 130),
    Tissue.PE: (20, 80),
    Tissue.LUNG_VESSEL: (150, 400),
}


def _patient(seed: int, *, female: bool = False) -> Anatomy:
    return draw_anatomy(np.random.default_rng(seed), female=female)


def _render(an: Anatomy, u: float, size: int = SIZE) -> RenderedSlice:
    fov = 2.0 * max(an.body_a) + 30.0
    return render_slice(an, make_grid(an, size, fov / size), an.z(u))


def _series(an: Anatomy, n: int = 24, spacing: float = 5.0) -> np.ndarray:
    return an.z(0.5) + (np.arange(n) - (n - 1) / 2.0) * spacing


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("u", [-0.2, 0.05, 0.3, 0.45, 0.6, 0.8, 1.0, 1.15])
def test_tissue_hu_ranges_on_noiseless_slices(seed: int, u: float) -> None:
    s = _render(_patient(seed, female=seed == 1), u)
    assert s.hu.dtype == np.float32 and s.tissue.dtype == np.uint8
    for tissue, (lo, hi) in HU_RANGES.items():
        values = s.hu[s.tissue == tissue]
        if values.size:
            assert lo - 1e-3 <= values.min(), (tissue.name, values.min())
            assert values.max() <= hi + 1e-3, (tissue.name, values.max())


def test_mid_chest_has_every_structure() -> None:
    s = _render(_patient(3), 0.5, size=192)
    for tissue in (Tissue.AIR, Tissue.TABLE, Tissue.FAT, Tissue.MUSCLE, Tissue.BONE, Tissue.CONTRAST_BLOOD,
                   Tissue.LUNG, Tissue.AIRWAY, Tissue.SOFT_TISSUE, Tissue.LUNG_VESSEL):
        assert (s.tissue == tissue).any(), tissue.name
    assert s.label(LesionVisibility()) is Label.WNL and s.lesion == "none" and not s.lesion_mask(Label.WNL).any()


@pytest.mark.parametrize("seed", [0, 4, 5])
def test_two_large_dark_lungs_inside_the_body(seed: int) -> None:
    s = _render(_patient(seed), 0.55)
    dark = s.hu < -500
    labels, n = ndimage.label(dark)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    sizes = sorted(((int((labels == k).sum()), k) for k in range(1, n + 1) if k not in border), reverse=True)
    assert len(sizes) >= 2
    (a_size, a), (b_size, b) = sizes[:2]
    assert min(a_size, b_size) > 0.04 * SIZE * SIZE
    cols = sorted(np.nonzero(labels == k)[1].mean() for k in (a, b))
    assert cols[0] < SIZE / 2 < cols[1]  # one lung each side of the midline
    body = ndimage.binary_fill_holes(s.hu > -500)
    assert body[labels == a].mean() == 1.0 and body[labels == b].mean() == 1.0


def test_ctpa_contrast_pulmonary_arteries_brightest() -> None:
    an = _patient(6)
    pa = an.tubes.hu[an.tubes.group == ARTERY]
    assert np.all(pa == an.hu_pa) and 280 <= an.hu_pa <= 400
    assert an.hu_systemic < an.hu_pa


def test_anatomy_changes_with_height_and_between_patients() -> None:
    a, b = _patient(7), _patient(8)
    levels = [_render(a, u).tissue for u in (0.1, 0.3, 0.5, 0.7, 0.9)]
    for upper, lower in itertools.pairwise(levels):
        assert (upper != lower).mean() > 0.03
    assert (_render(a, 0.5).tissue != _render(b, 0.5).tissue).mean() > 0.03
    assert (a.scale, a.lung_height, a.heart_axes) != (b.scale, b.lung_height, b.heart_axes)


def test_neighbouring_slices_move_smoothly() -> None:
    an = _patient(9)
    z = an.z(0.5)
    grid = make_grid(an, SIZE, (2.0 * max(an.body_a) + 30.0) / SIZE)
    near = (render_slice(an, grid, z).tissue != render_slice(an, grid, z + 1.0).tissue).mean()
    far = (render_slice(an, grid, z).tissue != render_slice(an, grid, z + 40.0).tissue).mean()
    assert near < 0.02 < far


def test_same_parameters_same_pixels() -> None:
    first, second = _render(_patient(10), 0.5), _render(_patient(10), 0.5)
    assert np.array_equal(first.hu, second.hu) and np.array_equal(first.tissue, second.tissue)


@pytest.mark.parametrize("seed", range(11, 17))
def test_emboli_are_hypodense_defects_inside_contrast_arteries(seed: int) -> None:
    rng = np.random.default_rng(seed)
    normal = draw_anatomy(rng, female=False)
    z = _series(normal)
    spacing = (2.0 * max(normal.body_a) + 30.0) / SIZE
    sick = add_emboli(normal, rng, z, (4, 12), spacing)
    assert 1 <= len(sick.emboli) <= 3
    grid = make_grid(normal, SIZE, spacing)
    labels = []
    for zi in z:
        with_pe = render_slice(sick, grid, zi)
        clean = render_slice(dataclasses.replace(sick, emboli=()), grid, zi)
        pe = with_pe.tissue == Tissue.PE
        labels.append(with_pe.label(EVERY_PIXEL))
        if not pe.any():
            assert labels[-1] is not Label.PE
            continue
        assert labels[-1] is Label.PE and with_pe.lesion == "pe"
        assert np.all((with_pe.hu[pe] >= 20) & (with_pe.hu[pe] <= 80))
        vessel = np.isin(clean.tissue[pe], [Tissue.CONTRAST_BLOOD, Tissue.LUNG_VESSEL])
        assert vessel.all()
        assert clean.hu[pe].min() >= 150  # without the clot these pixels are contrast-opacified vessel
        assert np.array_equal(with_pe.lesion_mask(Label.PE), pe)
    runs = "".join("P" if lab is Label.PE else "." for lab in labels)
    assert "PP" in runs  # a defect spans consecutive slices


def test_other_disease_kinds_and_densities() -> None:
    rng = np.random.default_rng(20)
    normal = draw_anatomy(rng, female=True)
    z = _series(normal)
    sick = add_other_disease(normal, rng, z, 6, pixel_mm=4.0)
    grid = make_grid(normal, SIZE, (2.0 * max(normal.body_a) + 30.0) / SIZE)
    seen: set[str] = set()
    for zi in z:
        s = render_slice(sick, grid, zi)
        lesion = s.tissue == Tissue.OTHER_LESION
        if not lesion.any():
            continue
        assert s.label(EVERY_PIXEL) is Label.OTHER and s.lesion in ("consolidation", "ggo", "nodule", "effusion")
        seen.add(s.lesion)
        kinds = s.kind[lesion]
        hu = s.hu[lesion]
        assert np.all((hu >= -860) & (hu <= 60))
        for code, (lo, hi) in ((3, (0, 60)), (4, (0, 20))):  # nodule, effusion: uniform densities
            assert np.all((hu[kinds == code] >= lo) & (hu[kinds == code] <= hi))
    assert seen


def test_lung_lesions_leave_the_contrast_in_the_vessels_they_engulf() -> None:
    """A contrast-filled artery stays bright through a consolidation or past a nodule (the CT
    angiogram sign); only a clot empties a lumen. A lesion painted over a vessel would draw a filling
    defect with no clot: PE's own sign, labelled "other"."""
    rng = np.random.default_rng(21)  # four consolidations and three nodules, no effusion
    normal = draw_anatomy(rng, female=True)
    z = _series(normal)
    sick = add_other_disease(normal, rng, z, 8, pixel_mm=4.0)
    assert not sick.effusions  # an effusion does fill the lung it compresses, vessels included
    grid = make_grid(normal, SIZE, (2.0 * max(normal.body_a) + 30.0) / SIZE)
    engulfed = 0
    for zi in z:
        clean, s = render_slice(normal, grid, zi), render_slice(sick, grid, zi)
        vessel = clean.tissue == Tissue.LUNG_VESSEL
        solid = np.isin(s.kind, [1, 3])  # consolidation, nodule (OTHER_KINDS order, 1-based)
        engulfed += int((vessel & ndimage.binary_dilation(solid, iterations=2)).sum())
        assert np.array_equal(s.tissue[vessel], clean.tissue[vessel]), "a vessel's lumen was painted over"
        assert np.array_equal(s.hu[vessel], clean.hu[vessel])
    assert engulfed > 20, "no lesion reached a vessel: the test shows nothing"


def test_scanner_noise_has_the_requested_deviation() -> None:
    flat = np.zeros((128, 128), np.float32)
    noisy = scanner(flat, np.random.default_rng(0), 18.0, spacing=0.7)
    assert noisy.dtype == np.float32
    assert 16.0 < noisy[4:-4, 4:-4].std() < 20.0
    shifted = np.corrcoef(noisy[:, :-1].ravel(), noisy[:, 1:].ravel())[0, 1]
    assert 0.2 < shifted < 0.8  # mildly correlated, like a real reconstruction kernel


def test_point_spread_is_physical_not_per_pixel() -> None:
    dot = np.zeros((33, 33), np.float32)
    dot[16, 16] = 1000.0
    quiet = np.random.default_rng(0)
    fine = scanner(dot, quiet, 0.0, spacing=0.7)
    coarse = scanner(dot, quiet, 0.0, spacing=4.0)
    assert fine[16, 16] == pytest.approx(250.0)  # a 0.7 mm pixel spreads over its neighbours
    assert coarse[16, 16] > 950.0  # a 4 mm pixel keeps (almost) all of a sub-millimetre spread

"""The dynamic lung crop on real CT (LIDC) and on the synthetic cohort; the fixed baseline."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from factories import pseudo
from scipy import ndimage as ndi

from pe_triage.dicom import decode_hu, parse_header
from pe_triage.lung_crop import Box, NoBodyError, clip, find_lung_box, fixed_box, square

OUTPUT = Path(__file__).resolve().parents[1] / "test-output"


def reference_lung_mask(hu: np.ndarray) -> np.ndarray:
    """An independent lung mask: full resolution, scipy, different rules from the pooled cv2 crop."""
    tissue = hu > -500
    labels, n = ndi.label(tissue)
    if n == 0:
        return np.zeros_like(tissue)
    body = labels == 1 + int(np.argmax(ndi.sum(tissue, labels, range(1, n + 1))))
    dark = ndi.binary_fill_holes(body) & (hu < -400)
    labels, n = ndi.label(dark)
    index = np.arange(1, n + 1)
    keep = index[(ndi.sum(dark, labels, index) >= 300) & (ndi.mean(hu, labels, index) <= -700)]
    return np.isin(labels, keep)


def outside_air(hu: np.ndarray) -> np.ndarray:
    air = hu < -900
    labels, _ = ndi.label(air)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


@pytest.fixture(scope="module")
def lidc(real_ct: Path) -> list[tuple[np.ndarray, tuple[float, float]]]:
    slices = []
    for path in sorted((real_ct / "lidc-idri-0002").glob("*.dcm")):
        data = path.read_bytes()
        header = parse_header(data, pseudo(), complete=True)
        slices.append((header.z_mm, decode_hu(data, header, padding_hu=-1000, min_hu=-1024), header.spacing))
    return [(hu, spacing) for _, hu, spacing in sorted(slices, key=lambda s: s[0])]


@pytest.mark.slow
def test_dynamic_crop_keeps_the_lungs_of_a_real_series(lidc: list[tuple[np.ndarray, tuple[float, float]]]) -> None:
    kept, air_cut, tiles = [], [], []
    for i, (hu, spacing) in enumerate(lidc):
        lung = reference_lung_mask(hu)
        found = find_lung_box(hu, spacing)
        y0, y1, x0, x1 = found.box
        if lung.sum() >= 300:  # a slice that contains lung
            assert found.lung_found or lung.sum() < 2000, f"slice {i}: {lung.sum()} lung pixels not found"
            kept.append(lung[y0:y1, x0:x1].sum() / lung.sum())
            outside = outside_air(hu)
            air_cut.append(1 - outside[y0:y1, x0:x1].sum() / outside.sum())
        if i % 26 == 0:
            tile = np.clip((hu + 1350) / 1500 * 255, 0, 255).astype(np.uint8)
            tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)
            cv2.rectangle(tile, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 255) if found.lung_found else (0, 255, 255), 3)
            tiles.append(cv2.resize(tile, (256, 256), interpolation=cv2.INTER_AREA))
    assert len(kept) > 200
    assert min(kept) >= 0.98, f"worst slice keeps {min(kept):.3f} of its lung pixels"
    assert float(np.median(air_cut)) > 0.6, f"median share of outside air cut: {np.median(air_cut):.2f}"
    OUTPUT.mkdir(exist_ok=True)
    cv2.imwrite(str(OUTPUT / "lung_crop_lidc.png"), np.vstack([np.hstack(tiles[:5]), np.hstack(tiles[5:10])]))


def test_slice_without_lung_falls_back_to_the_body() -> None:
    yy, xx = np.mgrid[:256, :256]
    hu = np.where((yy - 128) ** 2 / 80**2 + (xx - 128) ** 2 / 110**2 < 1, 40, -1000).astype(np.int16)  # abdomen-like
    found = find_lung_box(hu, (0.8, 0.8))
    assert not found.lung_found
    y0, y1, x0, x1 = found.box
    assert y0 <= 48 and y1 >= 208 and x0 <= 18 and x1 >= 238


def test_empty_slice_has_no_body() -> None:
    with pytest.raises(NoBodyError):
        find_lung_box(np.full((128, 128), -1000, np.int16), (1.0, 1.0))


def test_table_and_outside_air_are_not_lung() -> None:
    yy, xx = np.mgrid[:256, :256]
    hu = np.full((256, 256), -1000, np.int16)
    body = (yy - 120) ** 2 / 70**2 + (xx - 128) ** 2 / 100**2 < 1
    hu[body] = 40
    lungs = ((yy - 115) ** 2 / 40**2 + (xx - 85) ** 2 / 30**2 < 1) | ((yy - 115) ** 2 / 40**2 + (xx - 171) ** 2 / 30**2 < 1)
    hu[lungs] = -850
    hu[215:222, 20:236] = 100  # the table, below the body
    found = find_lung_box(hu, (1.0, 1.0))
    assert found.lung_found
    y0, y1, x0, x1 = found.box
    assert y1 < 215  # the table stays out
    assert lungs[y0:y1, x0:x1].sum() == lungs.sum()


def test_box_helpers() -> None:
    assert square(Box(10, 20, 0, 40)) == Box(-5, 35, 0, 40)
    assert clip(Box(-5, 35, 0, 40), 30, 50) == Box(0, 30, 0, 40)
    assert fixed_box(400, 400) == Box(110, 290, 50, 350)  # the study's 300x180 of 400x400

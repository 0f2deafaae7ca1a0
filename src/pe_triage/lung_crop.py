"""Crop boxes for a CT slice: the study's dynamic lung crop, a per-series union, a fixed baseline.

The lung box is found on a 4x pooled grid (PERF-NOTES: full-resolution labelling is ~50x
slower). Tissue is max-pooled, so a thin body wall stays closed and the air outside cannot leak
into the lungs; HU is mean-pooled (Gaussian pyramid), so a lung block stays dark despite its
vessels. The lungs are the large dark regions inside the body, which excludes the air around
the patient, the table (not part of the body component) and pure-air bowel gas (darker than
aerated lung).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from pe_triage.config import CropConfig

#: HU above which a pixel is tissue (skin, fat, muscle, bone, blood); blankets, cables and the
#: table mattress (-900..-600) are not, so they cannot enclose air that would pass for lung
TISSUE_HU = -500
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


class Box(NamedTuple):
    """Half-open pixel box [y0, y1) x [x0, x1)."""

    y0: int
    y1: int
    x0: int
    x1: int

    def union(self, other: Box) -> Box:
        return Box(min(self.y0, other.y0), max(self.y1, other.y1), min(self.x0, other.x0), max(self.x1, other.x1))


class NoBodyError(ValueError):
    """The slice holds no patient (an empty table slice, air only)."""


@dataclass(frozen=True)
class LungBox:
    box: Box
    lung_found: bool  # False: no lung in the slice (neck, abdomen), the body box is used


def _pool(image: np.ndarray, f: int) -> np.ndarray:
    """Mean HU downsampled by ``f`` (1, 2 or 4) with Gaussian pyramid steps: twice as fast as an
    area resize of int16 here, and a weighted mean over each block and its border."""
    for _ in range(f.bit_length() - 1):
        image = cv2.pyrDown(image)
    return image


def _pool_factor(rows: int, cols: int) -> int:
    return 4 if min(rows, cols) >= 256 else 2 if min(rows, cols) >= 96 else 1


def _tissue(hu: np.ndarray, f: int, small: tuple[int, int]) -> np.ndarray:
    """uint8 mask of the pooled blocks that hold any tissue: the tissue mask max-pooled over exactly
    each block (a wider footprint would thicken cables and blanket folds into rings that enclose
    air). A block holds tissue when its highest HU does, so where the blocks tile the slice the
    pooling is a dilation of the HU sampled once per block: the same mask as area-resizing the
    thresholded slice, ~2x faster."""
    rows, cols = hu.shape
    if rows % f or cols % f:
        above = cv2.compare(hu, TISSUE_HU, cv2.CMP_GT)  # type: ignore[call-overload]  # cv2's stubs omit a scalar src2
        return (cv2.resize(above, small, interpolation=cv2.INTER_AREA) > 0).view(np.uint8)
    top = cv2.dilate(hu, np.ones((f, f), np.uint8), anchor=(f - 1, f - 1)) if f > 1 else hu
    return (top[f - 1 :: f, f - 1 :: f] > TISSUE_HU).view(np.uint8)


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, pixels per label) of a uint8 mask: labelling without cv2's per-pixel statistics and
    counting with bincount is ~2x faster than ``connectedComponentsWithStats`` at this size."""
    n, labels = cv2.connectedComponents(mask, connectivity=connectivity, ltype=cv2.CV_32S)
    return labels, np.bincount(labels.ravel(), minlength=n)


def _bounds(mask: np.ndarray) -> Box:
    x, y, w, h = cv2.boundingRect(mask)
    return Box(y, y + h, x, x + w)


def find_lung_box(hu: np.ndarray, spacing_mm: tuple[float, float], config: CropConfig = CropConfig()) -> LungBox:
    """Lung bounding box (plus margin) of one axial HU slice, or the body box when it has no lung."""
    rows, cols = hu.shape
    f = _pool_factor(rows, cols)
    mean_hu = _pool(hu, f)
    tissue = _tissue(hu, f, (mean_hu.shape[1], mean_hu.shape[0]))

    # flood the non-tissue from a 1-pixel frame: what it reaches is the air around the patient
    framed = cv2.copyMakeBorder(tissue, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(framed, None, (0, 0), 2)
    labels, areas = _components((framed[1:-1, 1:-1] != 2).view(np.uint8), connectivity=4)
    if len(areas) <= 1:
        raise NoBodyError("no body in the slice")
    body = (labels == 1 + int(np.argmax(areas[1:]))).view(np.uint8)
    body_box = _scale(_bounds(body), f, rows, cols)

    # blocks on the body outline are half air: erode one block so the outline cannot pass for lung
    dark = cv2.bitwise_and(cv2.erode(body, _CROSS), (mean_hu < config.lung_hu).view(np.uint8))
    labels, areas = _components(dark, connectivity=8)
    min_blocks = config.min_lung_area_mm2 / (f * f * spacing_mm[0] * spacing_mm[1])
    lo, hi = config.lung_mean_hu
    box = None
    for i in np.flatnonzero(areas[1:] >= min_blocks) + 1:
        region = (labels == i).view(np.uint8)
        if lo <= cv2.mean(mean_hu, mask=region)[0] <= hi:
            found = _bounds(region)
            box = found if box is None else box.union(found)
    if box is None:
        return LungBox(body_box, lung_found=False)
    box = _scale(box, f, rows, cols)
    margin = (round(config.margin_mm / spacing_mm[0]), round(config.margin_mm / spacing_mm[1]))
    box = Box(box.y0 - margin[0], box.y1 + margin[0], box.x0 - margin[1], box.x1 + margin[1])
    if config.square:
        box = square(box)
    return LungBox(clip(box, rows, cols), lung_found=True)


def _scale(box: Box, f: int, rows: int, cols: int) -> Box:
    return Box(box.y0 * f, min(box.y1 * f, rows), box.x0 * f, min(box.x1 * f, cols))


def square(box: Box) -> Box:
    """Grow the shorter side symmetrically to the longer one."""
    h, w = box.y1 - box.y0, box.x1 - box.x0
    if h > w:
        d = h - w
        return Box(box.y0, box.y1, box.x0 - d // 2, box.x1 + d - d // 2)
    d = w - h
    return Box(box.y0 - d // 2, box.y1 + d - d // 2, box.x0, box.x1)


def clip(box: Box, rows: int, cols: int) -> Box:
    """Keep the box inside the image, shifting before shrinking so a square box stays square."""
    h, w = min(box.y1 - box.y0, rows), min(box.x1 - box.x0, cols)
    y0 = min(max(box.y0, 0), rows - h)
    x0 = min(max(box.x0, 0), cols - w)
    return Box(y0, y0 + h, x0, x0 + w)


def fixed_box(rows: int, cols: int, height_fraction: float = 180 / 400, width_fraction: float = 300 / 400) -> Box:
    """The study's baseline: a centred 300x180 crop of a 400x400 image, as fractions of any size."""
    h, w = round(rows * height_fraction), round(cols * width_fraction)
    y0, x0 = (rows - h) // 2, (cols - w) // 2
    return Box(y0, y0 + h, x0, x0 + w)


def crop_resize(hu: np.ndarray, box: Box, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Crop and resize the int16 slice to ``size`` x ``size`` (int16 HU: no float copy of the crop;
    area averaging when shrinking, bilinear when enlarging)."""
    patch = hu[box.y0 : box.y1, box.x0 : box.x1]
    shrink = patch.shape[0] >= size and patch.shape[1] >= size
    return cv2.resize(patch, (size, size), dst=out, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

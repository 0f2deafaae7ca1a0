"""HU histogram summary of a study for prediction monitoring (issue 23 item 3): the fractions of the
pixels inside each sampled slice's lung crop per fixed 100-HU bin, and the median HU of its soft
tissue (-450..450 HU: fat, water, muscle, contrast blood), which moves with a calibration offset while
the median of all pixels jumps between the air/lung and the tissue mode as their shares change.

One definition for both sides of the drift report: ``predict`` summarises its input's slices (the
slices file ingest just wrote, before preprocessing reads it), and the report's reference summarises
the champion's training studies in the slices store. A miscalibrated scanner (water not at 0 HU) or
another kernel moves mass between bins; the lung crop keeps most of the air around the patient,
whose share depends on the field of view, out of the comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

from pe_triage import schema as S
from pe_triage.config import CropConfig
from pe_triage.lung_crop import NoBodyError, find_lung_box
from pe_triage.storage import Location

#: bin edges: 100 HU wide and centred on the hundreds, so that air (-1000) and water (0) sit mid-bin
#: and their noise does not straddle an edge; open at both ends (air and padding below -950; bone,
#: dense contrast and metal above 950). Every pixel counts: a cut-off would let an offset move air in
EDGES = np.array([-np.inf, *range(-950, 1000, 100), np.inf], float)
BINS = len(EDGES) - 1
#: the bins of the soft tissue, centred on -400..400 HU (bin k is centred on -1000 + 100 k)
TISSUE = slice(6, 15)
#: slices per series that are summarised, spread evenly over the file: tens of thousands of pixels
#: from the apex to the base, at a cost small next to the model's
SLICES = 8
#: every n-th pixel of the crop along each axis (a 300-pixel crop still gives > 20k pixels a slice)
STRIDE = 2


class HuSummary(NamedTuple):
    """Pixel counts per bin (so summaries of several slices and series add up)."""

    counts: np.ndarray

    def fractions(self) -> list[float] | None:
        total = float(self.counts.sum())
        return [float(c) / total for c in self.counts] if total else None

    def median(self) -> float | None:
        return median_hu(self.counts) if self.counts[TISSUE].sum() else None


EMPTY = HuSummary(np.zeros(BINS))


def median_hu(mass: np.ndarray) -> float:
    """The median HU of the soft-tissue bins' masses, interpolated within its bin."""
    tissue = np.asarray(mass, float)[TISSUE]
    cumulative = np.cumsum(tissue) / tissue.sum()
    i = int(np.searchsorted(cumulative, 0.5))
    below = cumulative[i - 1] if i else 0.0
    share = (0.5 - below) / (cumulative[i] - below) if cumulative[i] > below else 0.0
    return round(float(-1050 + 100 * (TISSUE.start + i) + 100 * share), 1)


def slice_summary(hu: np.ndarray, spacing: tuple[float, float], crop: CropConfig) -> HuSummary:
    """One slice's pixels inside its lung crop (the body box when it has no lung; nothing without a body)."""
    try:
        box = find_lung_box(hu, spacing, crop).box
    except NoBodyError:
        return EMPTY
    pixels = hu[box.y0:box.y1:STRIDE, box.x0:box.x1:STRIDE].ravel()
    return HuSummary(np.histogram(pixels, EDGES)[0].astype(float))


def series_summary(loc: Location, path: str, crop: CropConfig, *, slices: int = SLICES) -> HuSummary:
    """:func:`slice_summary` of up to ``slices`` slices of one slices-dataset file (``path`` under
    ``loc``), reading only the row groups that hold them."""
    with loc.fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        n = parquet.metadata.num_rows
        if not n:
            return EMPTY
        picks = set(np.linspace(0, n - 1, min(slices, n)).round().astype(int).tolist())
        bounds = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        groups = sorted({int(np.searchsorted(bounds, p, side="right") - 1) for p in picks})
        table = parquet.read_row_groups(groups, columns=[S.ROWS, S.COLS, S.PIXEL_SPACING_ROW, S.PIXEL_SPACING_COL, S.HU])
    positions = [p for g in groups for p in range(int(bounds[g]), int(bounds[g + 1]))]
    total = EMPTY
    for position, row in zip(positions, table.to_pylist(), strict=True):
        if position in picks:
            hu = S.decode_hu(row[S.HU], row[S.ROWS], row[S.COLS])
            one = slice_summary(hu, (float(row[S.PIXEL_SPACING_ROW]), float(row[S.PIXEL_SPACING_COL])), crop)
            total = HuSummary(total.counts + one.counts)
    return total


def summarise(loc: Location, paths: Sequence[str], crop: CropConfig) -> HuSummary:
    """The summaries of several series files added up (one input of ``predict``, or one study)."""
    return HuSummary(sum((series_summary(loc, path, crop).counts for path in paths), np.zeros(BINS)))

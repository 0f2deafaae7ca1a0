"""HU windows: pure array functions, MONAI-style (no I/O, no state).

A window maps an HU range linearly onto 0..255 for storage; the loader maps the stored byte back
to a zero-centred float in [-1, 1] for the network. The linear map is recorded with the data, so
a stored byte always has one meaning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Window:
    """An HU range [lo, hi]; build from (level, width) with :meth:`from_level_width`."""

    name: str
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not self.hi > self.lo:
            raise ValueError(f"window {self.name!r}: upper bound {self.hi} must exceed lower bound {self.lo}")

    @classmethod
    def from_level_width(cls, name: str, level: float, width: float) -> Window:
        return cls(name, level - width / 2, level + width / 2)

    @property
    def level(self) -> float:
        return (self.lo + self.hi) / 2

    @property
    def width(self) -> float:
        return self.hi - self.lo

    def to_dict(self) -> dict[str, Any]:
        """The stored form, ``{"name", "lo", "hi"}``: windows dataset file metadata and ``model.json``."""
        return {"name": self.name, "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> Window:
        """The inverse of :meth:`to_dict` (bounds kept as stored, so a round trip writes the same JSON)."""
        return cls(str(stored["name"]), stored["lo"], stored["hi"])


def window_channels(available: Sequence[Window], wanted: Sequence[str | Window]) -> list[int]:
    """Indices, in the order of ``wanted``, of its windows in a stack whose channels are ``available``.

    A name picks the window of that name. A :class:`Window` (a model's) must also have the same
    bounds: a stored byte means another HU under another definition, which the model never saw.
    """
    names = [w.name for w in available]
    if isinstance(wanted, str) or not wanted:
        raise ValueError(f"the windows wanted must be a non-empty list of window names from {names}, got {wanted!r}")
    wanted_names = [w if isinstance(w, str) else w.name for w in wanted]
    unknown = [n for n in wanted_names if n not in names]
    if unknown:
        raise ValueError(f"unknown window(s) {unknown}; available windows: {names}")
    if len(set(wanted_names)) != len(wanted_names):
        raise ValueError(f"a window is wanted twice: {wanted_names}")
    channels = [names.index(n) for n in wanted_names]
    for w, c in zip(wanted, channels, strict=True):
        if isinstance(w, Window) and available[c] != w:
            raise ValueError(f"window {w.name!r} is defined differently: {w.lo:g}..{w.hi:g} HU wanted, "
                             f"{available[c].lo:g}..{available[c].hi:g} HU available")
    return channels


#: the study's windows as printed (vascular 0..650, mediastinal 40..400, lung -400..1500), the wider
#: lung range its text names, and the common clinical presets
PRESETS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("vascular", 0, 650),
        Window("mediastinal", 40, 400),
        Window("lung", -400, 1500),
        Window("lung_wide", -1000, 1600),
        Window.from_level_width("clinical_lung", -600, 1500),
        Window.from_level_width("clinical_pe", 100, 700),
        Window.from_level_width("clinical_mediastinal", 40, 400),
    )
}


def window_to_uint8(hu: np.ndarray, window: Window, out: np.ndarray | None = None) -> np.ndarray:
    """HU (any real dtype) -> uint8, lo -> 0 and hi -> 255, clipped, rounded to nearest."""
    scale = np.float32(255.0 / window.width)
    tmp = np.subtract(hu, np.float32(window.lo), dtype=np.float32)
    tmp *= scale
    np.clip(tmp, 0, 255, out=tmp)
    tmp += np.float32(0.5)
    if out is None:
        return tmp.astype(np.uint8)
    np.copyto(out, tmp, casting="unsafe")
    return out


def uint8_to_centred(stored: np.ndarray) -> np.ndarray:
    """Stored window bytes -> float32 in [-1, 1], zero at the window's centre (the study's normalisation)."""
    out = stored.astype(np.float32)
    out *= np.float32(2.0 / 255.0)
    out -= np.float32(1.0)
    return out


def neighbour_rows(series: np.ndarray, position: np.ndarray, context: int) -> np.ndarray:
    """Rows ``[N, 2 * context + 1]``: for each slice, itself and its ``context`` nearest slices on each
    side along z within its own series (``series`` any per-row key, ``position`` the order along z).

    A clot is a filling defect that persists along a vessel over several slices, a nodule is a ball:
    one slice cannot tell them apart, its neighbours can. At a series' ends the end slice stands in
    for the missing neighbours (replicate padding: no fabricated anatomy, no zeros the model never
    sees inside a series). Neighbours are the series' own adjacent slices, at its own spacing.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0 slices on each side, got {context}")
    series, position = np.asarray(series), np.asarray(position)
    if series.shape != position.shape or series.ndim != 1:
        raise ValueError(f"series {series.shape} and position {position.shape} must be equal 1-D shapes")
    n = len(series)
    if context == 0 or n == 0:
        return np.arange(n, dtype=np.int64)[:, None]
    _, series_id = np.unique(series, return_inverse=True)
    order = np.lexsort((position, series_id))  # rows by series, then along z
    sorted_series = series_id[order]
    starts = np.searchsorted(sorted_series, sorted_series, side="left")
    ends = np.searchsorted(sorted_series, sorted_series, side="right") - 1
    offsets = np.arange(-context, context + 1)
    at = np.clip(np.arange(n)[:, None] + offsets[None, :], starts[:, None], ends[:, None])
    out = np.empty((n, len(offsets)), np.int64)
    out[order] = order[at]
    return out


def context_stack(stack: np.ndarray, rows: np.ndarray, channels: Sequence[int] | None = None) -> np.ndarray:
    """uint8 ``[P, C, H, W]`` slices and ``rows`` ``[N, D]`` (from :func:`neighbour_rows`) -> the model
    input ``[N, C' * D, H, W]`` of the ``channels`` chosen (default: all), window-major: all D slices of
    the first window, then of the next (a branch per window keeps its window's slices together)."""
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"rows must be [N, slices], got shape {rows.shape}")
    n, depth = rows.shape
    gathered = np.asarray(stack[rows.reshape(-1)])
    if channels is not None:
        gathered = gathered[:, list(channels)]
    if depth == 1:
        return gathered
    _, c, height, width = gathered.shape
    gathered = gathered.reshape(n, depth, c, height, width)
    return np.ascontiguousarray(gathered.transpose(0, 2, 1, 3, 4)).reshape(n, c * depth, height, width)

"""The windows dataset as a random-access torch ``Dataset`` for one split, fold and stage.

Parquet is built for scans, not for the random access of shuffled training, so the selected slices
are read once, sequentially by row group and only the row groups that hold selected slices, and
their selected window channels are materialised into one uint8 ``.npy`` memmap ``[N, C, H, W]``.
Items are then a page-cache read plus a float conversion, and DataLoader workers share the file:
a worker reopens the memmap by path (the pickled dataset carries no pixels).

Randomness (augmentation) comes from torch's global RNG. DataLoader seeds each worker from its base
seed, itself drawn from the main process's RNG (or the DataLoader's ``generator``), so a run is
reproducible after ``torch.manual_seed`` for a given ``num_workers``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, WeightedRandomSampler

from pe_triage import schema as S
from pe_triage.config import LoaderConfig
from pe_triage.windows import Window, context_stack, neighbour_rows, uint8_to_centred, window_channels

#: per-slice keys kept as ``WindowsDataset.index`` (evaluation groups slices by patient and series)
INDEX_COLUMNS = [S.SITE, S.PATIENT_ID, S.SERIES_UID, S.SLICE_INDEX, S.LABEL]
TARGET = "target"
#: the target of an indeterminate slice (kept only on request, for evaluation): it has none
NO_TARGET = -1
_KNOWN_LABELS = pa.array([label.value for label in S.Label])
_INDETERMINATE = S.Label.INDETERMINATE.value
_KEY_SEP = "\x1f"
#: key column marking the rows of the materialised slices that are items (the rest: neighbours only)
_ITEM = "_item"


@dataclass(frozen=True)
class _FileSelection:
    """The rows of one file to materialise: a mask over the rows of the row groups that hold any."""

    path: str
    row_groups: tuple[int, ...]
    mask: np.ndarray
    batch_rows: int


def _targets(labels: np.ndarray, stage: int) -> np.ndarray:
    """1 for the stage's positive labels, 0 for its negative ones (``schema.STAGES``); indeterminate: NO_TARGET."""
    positive = np.isin(labels, S.STAGES[stage].positive_labels)
    return np.where(labels == _INDETERMINATE, NO_TARGET, positive.astype(np.int64))


def _split_keys(splits: str, fold: str, split: str) -> pa.Array:
    """``site<US>patient_id`` of the patients of one split of one fold."""
    table = pq.read_table(splits, columns=[S.FOLD, S.SPLIT, S.SITE, S.PATIENT_ID])
    folds = sorted(set(table[S.FOLD].to_pylist()))
    if fold not in folds:
        raise ValueError(f"fold {fold!r} not in splits file {splits}; folds: {folds}")
    chosen = table.filter(pc.and_(pc.equal(table[S.FOLD], fold), pc.equal(table[S.SPLIT], split)))
    return pc.binary_join_element_wise(chosen[S.SITE], chosen[S.PATIENT_ID], _KEY_SEP)


def _window_defs(pf: pq.ParquetFile, path: str) -> list[Window]:
    raw = (pf.schema_arrow.metadata or {}).get(S.META_WINDOWS.encode())
    if raw is None:
        raise ValueError(f"{path}: no {S.META_WINDOWS!r} file metadata (not a windows dataset file?)")
    return [Window.from_dict(d) for d in json.loads(raw)]


def _copy_selected(sel: _FileSelection, out: np.ndarray, channels: list[int]) -> None:
    """Stream one file's selected row groups (window column only) into ``out``: selected rows, channels."""
    start = pos = 0
    parquet = pq.ParquetFile(sel.path)
    shape = S.windows_shape(parquet.schema_arrow.field(S.WINDOWS))
    batches = parquet.iter_batches(batch_size=sel.batch_rows, row_groups=list(sel.row_groups), columns=[S.WINDOWS])
    for batch in batches:
        rows = np.flatnonzero(sel.mask[start : start + batch.num_rows])
        start += batch.num_rows
        if rows.size:
            stack = S.windows_stack(batch.column(0), shape)
            for j, c in enumerate(channels):
                out[pos : pos + rows.size, j] = stack[rows, c]
            pos += rows.size
    if pos != len(out):
        raise RuntimeError(f"{sel.path}: read {pos} selected slices, planned {len(out)} (file changed while reading?)")


def _remove(folder: str, owner_pid: int) -> None:
    """Remove the cache folder, but only from the process that made it (forked workers inherit finalizers)."""
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


def _pixel_centres(n: int) -> torch.Tensor:
    """Pixel centres in grid_sample's normalised coordinates (align_corners=False)."""
    return (torch.arange(n, dtype=torch.float32) * 2 + 1) / n - 1


def augment(x: torch.Tensor, config: LoaderConfig, generator: torch.Generator | None = None, *,
            slices_per_window: int = 1) -> torch.Tensor:
    """Light, anatomy-preserving augmentation of one centred image ``[C, H, W]`` in [-1, 1].

    One affine resample (shift up to ``max_shift`` of the side, zoom within ``1 ± max_scale``) with
    the window minimum (-1, air) filling what enters from outside; per-window contrast and brightness
    change up to ``intensity_jitter`` (small window level/width differences between scanners);
    horizontal flip only when ``config.hflip`` (the chest is not left-right symmetric). The
    ``slices_per_window`` channels of one window (2.5-D input) get the same change.
    """
    _, height, width = x.shape
    channels = x.shape[0] // slices_per_window
    u = torch.rand(4 + 2 * channels, generator=generator) * 2 - 1
    zoom, shift_x, shift_y, flip = u[:4].tolist()
    if config.max_shift or config.max_scale:
        # zoom and shift only: the sampling grid is separable, cheaper to build than affine_grid's
        inverse_zoom = 1.0 / (1.0 + config.max_scale * zoom)
        xs = _pixel_centres(width) * inverse_zoom + 2.0 * config.max_shift * shift_x  # normalised side = 2
        ys = _pixel_centres(height) * inverse_zoom + 2.0 * config.max_shift * shift_y
        grid = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width)], dim=-1).unsqueeze(0)
        x = F.grid_sample((x + 1).unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] - 1
    jitter = config.intensity_jitter
    contrast = (1 + jitter * u[4 : 4 + channels]).repeat_interleave(slices_per_window).view(-1, 1, 1)
    brightness = (jitter * u[4 + channels :]).repeat_interleave(slices_per_window).view(-1, 1, 1)
    x = (x * contrast + brightness).clamp_(-1, 1)
    if config.hflip and flip > 0:
        x = x.flip(-1)
    return x


class WindowsDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Slices of one split of one fold for one stage: ``(x float32 [C, H, W] in [-1, 1], y int64)``.

    Stage 1 takes every labelled slice (target 1 = disease, pe or other); stage 2 takes disease
    slices only (target 1 = pe, 0 = other). Unlabelled slices never enter. Indeterminate slices have
    no target: they are left out and counted in ``excluded_indeterminate``, unless
    ``keep_indeterminate`` (evaluation: a patient's decision reads all its slices), which adds them
    with target ``NO_TARGET``. ``windows_used`` picks and orders the channels by window name (e.g.
    ``["vascular", "lung"]`` for DWL).

    ``context`` > 0 gives each item its neighbouring slices (``windows.neighbour_rows``): every slice
    of the split's patients is materialised once, whatever its label, and an item's input is
    gathered from its series' rows (``rows``), not stored again per item.

    Construction materialises the selection into a memmap under ``config.cache_dir`` (default: the
    system temp folder), in a folder of its own that :meth:`close`, the context manager exit or
    garbage collection removes. ``index`` holds the keys of item ``i`` in row ``i``.
    """

    def __init__(
        self,
        windows: str,
        splits: str,
        *,
        split: str,
        stage: int,
        windows_used: Sequence[str],
        fold: str = S.DEFAULT_FOLD,
        config: LoaderConfig = LoaderConfig(),
        train: bool = False,
        keep_indeterminate: bool = False,
        context: int = 0,
    ) -> None:
        if stage not in S.STAGES:
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        if split not in S.SPLITS:
            raise ValueError(f"split must be one of {list(S.SPLITS)}, got {split!r}")
        self.split, self.stage, self.fold, self.config, self.train = split, stage, fold, config, train
        self.keep_indeterminate, self.context = keep_indeterminate, context
        #: indeterminate slices of the split's patients that were left out (0 with keep_indeterminate)
        self.excluded_indeterminate = 0
        files = sorted(pads.dataset(windows, format="parquet", partitioning="hive").files)
        if not files:
            raise ValueError(f"windows dataset {windows!r} has no Parquet files")
        defs, shape, selections, keys = self._plan(files, _split_keys(splits, fold, split))
        channels = window_channels(defs, windows_used)
        self.windows: tuple[Window, ...] = tuple(defs[c] for c in channels)
        self.window_names: tuple[str, ...] = tuple(w.name for w in self.windows)
        if not pc.sum(keys[_ITEM]).as_py():
            raise ValueError(
                f"no slices for split {split!r} of fold {fold!r}, stage {stage} "
                f"(labels {list(S.STAGES[stage].labels)}) in {windows!r}"
            )
        pooled = keys.drop_columns([_ITEM]).to_pandas()
        items = keys[_ITEM].to_numpy(zero_copy_only=False)
        series = (pooled[S.SITE] + _KEY_SEP + pooled[S.SERIES_UID]).to_numpy()
        #: per item, the materialised rows of its input: itself and its neighbours ``[N, 2 * context + 1]``
        self.rows: np.ndarray = neighbour_rows(series, pooled[S.SLICE_INDEX].to_numpy(), context)[items]
        self.index: pd.DataFrame = pooled[items].reset_index(drop=True)
        self.targets: np.ndarray = _targets(self.index[S.LABEL].to_numpy(), stage)
        self.index[TARGET] = self.targets
        self.stored_shape: tuple[int, int, int, int] = (keys.num_rows, len(channels), shape[1], shape[2])
        #: one item's input stack: ``[N, windows x (2 * context + 1), H, W]``
        self.shape: tuple[int, int, int, int] = (len(self.index), len(channels) * (2 * context + 1), shape[1], shape[2])
        if config.cache_dir:
            os.makedirs(config.cache_dir, exist_ok=True)
        self.cache_folder = tempfile.mkdtemp(prefix="pe-triage-windows-", dir=config.cache_dir)
        self._finalizer: weakref.finalize[Any, Any] | None = weakref.finalize(self, _remove, self.cache_folder, os.getpid())
        self.path = os.path.join(self.cache_folder, "windows.npy")
        self._array: np.ndarray | None = None
        self._closed = False
        try:
            self._materialise(selections, channels)
        except BaseException:
            self.close()
            raise

    def _plan(self, files: list[str], patients: pa.Array) -> tuple[list[Window], list[int], list[_FileSelection], pa.Table]:
        """Read the key columns of every file; choose the rows (and so the row groups) to materialise."""
        first = pq.ParquetFile(files[0])
        defs, shape = _window_defs(first, files[0]), list(S.windows_shape(first.schema_arrow.field(S.WINDOWS)))
        if len(defs) != shape[0]:
            raise ValueError(f"{files[0]}: {len(defs)} window definitions for {shape[0]} stored windows")
        labels = pa.array([*S.STAGES[self.stage].labels, *([_INDETERMINATE] if self.keep_indeterminate else [])])
        selections, key_tables = [], []
        for path in files:
            pf = pq.ParquetFile(path)
            if (file_defs := _window_defs(pf, path)) != defs:
                raise ValueError(f"window definitions differ between files: {files[0]} has {defs}, {path} has {file_defs}")
            if (file_shape := list(S.windows_shape(pf.schema_arrow.field(S.WINDOWS)))) != shape:
                raise ValueError(f"window tensor shape differs between files: {files[0]} has {shape}, {path} has {file_shape}")
            keys = pf.read(columns=INDEX_COLUMNS)
            unknown = pc.and_(pc.is_valid(keys[S.LABEL]), pc.invert(pc.is_in(keys[S.LABEL], value_set=_KNOWN_LABELS)))
            if pc.any(unknown).as_py():
                raise ValueError(f"{path}: unknown label(s) {sorted(set(pc.filter(keys[S.LABEL], unknown).to_pylist()))}")
            patient = pc.binary_join_element_wise(keys[S.SITE], keys[S.PATIENT_ID], _KEY_SEP)
            in_split = pc.is_in(patient, value_set=patients)
            item = pc.and_(pc.is_in(keys[S.LABEL], value_set=labels), in_split)
            if not self.keep_indeterminate:
                left_out = pc.and_(in_split, pc.equal(keys[S.LABEL], _INDETERMINATE))
                self.excluded_indeterminate += pc.sum(left_out).as_py() or 0
            mask = in_split if self.context else item
            selected = mask.to_numpy(zero_copy_only=False)
            if not selected.any():
                continue
            bounds = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)])
            groups = [i for i in range(len(bounds) - 1) if selected[bounds[i] : bounds[i + 1]].any()]
            selections.append(
                _FileSelection(
                    path=path,
                    row_groups=tuple(groups),
                    mask=np.concatenate([selected[bounds[i] : bounds[i + 1]] for i in groups]),
                    batch_rows=int(max(bounds[i + 1] - bounds[i] for i in groups)),
                )
            )
            key_tables.append(keys.append_column(_ITEM, pc.fill_null(item, False)).filter(mask))
        if not key_tables:
            return defs, shape, selections, keys.slice(0, 0).append_column(_ITEM, pa.array([], pa.bool_()))
        return defs, shape, selections, pa.concat_tables(key_tables)

    def _materialise(self, selections: list[_FileSelection], channels: list[int]) -> None:
        """Decode the selected row groups into the memmap, files in parallel threads.

        Decoding the list-encoded tensor column dominates (pyarrow releases the GIL), so threads
        scale it with the cores; each file writes its own precomputed range of the memmap.
        """
        out = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint8, shape=self.stored_shape)
        ends = np.cumsum([int(sel.mask.sum()) for sel in selections])
        ranges = [out[end - int(sel.mask.sum()) : end] for sel, end in zip(selections, ends, strict=True)]
        with ThreadPoolExecutor(max_workers=min(len(selections), os.cpu_count() or 1)) as pool:
            list(pool.map(_copy_selected, selections, ranges, [channels] * len(selections)))
        out.flush()
        del out, ranges

    @property
    def window_defs(self) -> list[dict[str, Any]]:
        """The windows in their stored form, what a model trained on them records in ``model.json``."""
        return [w.to_dict() for w in self.windows]

    @property
    def array(self) -> np.ndarray:
        """The materialised window bytes ``[P, C, H, W]`` (read-only memmap, opened lazily in each
        process): the items' own slices, and with ``context`` their neighbours too (see ``rows``)."""
        if self._closed:
            raise RuntimeError("WindowsDataset is closed")
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.targets)

    def inputs(self, items: slice | Sequence[int] | np.ndarray, channels: Sequence[int] | None = None,
               context: int | None = None) -> np.ndarray:
        """uint8 model inputs ``[n, len(channels) x (2 * context + 1), H, W]`` of ``items``: the chosen
        channels (default: all) of each slice and of its ``context`` (default: the dataset's, at most
        it) neighbours on each side."""
        context = self.context if context is None else context
        if not 0 <= context <= self.context:
            raise ValueError(f"context {context}: this dataset holds 0..{self.context} neighbouring slices")
        rows = self.rows[items, self.context - context : self.context + context + 1]
        return context_stack(self.array, rows, channels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(uint8_to_centred(self.inputs([i])[0]))
        if self.train and self.config.augment:
            x = augment(x, self.config, slices_per_window=2 * self.context + 1)
        return x, torch.tensor(self.targets[i], dtype=torch.int64)

    def class_counts(self) -> dict[int, int]:
        """Slices per target (both classes listed, zero included; indeterminate slices have none)."""
        counts = np.bincount(self.targets[self.targets != NO_TARGET], minlength=2)
        return {c: int(n) for c, n in enumerate(counts)}

    def close(self) -> None:
        """Drop the memmap and remove the cache folder (only the creating process removes it)."""
        self._array = None
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without pixels or cleanup duty: a worker reopens the memmap by path."""
        state = self.__dict__.copy()
        state["_array"] = None
        state["_finalizer"] = None
        return state


class _HasTargets(Protocol):
    targets: np.ndarray


def balanced_sampler(dataset: _HasTargets, num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """Draw classes equally (weight 1/count per class), with replacement: WNL outnumbers PE > 10:1.

    ``num_samples`` defaults to the dataset length (one "epoch"); the sampler's own generator, seeded
    by ``seed``, makes the sequence of epochs reproducible.
    """
    targets = np.asarray(dataset.targets)
    counts = np.bincount(targets)
    weights = (1.0 / counts[targets]).tolist()
    generator = torch.Generator().manual_seed(seed)
    size = len(targets) if num_samples is None else num_samples
    return WeightedRandomSampler(weights, size, replacement=True, generator=generator)

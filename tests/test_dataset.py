"""The training loader: the right slices and targets per split and stage, the right channels, exact
normalisation, identical samples across worker counts, balanced sampling, plausible augmentation,
row-group reads, and a cache folder that goes away."""

from __future__ import annotations

import gc
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from factories import DEFS, write_splits, write_windows
from torch.utils.data import DataLoader

from pe_triage import schema as S
from pe_triage.config import LoaderConfig
from pe_triage.dataset import WindowsDataset, balanced_sampler

SIZE = 16
Key = tuple[str, str, int]
#: (windows dataset folder, splits file, stored stacks by key)
Data = tuple[str, str, dict[Key, np.ndarray]]
#: (site, patient) -> (split, slice labels); rows of a file are in row groups of 4
COHORT: dict[tuple[str, str], tuple[str, list[str | None]]] = {
    ("a", "p1"): ("train", ["wnl", "wnl", "pe", "pe", "wnl", None]),
    ("a", "p2"): ("train", ["wnl", "other", "other", "wnl"]),
    ("a", "p3"): ("val", ["wnl"] * 5),
    ("a", "p4"): ("test", ["pe", "other", "wnl"]),
    ("b", "p5"): ("train", ["wnl", "wnl", None, "wnl", "wnl", "pe", "wnl"]),
    ("b", "p6"): ("val", ["other", "wnl"]),
}


@pytest.fixture
def data(tmp_path: Path) -> Data:
    stored = write_windows(tmp_path / "windows", {k: labels for k, (_, labels) in COHORT.items()})
    splits = write_splits(tmp_path / "splits.parquet", {k: split for k, (split, _) in COHORT.items()})
    return str(tmp_path / "windows"), str(splits), stored


@pytest.fixture
def cache(tmp_path: Path) -> LoaderConfig:
    return LoaderConfig(cache_dir=str(tmp_path / "cache"))


def centred(stack: np.ndarray) -> np.ndarray:
    return stack.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def expected(split: str, labels: set[str]) -> dict[Key, str]:
    return {
        (site, pid, i): label
        for (site, pid), (s, slice_labels) in COHORT.items()
        if s == split
        for i, label in enumerate(slice_labels)
        if label in labels
    }


def keys_of(ds: WindowsDataset) -> list[Key]:
    return list(zip(ds.index[S.SITE], ds.index[S.PATIENT_ID], ds.index[S.SLICE_INDEX].astype(int), strict=True))


# ------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize(
    ("stage", "labels", "positive"), [(1, {"wnl", "pe", "other"}, {"pe", "other"}), (2, {"pe", "other"}, {"pe"})]
)
@pytest.mark.parametrize("split", S.SPLITS)
def test_rows_and_targets_per_split_and_stage(data: Data, cache: LoaderConfig, split: str, stage: int,
                                              labels: set[str], positive: set[str]) -> None:
    windows, splits, stored = data
    want = expected(split, labels)
    with WindowsDataset(windows, splits, split=split, stage=stage, windows_used=["vascular"], config=cache) as ds:
        assert sorted(keys_of(ds)) == sorted(want) and len(ds) == len(want)
        assert list(ds.index[S.LABEL]) == [want[k] for k in keys_of(ds)]
        assert list(ds.targets) == [int(want[k] in positive) for k in keys_of(ds)]
        assert ds.class_counts() == {0: sum(v not in positive for v in want.values()),
                                     1: sum(v in positive for v in want.values())}
        for i, key in enumerate(keys_of(ds)):
            x, y = ds[i]
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and int(y) == ds.targets[i]
            np.testing.assert_array_equal(x.numpy(), centred(stored[key][[0]]))


def test_indeterminate_slices_are_left_out_and_counted_unless_kept(tmp_path: Path, cache: LoaderConfig) -> None:
    stored = write_windows(tmp_path / "w", {("a", "p1"): ["wnl", "indeterminate", "pe", "indeterminate"],
                                            ("a", "p2"): ["wnl", "other", "indeterminate"], ("a", "p3"): ["indeterminate"]})
    splits = str(write_splits(tmp_path / "s.parquet", {("a", "p1"): "train", ("a", "p2"): "train", ("a", "p3"): "val"}))
    windows = str(tmp_path / "w")
    for stage, n in ((1, 4), (2, 2)):
        with WindowsDataset(windows, splits, split="train", stage=stage, windows_used=["lung"], config=cache) as ds:
            assert len(ds) == n and "indeterminate" not in set(ds.index[S.LABEL])
            assert ds.excluded_indeterminate == 3  # p3's slice is in another split
    with WindowsDataset(windows, splits, split="train", stage=1, windows_used=["lung"], config=cache,
                        keep_indeterminate=True) as ds:
        assert len(ds) == 7 and ds.excluded_indeterminate == 0
        targets = dict(zip(keys_of(ds), ds.targets.tolist(), strict=True))
        assert targets == {("a", "p1", 0): 0, ("a", "p1", 1): -1, ("a", "p1", 2): 1, ("a", "p1", 3): -1,
                           ("a", "p2", 0): 0, ("a", "p2", 1): 1, ("a", "p2", 2): -1}
        assert ds.class_counts() == {0: 2, 1: 2}
        for i, key in enumerate(keys_of(ds)):
            np.testing.assert_array_equal(ds.array[i], stored[key][[2]])


@pytest.mark.parametrize(("used", "channels"), [(["vascular"], [0]), (["vascular", "lung"], [0, 2]),
                                                (["lung", "vascular"], [2, 0]), (["vascular", "mediastinal", "lung"], [0, 1, 2])])
def test_windows_used_selects_channels_in_the_order_given(data: Data, cache: LoaderConfig, used: list[str],
                                                          channels: list[int]) -> None:
    windows, splits, stored = data
    with WindowsDataset(windows, splits, split="train", stage=1, windows_used=used, config=cache) as ds:
        assert ds.window_names == tuple(used) and [d["name"] for d in ds.window_defs] == used
        assert ds.array.shape == (len(ds), len(used), SIZE, SIZE)
        for i, key in enumerate(keys_of(ds)):
            np.testing.assert_array_equal(ds.array[i], stored[key][channels])


def test_values_are_centred_with_exact_ends(data: Data, cache: LoaderConfig) -> None:
    windows, splits, _ = data
    with WindowsDataset(windows, splits, split="train", stage=1, windows_used=["vascular", "lung"], config=cache) as ds:
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        assert xs.min() >= -1 and xs.max() <= 1
        assert (xs[:, :, 0, 0] == -1.0).all() and (xs[:, :, 0, 1] == 1.0).all()


def test_bad_requests_are_named(data: Data, cache: LoaderConfig, tmp_path: Path) -> None:
    windows, splits, _ = data
    with pytest.raises(ValueError,
                       match=r"unknown window\(s\) \['soft'\]; available windows: \['vascular', 'mediastinal', 'lung'\]"):
        WindowsDataset(windows, splits, split="train", stage=1, windows_used=["vascular", "soft"], config=cache)
    with pytest.raises(ValueError, match="fold 'site-x' not in splits file"):
        WindowsDataset(windows, splits, split="train", stage=1, windows_used=["lung"], fold="site-x", config=cache)
    only_wnl = write_splits(tmp_path / "wnl.parquet", {("a", "p3"): "val"})
    with pytest.raises(ValueError, match=r"no slices for split 'val' of fold 'default', stage 2"):
        WindowsDataset(windows, str(only_wnl), split="val", stage=2, windows_used=["lung"], config=cache)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        WindowsDataset(windows, splits, split="val", stage=3, windows_used=["lung"], config=cache)


def test_a_failed_read_leaves_no_cache_behind(data: Data, cache: LoaderConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    windows, splits, _ = data

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("read error")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", broken)
    with pytest.raises(OSError, match="read error") as failure:
        WindowsDataset(windows, splits, split="train", stage=1, windows_used=["lung"], config=cache)
    assert failure.tb is not None and os.listdir(cache.cache_dir or "") == []  # removed at once, not at collection


def test_different_window_definitions_across_files_are_an_error(tmp_path: Path, cache: LoaderConfig) -> None:
    write_windows(tmp_path / "w", {("a", "p1"): ["wnl", "pe"]})
    write_windows(tmp_path / "w", {("b", "p2"): ["wnl", "pe"]}, defs=[{**DEFS[0], "hi": 700.0}, *DEFS[1:]])
    splits = write_splits(tmp_path / "s.parquet", {("a", "p1"): "train", ("b", "p2"): "train"})
    with pytest.raises(ValueError, match="window definitions differ between files"):
        WindowsDataset(str(tmp_path / "w"), str(splits), split="train", stage=1, windows_used=["vascular"], config=cache)


# ------------------------------------------------------------------------------------ reads
def test_reads_only_the_row_groups_that_hold_selected_slices(data: Data, cache: LoaderConfig,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    windows, splits, _ = data
    calls: list[tuple[tuple[int, ...], list[str]]] = []
    original = pq.ParquetFile.iter_batches

    def spy(self: pq.ParquetFile, *args: object, **kwargs: object) -> Iterator[pa.RecordBatch]:
        calls.append((tuple(kwargs["row_groups"]), list(kwargs["columns"])))  # type: ignore[call-overload]
        return original(self, *args, **kwargs)

    def per_row(*args: object, **kwargs: object) -> None:
        raise AssertionError("per-row-group random reads are not expected")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", per_row)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", per_row)
    with WindowsDataset(windows, splits, split="train", stage=2, windows_used=["vascular"], config=cache) as ds:
        assert len(ds) == 5
    # p1: pe at rows 2, 3 (group 0); p2: other at 1, 2 (group 0); p5: pe at row 5 (group 1)
    assert sorted(rg for rg, _ in calls) == [(0,), (0,), (1,)]
    assert all(cols == [S.WINDOWS] for _, cols in calls)


# ------------------------------------------------------------------------------------ loading
def test_workers_return_the_same_samples_as_the_main_process(data: Data, cache: LoaderConfig) -> None:
    windows, splits, _ = data
    plain = LoaderConfig(augment=False, cache_dir=cache.cache_dir)
    with WindowsDataset(windows, splits, split="train", stage=1, windows_used=["vascular", "lung"], config=plain,
                        train=True) as ds:
        batches = {n: list(DataLoader(ds, batch_size=3, num_workers=n)) for n in (0, 2)}
        assert os.path.isdir(ds.cache_folder), "a worker removed the owner's cache"
        for k in range(2):
            a, b = (torch.cat([batch[k] for batch in batches[n]]) for n in (0, 2))
            assert len(a) == len(ds) and torch.equal(a, b)


def test_pickles_without_pixels_and_reopens_by_path(data: Data, cache: LoaderConfig) -> None:
    windows, splits, _ = data
    with WindowsDataset(windows, splits, split="train", stage=1, windows_used=["vascular", "mediastinal", "lung"],
                        config=cache) as ds:
        ds[0]
        blob = pickle.dumps(ds)
        assert len(blob) < ds.array.nbytes
        copy = pickle.loads(blob)
        assert all(torch.equal(copy[i][0], ds[i][0]) for i in range(len(ds)))
        copy.close()
        assert os.path.isdir(ds.cache_folder), "only the creating object removes the cache"


def test_a_forked_child_never_removes_the_owners_cache(data: Data, cache: LoaderConfig) -> None:
    """Forked DataLoader workers inherit the dataset and its finalizer; only the creator may clean up."""
    windows, splits, _ = data
    ds = WindowsDataset(windows, splits, split="val", stage=1, windows_used=["lung"], config=cache)
    folder = ds.cache_folder
    pid = os.fork()
    if pid == 0:
        del ds
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.isdir(folder)
    ds.close()


def test_balanced_sampler_draws_classes_equally(tmp_path: Path, cache: LoaderConfig) -> None:
    write_windows(tmp_path / "w", {("a", "p1"): ["wnl"] * 100 + ["pe"] * 10}, size=4)
    splits = write_splits(tmp_path / "s.parquet", {("a", "p1"): "train"})
    with WindowsDataset(str(tmp_path / "w"), str(splits), split="train", stage=1, windows_used=["lung"], config=cache) as ds:
        assert ds.class_counts() == {0: 100, 1: 10}
        sampler = balanced_sampler(ds, num_samples=4000, seed=1)
        drawn = ds.targets[list(sampler)]
        assert len(drawn) == 4000 and abs(drawn.mean() - 0.5) < 0.03  # sd 0.008
        assert len(list(balanced_sampler(ds))) == len(ds)
        assert list(balanced_sampler(ds, seed=3)) == list(balanced_sampler(ds, seed=3))


def test_augmentation_keeps_shape_range_and_orientation(tmp_path: Path, cache: LoaderConfig) -> None:
    left_bright = np.zeros((3, 32, 32), np.uint8)
    left_bright[:, :, :16] = 255
    write_windows(tmp_path / "w", {("a", "p1"): ["wnl", "pe"]}, size=32, image=left_bright)
    splits = str(write_splits(tmp_path / "s.parquet", {("a", "p1"): "train"}))
    torch.manual_seed(0)
    with WindowsDataset(str(tmp_path / "w"), splits, split="train", stage=1, windows_used=["vascular", "lung"], config=cache,
                        train=True) as ds:
        plain = torch.from_numpy(centred(ds.array[0]))
        for _ in range(40):
            x, _ = ds[0]
            assert x.shape == (2, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
            assert x[:, :, :16].mean() > x[:, :, 16:].mean() + 1, "flipped or distorted"
            assert not torch.equal(x, plain)
    flips = LoaderConfig(hflip=True, cache_dir=cache.cache_dir)
    with WindowsDataset(str(tmp_path / "w"), splits, split="train", stage=1, windows_used=["vascular"], config=flips,
                        train=True) as ds:
        assert any(ds[0][0][:, :, 16:].mean() > 0 for _ in range(40)), "hflip=True never flipped"


# ------------------------------------------------------------------------------------ cleanup
def test_cache_folder_is_removed_on_close_exit_and_collection(data: Data, cache: LoaderConfig, tmp_path: Path) -> None:
    windows, splits, _ = data
    ds = WindowsDataset(windows, splits, split="val", stage=1, windows_used=["lung"], config=cache)
    folder = ds.cache_folder
    assert Path(folder).parent == Path(cache.cache_dir or "") and os.path.isfile(ds.path)
    ds[0]
    ds.close()
    assert not os.path.exists(folder)
    with pytest.raises(RuntimeError, match="closed"):
        ds[0]
    with WindowsDataset(windows, splits, split="val", stage=1, windows_used=["lung"], config=cache) as ds:
        folder = ds.cache_folder
    assert not os.path.exists(folder)
    ds = WindowsDataset(windows, splits, split="val", stage=1, windows_used=["lung"])
    folder = ds.cache_folder
    assert Path(folder).parent == Path(tempfile.gettempdir())
    del ds
    gc.collect()
    assert not os.path.exists(folder)


# ------------------------------------------------------------------------------------ z-context
def test_context_items_bring_their_neighbours_from_any_label_within_their_series(data: Data, cache: LoaderConfig) -> None:
    windows, splits, stored = data
    with (WindowsDataset(windows, splits, split="train", stage=2, windows_used=["lung", "vascular"], config=cache,
                         context=1) as ds,
          WindowsDataset(windows, splits, split="train", stage=2, windows_used=["lung", "vascular"], config=cache) as flat):
        assert keys_of(ds) == keys_of(flat) and ds.targets.tolist() == flat.targets.tolist()
        assert ds.shape == (len(flat), 6, SIZE, SIZE) and ds.stored_shape[0] == 17  # every train slice, any label
        for i, (site, pid, z) in enumerate(keys_of(ds)):
            n = len(COHORT[site, pid][1])
            want = [stored[site, pid, min(max(z + d, 0), n - 1)] for d in (-1, 0, 1)]
            x, _ = ds[i]
            assert torch.equal(x, torch.from_numpy(centred(np.stack([w[c] for c in (2, 0) for w in want]))))
            assert np.array_equal(ds.inputs([i], [1])[0], np.stack([w[0] for w in want]))  # vascular alone
        assert np.array_equal(ds.inputs(slice(None), context=0), flat.inputs(slice(None)))
        with pytest.raises(ValueError, match="holds 0..1 neighbouring slices"):
            ds.inputs([0], context=2)


def test_augmentation_changes_the_slices_of_one_window_alike(tmp_path: Path, cache: LoaderConfig) -> None:
    flat = np.full((3, 16, 16), 128, np.uint8)
    write_windows(tmp_path / "w", {("a", "p1"): ["wnl", "pe", "wnl"]}, image=flat)
    splits = str(write_splits(tmp_path / "s.parquet", {("a", "p1"): "train"}))
    torch.manual_seed(0)
    with WindowsDataset(str(tmp_path / "w"), splits, split="train", stage=1, windows_used=["vascular", "lung"],
                        config=LoaderConfig(max_shift=0, max_scale=0, intensity_jitter=0.2, cache_dir=cache.cache_dir),
                        train=True, context=1) as ds:
        x, _ = ds[1]
        centre = x[:, 8, 8]
        assert torch.allclose(centre[:3], centre[0]) and torch.allclose(centre[3:], centre[3])
        assert not torch.isclose(centre[0], centre[3]), "both windows got the same jitter"

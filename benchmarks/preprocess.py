"""Preprocessing throughput: window + dynamic crop + resize (512 -> 256) per core, next to a naive
reference implementation in the same run, the whole ``preprocess`` step, and the training loader.

    python benchmarks/preprocess.py [--out benchmarks/results/preprocess.json]

Input: the real LIDC series in ../shared/data/real-ct (261 slices, 512x512), ingested once; the
loader runs on a labelled synthetic cohort (it needs labels and splits).
Targets (preprocessing issue): >= 1000 slices/s per core for window + dynamic crop + resize;
the loader >= 5x the CPU training step rate of the default model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as pads
from scipy import ndimage as ndi

from pe_triage import schema as S
from pe_triage.config import IngestConfig, LoaderConfig, PreprocessConfig, SplitConfig, SynthConfig, TrainConfig
from pe_triage.dicom import DEMO_KEY, Pseudonymizer
from pe_triage.ingest import ingest_site
from pe_triage.lung_crop import crop_resize, find_lung_box
from pe_triage.preprocess import preprocess, resolve_windows, window_stack
from pe_triage.splits import split_dataset
from pe_triage.synth import generate_cohort
from pe_triage.windows import Window

LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct" / "lidc-idri-0002"


def fast(hu: np.ndarray, spacing: tuple[float, float], windows: list[Window], patch: np.ndarray, out: np.ndarray) -> None:
    """The library's path: pooled lung box, crop the int16 slice, resize once, window after resizing."""
    crop_resize(hu, find_lung_box(hu, spacing).box, 256, out=patch)
    window_stack(patch, windows, out)


def naive(hu: np.ndarray, spacing: tuple[float, float], windows: list[Window], patch: np.ndarray, out: np.ndarray) -> None:
    """What a first implementation does: window at full size, scipy labelling and hole filling at
    512x512, then ``ndimage.zoom`` each window."""
    stacked = [np.clip((hu.astype(np.float64) - w.lo) / w.width, 0, 1) for w in windows]
    tissue = hu > -500
    labels, n = ndi.label(tissue)
    body = labels == 1 + int(np.argmax(ndi.sum(tissue, labels, range(1, n + 1))))
    lungs = ndi.binary_fill_holes(body) & (hu < -400)
    labels, n = ndi.label(lungs)
    sizes = ndi.sum(lungs, labels, range(1, n + 1))
    keep = np.isin(labels, 1 + np.flatnonzero(sizes >= 300))
    ys, xs = np.nonzero(keep if keep.any() else body)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    for i, img in enumerate(stacked):
        crop = img[y0:y1, x0:x1]
        out[i] = (ndi.zoom(crop, (256 / crop.shape[0], 256 / crop.shape[1]), order=1)[:256, :256] * 255).astype(np.uint8)


def per_second(fn: Callable[..., None], slices: list[tuple[np.ndarray, tuple[float, float]]], windows: list[Window],
               repeats: int) -> float:
    patch = np.empty((256, 256), np.int16)
    out = np.empty((len(windows), 256, 256), np.uint8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for hu, spacing in slices:
            fn(hu, spacing, windows, patch, out)
        times.append(time.perf_counter() - start)
    return len(slices) / statistics.median(times)


def loader_rate(windows: Path, splits: Path, workers: int, augment: bool) -> float:
    import torch

    from pe_triage.dataset import WindowsDataset

    config = LoaderConfig(augment=augment)
    with WindowsDataset(str(windows), str(splits), split="train", stage=1, windows_used=list(TrainConfig().windows),
                        config=config, train=True) as dataset:
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers)
        n = 0
        start = time.perf_counter()
        for _ in range(3):
            for x, _ in loader:
                n += x.shape[0]
        return n / (time.perf_counter() - start)


def loader_benchmark(work: Path) -> dict[str, float]:
    """Loader rates on a labelled synthetic cohort (2 sites x 10 patients x 60 slices, 256 px, DWL)."""
    generate_cohort(work / "cohort", SynthConfig(sites=2, patients_per_site=10, slices=60, size=256, seed=1))
    for site_dir in sorted((work / "cohort" / "sites").iterdir()):
        ingest_site(site_dir.name, str(site_dir / "dicom"), str(work / "slices"), pseudo=Pseudonymizer(DEMO_KEY, site_dir.name),
                    labels=str(site_dir / "labels.csv"), config=IngestConfig())
    preprocess(str(work / "slices"), str(work / "windows"), config=PreprocessConfig())
    split_dataset(str(work / "windows"), str(work / "splits.parquet"), config=SplitConfig())
    return {f"workers_{w}_augment_{a}": round(loader_rate(work / "windows", work / "splits.parquet", w, a), 1)
            for w in (0, 2) for a in (False, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/pe-triage-bench-preprocess")
    parser.add_argument("--out", default="benchmarks/results/preprocess.json")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    ingest_site("lidc", str(LIDC), str(work / "slices"), pseudo=Pseudonymizer(DEMO_KEY, "lidc"), config=IngestConfig(workers=1))
    table = pads.dataset(work / "slices", format="parquet", partitioning="hive").to_table()
    slices = [(S.decode_hu(r[S.HU], r[S.ROWS], r[S.COLS]), (r[S.PIXEL_SPACING_ROW], r[S.PIXEL_SPACING_COL]))
              for r in table.to_pylist()]
    windows = resolve_windows(PreprocessConfig())
    fast_rate = per_second(fast, slices, windows, args.repeats)
    naive_rate = per_second(naive, slices[::8], windows, 1)
    steps = {}
    for workers in (1, 2):
        out = work / f"windows-{workers}"
        report = preprocess(str(work / "slices"), str(out), config=PreprocessConfig(workers=workers))
        steps[f"workers_{workers}"] = {"slices_per_s": report["timing"]["slices_per_s"], "seconds": report["timing"]["seconds"]}
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "input": {"series": "LIDC-IDRI-0002", "slices": len(slices), "size_px": 512, "output_px": 256, "windows": len(windows)},
        "window_crop_resize_per_core": {"fast_slices_per_s": round(fast_rate, 1), "naive_reference_slices_per_s": round(naive_rate, 1),
                                        "speedup": round(fast_rate / naive_rate, 1)},
        "preprocess_step_incl_read_decode_write": steps,
    }
    result["loader_samples_per_s"] = loader_benchmark(work / "loader")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

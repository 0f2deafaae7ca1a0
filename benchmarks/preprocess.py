"""Preprocessing throughput: window + dynamic crop + resize (512 -> 256) per core next to a naive
reference implementation, the whole ``preprocess`` step at 1 and 2 workers on the real series and
on one long series, and the training loader. Candidates of a part run interleaved, each timed
``--repeats`` times (median reported, with the load average of the machine).

    python benchmarks/preprocess.py [--out benchmarks/results/preprocess.json]

Input: the real LIDC series in ../shared/data/real-ct (261 slices, 512x512), ingested once (or its
first ``--slices``); the long series is that series written ``--long-repeat`` times over as one
series (what a thin-slice scan gives), so the parallelism within a series shows. The loader runs
on a labelled synthetic cohort (it needs labels and splits).
Targets (issue 17): >= 1000 slices/s per core for window + dynamic crop + resize (moonshot 2000);
one long series uses every worker; the loader >= 5x the CPU training step rate of the default model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import ndimage as ndi

from pe_triage import schema as S
from pe_triage.config import IngestConfig, LoaderConfig, PreprocessConfig, SplitConfig, SynthConfig, TrainConfig
from pe_triage.dicom import DEMO_KEY, Pseudonymizer
from pe_triage.ingest import ingest_site
from pe_triage.parallel import run, worker_pool
from pe_triage.preprocess import preprocess, resolve_windows, window_slice
from pe_triage.splits import split_dataset
from pe_triage.storage import RowGroupWriter, location
from pe_triage.synth import generate_cohort
from pe_triage.windows import Window

LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct" / "lidc-idri-0002"
Slice = tuple[np.ndarray, tuple[float, float]]


def library(hu: np.ndarray, spacing: tuple[float, float], windows: list[Window], patch: np.ndarray, out: np.ndarray) -> None:
    """The library's per-slice path (what ``preprocess`` and ``predict`` run)."""
    window_slice(hu, spacing, PreprocessConfig(), windows, out, union=None, patch=patch)


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


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def kernel(slices: list[Slice], repeats: int) -> dict[str, Any]:
    """Window + dynamic crop + resize on one core: the library and the naive reference, interleaved
    (the naive one on every 8th slice: it is ~40x slower)."""
    windows = resolve_windows(PreprocessConfig())
    patch = np.empty((256, 256), np.int16)
    out = np.empty((len(windows), 256, 256), np.uint8)
    candidates = {"library": (library, slices), "naive_reference": (naive, slices[::8])}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, (fn, items) in candidates.items():
            times[name].append(timed(lambda fn=fn, items=items: [fn(hu, sp, windows, patch, out) for hu, sp in items]))
    result: dict[str, Any] = {}
    for name, (_, items) in candidates.items():
        result[name] = {"slices_per_s": round(len(items) / statistics.median(t[0] for t in times[name]), 1),
                        "slices_per_cpu_s": round(len(items) / statistics.median(t[1] for t in times[name]), 1)}
    result["speedup"] = round(result["library"]["slices_per_s"] / result["naive_reference"]["slices_per_s"], 1)
    return result


def ingest_lidc(work: Path, first: int | None) -> Path:
    """The LIDC series (or its ``first`` files) as a slices dataset."""
    source = LIDC
    if first:
        source = work / "dicom"
        source.mkdir(parents=True)
        for path in sorted(LIDC.glob("*.dcm"))[:first]:
            shutil.copy(path, source / path.name)
    ingest_site("lidc", str(source), str(work / "slices"), pseudo=Pseudonymizer(DEMO_KEY, "lidc"), config=IngestConfig(workers=1))
    return work / "slices"


def long_series(slices: Path, out: Path, repeat: int) -> Path:
    """One series made of ``repeat`` copies of the series in ``slices`` (new slice indices, positions,
    SOP UIDs and digests), in the row groups ingest writes."""
    (path,) = list(slices.glob("site=*/*.parquet"))
    table = pq.read_table(path)
    n = table.num_rows
    span = max(table.column(S.Z_MM).to_pylist()) - min(table.column(S.Z_MM).to_pylist()) + 1.0
    target = out / path.parent.name / path.name
    config = IngestConfig()
    with RowGroupWriter(location(str(out)), str(target), table.schema, bulk=S.HU, zstd_level=config.zstd_level) as writer:
        for r in range(repeat):
            copy = table
            for name, values in ((S.SLICE_INDEX, pa.array(np.arange(n, dtype=np.int32) + r * n)),
                                 (S.Z_MM, pa.array(np.asarray(table.column(S.Z_MM)) + r * span)),
                                 (S.SOP_UID, pa.array([f"{u}.{r}" for u in table.column(S.SOP_UID).to_pylist()])),
                                 (S.SOURCE_HMAC, pa.array([f"{h}{r}" for h in table.column(S.SOURCE_HMAC).to_pylist()]))):
                i = copy.schema.get_field_index(name)
                copy = copy.set_column(i, copy.schema.field(name), values)
            for start in range(0, n, config.row_group_slices):
                writer.write(copy.slice(start, config.row_group_slices))
    return out


def pool_start(workers: int) -> float:
    """Seconds to start ``workers`` spawned worker processes and run one task on each."""
    start = time.perf_counter()
    with worker_pool(workers) as pool:
        list(run(pool, abs, range(workers)))
    return time.perf_counter() - start


def parallel_capacity(n: int = 20_000_000) -> float:
    """Work done per second by 2 busy worker processes over that of 1 (both started beforehand): 2.0
    on two free cores, ~1.0 where other jobs leave one core's worth of time, when no number of
    workers can go faster."""
    with worker_pool(2) as pool:
        list(run(pool, sum, [range(1), range(1)]))
        rates = []
        for k in (1, 2):
            start = time.perf_counter()
            list(run(pool, sum, [range(n)] * k))
            rates.append(k / (time.perf_counter() - start))
    return rates[1] / rates[0]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def whole_step(inputs: dict[str, Path], work: Path, repeats: int) -> dict[str, Any]:
    """The ``preprocess`` step (read, decode, crop, window, write) asked for 1 and 2 workers per input,
    interleaved, with the default configuration (which starts fewer workers for little work: see
    ``workers_used``). ``cpu_ms_per_slice`` counts the workers too; ``pool_start_s`` is what starting
    2 worker processes costs, ``parallel_capacity`` what 2 processes get done over 1 (see there)."""
    seconds: dict[str, list[float]] = {"pool_start": [], "parallel_capacity": []}
    cpu: dict[str, list[float]] = {}
    runs: dict[str, dict[str, int]] = {}
    for _ in range(repeats):
        for name, src in inputs.items():
            for workers in (1, 2):
                out = work / f"windows-{name}-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                before = cpu_seconds()
                report = preprocess(str(src), str(out), config=PreprocessConfig(workers=workers))
                key = f"{name}_workers_{workers}"
                cpu.setdefault(key, []).append(cpu_seconds() - before)
                seconds.setdefault(key, []).append(report["timing"]["seconds"])
                runs[key] = {"slices": report["slices_written"], "workers_used": report["timing"]["workers"]}
        seconds["pool_start"].append(pool_start(2))
        seconds["parallel_capacity"].append(parallel_capacity())
    result: dict[str, Any] = {"pool_start_s": round(statistics.median(seconds.pop("pool_start")), 2),
                              "parallel_capacity": round(statistics.median(seconds.pop("parallel_capacity")), 2)}
    for key, values in seconds.items():
        s, n = statistics.median(values), runs[key]["slices"]
        result[key] = {**runs[key], "seconds": round(s, 3), "slices_per_s": round(n / s, 1),
                       "cpu_ms_per_slice": round(statistics.median(cpu[key]) / n * 1e3, 3)}
    for name in inputs:
        result[f"{name}_speedup_2_over_1"] = round(result[f"{name}_workers_1"]["seconds"] / result[f"{name}_workers_2"]["seconds"], 2)
    return result


def loader_rate(windows: Path, splits: Path, workers: int, augment: bool, windows_used: list[str]) -> float:
    import torch

    from pe_triage.dataset import WindowsDataset

    config = LoaderConfig(augment=augment)
    with WindowsDataset(str(windows), str(splits), split="train", stage=1, windows_used=windows_used,
                        config=config, train=True) as dataset:
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers)
        n = 0
        start = time.perf_counter()
        for _ in range(3):
            for x, _ in loader:
                n += x.shape[0]
        return n / (time.perf_counter() - start)


def loader_benchmark(work: Path, synth: SynthConfig) -> dict[str, float]:
    """Loader rates on a labelled synthetic cohort. The windows read are the training
    configuration's, and the preprocessing makes them (its own windows plus those)."""
    train_windows = list(TrainConfig().windows)
    config = PreprocessConfig()
    config = PreprocessConfig(windows=tuple(dict.fromkeys([*config.windows, *train_windows])))
    generate_cohort(work / "cohort", synth)
    for site_dir in sorted((work / "cohort" / "sites").iterdir()):
        ingest_site(site_dir.name, str(site_dir / "dicom"), str(work / "slices"), pseudo=Pseudonymizer(DEMO_KEY, site_dir.name),
                    labels=str(site_dir / "labels.csv"), config=IngestConfig(workers=1))
    preprocess(str(work / "slices"), str(work / "windows"), config=config)
    split_dataset(str(work / "windows"), str(work / "splits.parquet"), config=SplitConfig())
    return {f"workers_{w}_augment_{a}": round(loader_rate(work / "windows", work / "splits.parquet", w, a, train_windows), 1)
            for w in (0, 2) for a in (False, True)}


def read_slices(slices: Path) -> list[Slice]:
    table = pq.read_table(next(slices.glob("site=*/*.parquet")))
    return [(S.decode_hu(r[S.HU], r[S.ROWS], r[S.COLS]), (r[S.PIXEL_SPACING_ROW], r[S.PIXEL_SPACING_COL]))
            for r in table.to_pylist()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=0, help="use the first N slices of the LIDC series (0: all 261)")
    parser.add_argument("--long-repeat", type=int, default=8, help="the long series is the LIDC series this many times over")
    parser.add_argument("--loader-patients", type=int, default=10, help="synthetic patients per site (2 sites) for the loader")
    parser.add_argument("--loader-slices", type=int, default=60)
    parser.add_argument("--loader-size", type=int, default=256)
    parser.add_argument("--workdir", default="/tmp/pe-triage-bench-preprocess")
    parser.add_argument("--out", default="benchmarks/results/preprocess.json")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    load_before = os.getloadavg()
    slices_dir = ingest_lidc(work / "lidc", args.slices or None)
    slices = read_slices(slices_dir)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "opencv": cv2.__version__, "numpy": np.__version__},
        "input": {"series": "LIDC-IDRI-0002", "slices": len(slices), "size_px": 512, "output_px": 256,
                  "windows": len(PreprocessConfig().windows), "long_series_slices": len(slices) * args.long_repeat,
                  "repeats": args.repeats},
        "window_crop_resize_per_core": kernel(slices, args.repeats),
    }
    inputs = {"lidc": slices_dir, "long": long_series(slices_dir, work / "long", args.long_repeat)}
    result["preprocess_step_incl_read_decode_write"] = whole_step(inputs, work, args.repeats)
    synth = SynthConfig(sites=2, patients_per_site=args.loader_patients, slices=args.loader_slices, size=args.loader_size, seed=1)
    result["loader_samples_per_s"] = loader_benchmark(work / "loader", synth)
    result["machine"]["load_average_1min"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Evaluation throughput: slices/s of the evaluate step on synthetic test splits of a few sizes, bare
(both stages scored, every table, no bootstrap, no Grad-CAM) and with the bootstrap and Grad-CAM
(overlays and the localisation of true positives against lesion masks) the demo configures.

    python benchmarks/evaluate.py [--sizes 120,360,1080] [--image 128] [--repeats 5]
        [--arch cbam_drn_d_54 --width 0.125 --fusion stacked] [--bootstrap 500] [--gradcam 3]
        [--localisation 100] [--out benchmarks/results/evaluate.json]

Each split is patients of 8 slices on three sites, every patient in ``test``, with a truth folder of
lesion masks (so the localisation runs, as on a synthetic cohort), scored by two randomly initialised
models of the demo's architecture (threshold 0: every positive slice is a true positive, so Grad-CAM
always has its full sample). Candidates and sizes are interleaved in every repeat and medians
reported, since a shared 2-core machine drifts by tens of percent. ``phases_s`` splits the median
run into scoring, metrics (bootstrap), Grad-CAM (localisation, overlays) and report.
``forward_kernel``: one model's forward images/s by intra-op threads (1, 2) and batch (1-64 images),
what the cache-sized, single-threaded scoring rests on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pe_triage import schema as S
from pe_triage.artifact import save_model
from pe_triage.config import Config, EvalConfig, LoaderConfig, ModelConfig, to_dict
import pe_triage.evaluation.evaluate as ev
from pe_triage.models import build_model
from pe_triage.windows import PRESETS

WINDOWS = ("vascular", "clinical_lung")
SLICES_PER_PATIENT = 8
#: labels of a patient's slices, by patient class
PATIENT_LABELS = {
    "wnl": ["wnl"] * SLICES_PER_PATIENT,
    "other": ["wnl"] * 3 + ["other"] * 4 + ["wnl"],
    "pe": ["wnl"] * 2 + ["indeterminate"] + ["pe"] * 4 + ["other"],
}


def _patients(slices: int) -> list[tuple[str, str, list[str]]]:
    classes = list(PATIENT_LABELS)
    n = max(3, -(-slices // SLICES_PER_PATIENT))
    return [(f"site-{'abc'[p % 3]}", f"p{p:04d}", PATIENT_LABELS[classes[p % 3]]) for p in range(n)]


def _windows_file(folder: Path, site: str, pid: str, labels: list[str], image: int, rng: np.random.Generator) -> None:
    defs = [PRESETS[w].to_dict() for w in WINDOWS]
    schema = S.windows_schema(len(defs), image).with_metadata({S.META_WINDOWS: json.dumps(defs)})
    n = len(labels)
    stacks = rng.integers(0, 256, (n, len(defs), image, image), dtype=np.uint8)
    cols = {S.SITE: [site] * n, S.PATIENT_ID: [pid] * n, S.STUDY_UID: ["st"] * n, S.SERIES_UID: [f"se-{pid}"] * n,
            S.SOP_UID: [f"{pid}-{i}" for i in range(n)], S.SLICE_INDEX: list(range(n)), S.Z_MM: [float(i) for i in range(n)],
            S.SOURCE_HMAC: [_digest(pid, i) for i in range(n)], S.LABEL: labels, S.CROP_Y0: [0] * n,
            S.CROP_Y1: [image] * n, S.CROP_X0: [0] * n, S.CROP_X1: [image] * n, S.LUNG_FOUND: [True] * n}
    arrays = [pa.array(cols[f.name], f.type) for f in schema if f.name != S.WINDOWS] + [S.windows_array(stacks)]
    path = folder / f"site={site}" / f"se-{pid}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path, row_group_size=64)


def _digest(pid: str, i: int) -> str:
    return f"{pid}-{i}".encode().hex().ljust(64, "0")


def _truth(folder: Path, patients: list[tuple[str, str, list[str]]], image: int) -> None:
    """Lesion masks (a square in the middle of every disease slice) keyed as the windows are."""
    mask = np.zeros((image, image), np.uint8)
    mask[image // 3 : image // 2, image // 3 : image // 2] = 1
    rows = [{S.SITE: site, S.M_PATIENT_ID: pid, S.M_STUDY_UID: "st", S.M_SERIES_UID: f"se-{pid}", S.M_SOP_UID: f"{pid}-{i}",
             S.SOURCE_HMAC: _digest(pid, i), S.Z_MM: float(i), S.ROWS: image, S.COLS: image, S.LABEL: label,
             S.T_LESION: label, S.T_MASK: (mask if label in ("pe", "other") else mask * 0).tobytes(), S.T_TISSUE: None}
            for site, pid, labels in patients for i, label in enumerate(labels)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=S.TRUTH_SCHEMA), folder / "truth.parquet")
    (folder / "cohort.json").write_text(json.dumps({"seed": 0, "lesions": "synthetic benchmark", "min_visible_area_mm2": {}}))


def build_split(root: Path, slices: int, image: int) -> tuple[str, str, str]:
    """(windows, splits, truth) of a test split of about ``slices`` slices."""
    rng = np.random.default_rng(0)
    patients = _patients(slices)
    for site, pid, labels in patients:
        _windows_file(root / "windows", site, pid, labels, image, rng)
    rows = [(S.DEFAULT_FOLD, site, pid, "wnl", "test") for site, pid, _ in patients]
    pq.write_table(pa.table(list(map(list, zip(*rows, strict=True))), schema=S.SPLITS_SCHEMA), root / "splits.parquet")
    _truth(root / "truth", patients, image)
    return str(root / "windows"), str(root / "splits.parquet"), str(root / "truth")


def build_models(root: Path, model: ModelConfig) -> tuple[str, str]:
    """Two randomly initialised stage models at threshold 0 (what is measured is speed, not skill)."""
    paths = []
    for stage in (1, 2):
        torch.manual_seed(stage)
        net = build_model(model, len(WINDOWS))
        meta = {"stage": stage, "model": to_dict(model), "windows": [PRESETS[w].to_dict() for w in WINDOWS], "threshold": 0.0}
        paths.append(str(save_model(root / f"stage{stage}", net, meta, [])))
    return paths[0], paths[1]


def _run_once(paths: dict[str, str], out: Path, config: Config) -> dict[str, float]:
    """Wall and CPU seconds of one evaluate step (CPU time drifts less than wall time on a shared
    machine), and the wall seconds of its parts."""
    phases: dict[str, float] = {}
    start, cpu = time.perf_counter(), time.process_time()
    with _timed_phases(phases):
        ev.evaluate(paths["stage1"], paths["stage2"], paths["windows"], paths["splits"], str(out), config=config,
                    truth=paths["truth"])
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, **phases}


class _timed_phases:  # noqa: N801 (used as a context manager, named like one)
    """Wraps the step's parts (module attributes) with timers for the length of a block."""

    PARTS = {"score": "score_slices", "metrics": "evaluate_predictions", "localisation": "_localisation",
             "overlays": "_gradcam", "report": "write_report"}

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases, self.saved = phases, {}  # type: ignore[var-annotated]

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
        return timed

    def __enter__(self) -> None:
        for name, attr in self.PARTS.items():
            self.saved[attr] = getattr(ev, attr)
            setattr(ev, attr, self._wrap(name, self.saved[attr]))

    def __exit__(self, *exc: object) -> None:
        for attr, fn in self.saved.items():
            setattr(ev, attr, fn)


def candidates(args: argparse.Namespace, cache: str) -> dict[str, Config]:
    model = ModelConfig(arch=args.arch, width=args.width, fusion=args.fusion)
    base = Config(model=model, loader=LoaderConfig(cache_dir=cache, augment=False))
    full = EvalConfig(bootstrap=args.bootstrap, gradcam_per_category=args.gradcam, gradcam_localisation=args.localisation)
    bare = replace(full, bootstrap=0, gradcam_per_category=0, gradcam_localisation=0)
    return {"bare": replace(base, evaluate=bare),
            "bootstrap": replace(base, evaluate=replace(bare, bootstrap=args.bootstrap)),
            "gradcam": replace(base, evaluate=replace(full, bootstrap=0)),
            "full": replace(base, evaluate=full)}


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_before": list(os.getloadavg())}


def _summary(runs: list[dict[str, float]], slices: int) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    median = statistics.median(seconds)
    cpu = statistics.median(r["cpu_seconds"] for r in runs)
    middle = min(runs, key=lambda r: abs(r["seconds"] - median))
    return {"seconds": median, "slices_per_s": slices / median, "cpu_seconds": cpu, "slices_per_cpu_s": slices / cpu,
            "runs_s": [round(s, 3) for s in seconds],
            "phases_s": {k: round(v, 3) for k, v in middle.items() if k not in ("seconds", "cpu_seconds")}}


KERNEL_THREADS = (1, 2)
KERNEL_BATCHES = (1, 4, 16, 64)


def forward_kernel(model_cfg: ModelConfig, image: int, images: int, repeats: int) -> dict[str, Any]:
    """Images/s (wall and per CPU second) of one model's forward pass by intra-op threads and batch:
    what ``evaluate.batch_pixels`` and the single-threaded scoring rest on. Interleaved per repeat."""
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    model = build_model(model_cfg, len(WINDOWS)).eval()
    x = torch.rand(images, len(WINDOWS), image, image) * 2 - 1
    before = torch.get_num_threads()
    runs: dict[str, list[tuple[float, float]]] = {}
    with torch.inference_mode():
        model(x[:1])
        for _ in range(repeats):
            for threads in KERNEL_THREADS:
                torch.set_num_threads(threads)
                for batch in KERNEL_BATCHES:
                    start, cpu = time.perf_counter(), time.process_time()
                    for i in range(0, images, batch):
                        model(x[i : i + batch])
                    runs.setdefault(f"threads_{threads}_batch_{batch}", []).append(
                        (images / (time.perf_counter() - start), images / max(time.process_time() - cpu, 1e-9)))
    torch.set_num_threads(before)
    out: dict[str, Any] = {k: {"images_per_s": statistics.median(w for w, _ in v), "images_per_cpu_s": statistics.median(c for _, c in v),
                               "runs": [round(w, 1) for w, _ in v]} for k, v in runs.items()}
    out["one_thread_batch_4_over_64"] = out["threads_1_batch_4"]["images_per_s"] / out["threads_1_batch_64"]["images_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="120,360,1080", help="test-split slices, comma-separated")
    parser.add_argument("--image", type=int, default=128, help="model input side (the demo's 128)")
    parser.add_argument("--arch", default="cbam_drn_d_54")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--fusion", default="stacked")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--gradcam", type=int, default=3, help="overlays per category and stage")
    parser.add_argument("--localisation", type=int, default=100, help="true positives per stage measured against masks")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernel-images", type=int, default=64, help="images per forward-kernel measurement")
    parser.add_argument("--out", default="benchmarks/results/evaluate.json")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    machine = _machine()
    model_cfg = ModelConfig(arch=args.arch, width=args.width, fusion=args.fusion)
    kernel = forward_kernel(model_cfg, args.image, args.kernel_images, args.repeats)
    with tempfile.TemporaryDirectory(prefix="pe-triage-bench-eval-") as tmp:
        root = Path(tmp)
        models = build_models(root, model_cfg)
        splits = {n: build_split(root / f"split-{n}", n, args.image) for n in sizes}
        configs = candidates(args, str(root / "cache"))
        runs: dict[tuple[int, str], list[dict[str, float]]] = {(n, c): [] for n in sizes for c in configs}
        for r in range(args.repeats):
            for n in sizes:
                windows, split_file, truth = splits[n]
                paths = {"stage1": models[0], "stage2": models[1], "windows": windows, "splits": split_file, "truth": truth}
                for name, config in configs.items():
                    runs[n, name].append(_run_once(paths, root / f"out-{n}-{name}-{r}", config))
                    print(f"repeat {r + 1} {n} slices {name}: {runs[n, name][-1]['seconds']:.2f} s", flush=True)
        slices = {n: sum(len(labels) for *_, labels in _patients(n)) for n in sizes}
    results = {str(slices[n]): {name: _summary(runs[n, name], slices[n]) for name in configs} for n in sizes}
    result = {
        "machine": {**machine, "load_average_after": list(os.getloadavg())},
        "setup": {"sizes": [slices[n] for n in sizes], "image": args.image, "arch": args.arch, "width": args.width,
                  "fusion": args.fusion, "bootstrap": args.bootstrap, "gradcam_per_category": args.gradcam,
                  "localisation": args.localisation, "repeats": args.repeats},
        "results": results,
        "forward_kernel": kernel,
        # slices/s of the largest split over the smallest: 1.0 = time linear in slices (fixed costs amortised above 1)
        "scaling": {name: results[str(slices[sizes[-1]])][name]["slices_per_s"] / results[str(slices[sizes[0]])][name]["slices_per_s"]
                    for name in configs},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"results": {n: {c: round(v["slices_per_s"], 1) for c, v in r.items()} for n, r in results.items()},
                      "scaling": result["scaling"]}, indent=2))
    return result


if __name__ == "__main__":
    # the steps' progress lines would drown the benchmark's own output (not set in main(): the suite
    # calls it in-process, and the level would outlive the call)
    logging.getLogger("pe_triage").setLevel(logging.WARNING)
    main()

"""Ingest throughput and memory against the bare pydicom decode loop, on the same files, in one run.

    python benchmarks/ingest.py [--patients 8 --slices 120] [--out benchmarks/results/ingest.json]

Generates an uncompressed 512x512 synthetic cohort (one site, Explicit VR Little Endian), warms the
page cache, then measures, each ``--repeats`` times (median reported):

* the bare loop ``pydicom.dcmread(path).pixel_array`` over every file (one process);
* the same loop split over 2 processes (what 2 cores of this machine give a perfectly parallel job);
* ``pe-triage ingest`` with 1 and 2 worker processes into a fresh dataset, as a subprocess whose
  whole process tree is sampled for peak resident memory. Rates use the ingest's own timing
  (interpreter start-up excluded; the command's wall time is reported beside it).

Targets from the ingest issue: ingest per worker >= 60% of the bare loop, near-linear with
workers, peak RSS < 2 GB whatever the cohort size (use a cohort > 2 GB to show it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pydicom

from pe_triage.config import SynthConfig
from pe_triage.synth import generate_cohort


def cohort(workdir: Path, patients: int, slices: int) -> tuple[Path, list[Path]]:
    root = workdir / f"cohort-{patients}x{slices}"
    if not (root / "truth" / "cohort.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        config = replace(SynthConfig(), sites=1, patients_per_site=patients, slices=slices, size=512, write_tissue_maps=False)
        generate_cohort(root, config)
    source = root / "sites" / "site-a" / "dicom"
    files = sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:  # warm the page cache so every candidate reads from memory
        path.read_bytes()
    return source, files


def _decode_all(files: list[Path]) -> None:
    for path in files:
        pydicom.dcmread(path).pixel_array


def bare_loop(files: list[Path], processes: int = 1) -> float:
    """Seconds for the bare decode loop over ``files``, split over ``processes`` (the scaling reference)."""
    start = time.perf_counter()
    if processes == 1:
        _decode_all(files)
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_decode_all, [files[i::processes] for i in range(processes)])
    return time.perf_counter() - start


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def ingest_run(source: Path, out: Path, workers: int) -> tuple[float, int, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pe_triage.cli", "ingest", "--site", "site-a", "--source", str(source),
           "--out", str(out), "--workers", str(workers), "--demo"]
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"ingest failed: {err.decode()[-2000:]}")
    report = json.loads((out / "_reports" / "site=site-a" / "ingest_report.json").read_text())
    return seconds, peak, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/pe-triage-bench")
    parser.add_argument("--out", default="benchmarks/results/ingest.json")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    source, files = cohort(workdir, args.patients, args.slices)
    n = len(files)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    bare = statistics.median(bare_loop(files) for _ in range(args.repeats))
    bare_2 = statistics.median(bare_loop(files, 2) for _ in range(args.repeats))
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "cohort": {"slices": n, "series": args.patients, "size_px": 512, "transfer_syntax": "Explicit VR Little Endian", "megabytes": round(megabytes, 1)},
        "bare_decode_loop": {"slices_per_s": round(n / bare, 1), "mb_per_s": round(megabytes / bare, 1)},
        "bare_decode_loop_2_processes": {"slices_per_s": round(n / bare_2, 1), "scaling_vs_1": round(bare / bare_2, 2)},
        "ingest": {},
    }
    for workers in (1, 2):
        runs = [ingest_run(source, workdir / f"out-{workers}", workers) for _ in range(args.repeats)]
        wall = statistics.median(r[0] for r in runs)
        seconds = statistics.median(r[2]["timing"]["seconds"] for r in runs)  # in-process, no interpreter start-up
        report = runs[-1][2]
        assert report["files"]["ingested"] == n, report["files"]
        dataset_mb = sum(p.stat().st_size for p in (workdir / f"out-{workers}").rglob("*.parquet")) / 1e6
        result["ingest"][f"workers_{workers}"] = {
            "seconds": round(seconds, 2),
            "command_wall_seconds": round(wall, 2),
            "scan_seconds": round(statistics.median(r[2]["timing"]["scan_seconds"] for r in runs), 2),
            "slices_per_s": round(n / seconds, 1),
            "mb_per_s": round(megabytes / seconds, 1),
            "per_worker_vs_bare_loop": round(n / seconds / workers / (n / bare), 3),
            "peak_rss_mb": round(max(r[1] for r in runs) / 1e6, 1),
            "dataset_mb": round(dataset_mb, 1),
            "compression_ratio": round(n * 512 * 512 * 2 / 1e6 / dataset_mb, 2),
        }
    one, two = result["ingest"]["workers_1"], result["ingest"]["workers_2"]
    result["scaling_2_vs_1_workers"] = round(two["slices_per_s"] / one["slices_per_s"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Ingest throughput and memory against the bare pydicom decode loop, on the same files, interleaved in one run.

    python benchmarks/ingest.py [--patients 8 --slices 120 --large-factor 2 --repeats 5]
                                [--out benchmarks/results/ingest.json]

Synthetic cohorts, generated once into ``--workdir`` (page cache warmed before every round):

* uncompressed 512x512 slices (Explicit VR Little Endian): a small cohort of ``--patients`` series
  and a large one with ``--large-factor`` times as many (the small one is a hard-linked subset);
* an RLE Lossless site and a JPEG 2000 Lossless site of ``--compressed-slices`` slices each.

Every round runs each candidate once, in one fixed order, so load from other jobs on the machine
falls on all of them alike; medians over ``--repeats`` rounds are reported:

* the bare loop ``pydicom.dcmread(path).pixel_array`` over the small cohort, in 1 and 2 processes;
* ``pe-triage ingest`` with 1 and 2 workers (``min_files_per_worker`` set to 1, so that many start)
  on the small and on the large cohort, each as a fresh command whose process tree is sampled for
  peak resident memory. Wall times are the ingest's own (its report: interpreter start-up excluded,
  worker start-up included); CPU times are the command's, start-up included;
* per compressed site: the bare loop, and ingest with 1 worker of the site and of its first half.

Per worker, ingest is compared with the bare loop on the steady rate between the two cohort sizes
(slices added / seconds added), which leaves out the fixed cost of a run (imports, worker start-up,
planning, the report), reported beside it; in wall time, in CPU time (the less sensitive to other
jobs), and for whole runs of the large cohort. Targets (issue 17): per worker >= 60 % of the bare
loop (80 % moonshot), near-linear from 1 to 2 workers, peak RSS flat in cohort size; compressed
sites are decode-bound.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pydicom

from pe_triage.config import IngestConfig, SynthConfig
from pe_triage.synth import generate_cohort

SITE = "site-a"
COMPRESSED = {"rle": "site-b", "jpeg2000": "site-c"}  # the synthetic sites' transfer syntaxes (synth.sites)
Runs = dict[str, list[dict[str, Any]]]


def _generate(root: Path, config: SynthConfig) -> Path:
    if not (root / "truth" / "cohort.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        generate_cohort(root, config)
    return root / "sites"


def cohorts(workdir: Path, patients: int, slices: int, factor: int, compressed: int, size: int) -> dict[str, Path]:
    """Source folders: ``small``, ``large`` (uncompressed), ``rle``, ``jpeg2000``."""
    base = replace(SynthConfig(), sites=1, slices=slices, size=size, write_tissue_maps=False)
    large = _generate(workdir / f"cohort-{patients * factor}x{slices}-{size}px",
                      replace(base, patients_per_site=patients * factor)) / SITE / "dicom"
    small = workdir / f"cohort-{patients}x{slices}-{size}px-subset"
    if not small.exists():
        tmp = small.with_name(small.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in sorted(p for p in large.iterdir() if p.is_dir())[:patients]:
            shutil.copytree(folder, tmp / folder.name, copy_function=os.link)
        tmp.rename(small)
    mixed = _generate(workdir / f"cohort-3-sites-{compressed}-{size}px",
                      replace(base, sites=3, patients_per_site=1, slices=compressed))
    sources = {"small": small, "large": large}
    for kind, site in COMPRESSED.items():
        sources[kind] = mixed / site / "dicom"
        sources[f"{kind}-half"] = _half(sources[kind], mixed / f"{site}-half")
    return sources


def _half(source: Path, folder: Path) -> Path:
    """The first half of ``source``'s files (its only series, in instance order), hard-linked into ``folder``."""
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        files = files_of(source)
        for path in files[: len(files) // 2]:
            (tmp / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, tmp / path.relative_to(source))
        tmp.rename(folder)
    return folder


def files_of(source: Path) -> list[Path]:
    return sorted(p for p in source.rglob("*") if p.is_file())


def _cpu(who: int = resource.RUSAGE_SELF) -> float:
    """CPU seconds of this process (``RUSAGE_SELF``), or of its children that have ended and their own
    children (``RUSAGE_CHILDREN``: a command and its workers)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _decode_all(files: Sequence[Path]) -> None:
    for path in files:
        pydicom.dcmread(path).pixel_array


def bare_loop(files: Sequence[Path], processes: int = 1) -> dict[str, float]:
    """Wall and CPU seconds of the bare decode loop over ``files``, split over ``processes``."""
    start, cpu = time.perf_counter(), _cpu() + _cpu(resource.RUSAGE_CHILDREN)
    if processes == 1:
        _decode_all(files)
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_decode_all, [files[i::processes] for i in range(processes)])
    return {"seconds": time.perf_counter() - start, "cpu_s": _cpu() + _cpu(resource.RUSAGE_CHILDREN) - cpu}


def _tree_rss(proc: psutil.Process) -> int:
    """Resident memory of ``proc`` and its children; processes that end meanwhile count nothing."""
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in tree:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def ingest_run(source: Path, out: Path, workers: int, config: Path) -> dict[str, Any]:
    """One ``pe-triage ingest`` into a fresh dataset: its report's seconds and workers, the command's CPU
    seconds, the peak RSS of its process tree."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pe_triage.cli", "ingest", "--site", SITE, "--source", str(source),
           "--out", str(out), "--workers", str(workers), "--config", str(config), "--demo"]
    cpu = _cpu(resource.RUSAGE_CHILDREN)  # the command's own, not this process's sampling
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        env={**os.environ, "PE_TRIAGE_PROGRESS": "off"})
    peak = 0
    done = threading.Event()

    def sample() -> None:  # each sample costs ~1 ms of CPU (psutil walks /proc): 10 a second
        nonlocal peak
        while True:
            peak = max(peak, _tree_rss(proc))
            if done.wait(0.1):
                return

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    cpu = _cpu(resource.RUSAGE_CHILDREN) - cpu
    if proc.returncode:
        raise RuntimeError(f"ingest failed: {err.decode()[-2000:]}")
    report = json.loads((out / "_reports" / f"site={SITE}" / "ingest_report.json").read_text())
    timing = report["timing"]
    return {"seconds": timing["seconds"], "scan_seconds": timing["scan_seconds"], "cpu_s": cpu, "peak_rss": peak,
            "workers_used": timing["workers"], "ingested": report["files"]["ingested"]}


def _warm(sources: dict[str, Path]) -> None:
    """Every file in the page cache, so each candidate reads from memory."""
    for source in sources.values():
        for path in files_of(source):
            path.read_bytes()


def measure(sources: dict[str, Path], workdir: Path, repeats: int) -> Runs:
    """Every candidate once per round, in one order; the raw runs by candidate."""
    files = {k: files_of(v) for k, v in sources.items()}
    config = workdir / "ingest.yaml"
    config.write_text("ingest:\n  min_files_per_worker: 1\n")  # --workers N starts N, however small the cohort
    candidates: dict[str, Callable[[], dict[str, Any]]] = {
        "bare_1": lambda: bare_loop(files["small"]), "bare_2": lambda: bare_loop(files["small"], 2)}
    for workers in (1, 2):
        for size in ("small", "large"):
            candidates[f"ingest_{size}_{workers}"] = (
                lambda s=size, w=workers: ingest_run(sources[s], workdir / f"out-{s}-{w}", w, config))
    for kind in COMPRESSED:
        candidates[f"bare_{kind}"] = lambda k=kind: bare_loop(files[k])
        for part in (kind, f"{kind}-half"):
            candidates[f"ingest_{part}"] = lambda k=part: ingest_run(sources[k], workdir / f"out-{k}", 1, config)
    runs: Runs = {name: [] for name in candidates}
    for _ in range(repeats):
        _warm(sources)
        for name, fn in candidates.items():
            runs[name].append(fn())
    for name, values in runs.items():  # every slice of every cohort ingested
        if name.startswith("ingest_"):
            expected = len(files[name.split("_")[1]])
            assert all(r["ingested"] == expected for r in values), (name, values)
    return runs


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _ingest_summary(runs: list[dict[str, Any]], n: int, megabytes: float) -> dict[str, Any]:
    seconds = _median(runs, "seconds")
    return {"slices": n, "seconds": round(seconds, 3), "scan_seconds": round(_median(runs, "scan_seconds"), 3),
            "cpu_seconds": round(_median(runs, "cpu_s"), 3), "slices_per_s": round(n / seconds, 1),
            "mb_per_s": round(megabytes / seconds, 1), "workers_used": max(r["workers_used"] for r in runs),
            "peak_rss_mb": round(max(r["peak_rss"] for r in runs) / 1e6, 1)}


def _per_workers(runs: Runs, n: dict[str, int], mb: dict[str, float], workers: int,
                 bare: dict[str, float]) -> dict[str, Any]:
    """One worker count: both cohorts, the steady rates between them and the ratios to the bare loop."""
    small = _ingest_summary(runs[f"ingest_small_{workers}"], n["small"], mb["small"])
    large = _ingest_summary(runs[f"ingest_large_{workers}"], n["large"], mb["large"])
    added = n["large"] - n["small"]
    steady = added / max(large["seconds"] - small["seconds"], 1e-9)
    steady_cpu_ms = 1e3 * (large["cpu_seconds"] - small["cpu_seconds"]) / added
    return {
        "small_cohort": small, "large_cohort": large,
        "steady_slices_per_s": round(steady, 1),
        "steady_cpu_ms_per_slice": round(steady_cpu_ms, 3),
        "fixed_seconds": round(small["seconds"] - n["small"] / steady, 2),
        "per_worker_vs_bare_loop_steady": round(steady / workers / bare["slices_per_s"], 3),
        "per_worker_vs_bare_loop_steady_cpu": round(bare["cpu_ms_per_slice"] / steady_cpu_ms, 3),
        "per_worker_vs_bare_loop_whole_run": round(large["slices_per_s"] / workers / bare["slices_per_s"], 3),
        "peak_rss_large_vs_small": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
    }


def summarise(runs: Runs, sources: dict[str, Path]) -> dict[str, Any]:
    """The figures the issue asks for, from the raw runs."""
    files = {k: files_of(v) for k, v in sources.items()}
    mb = {k: sum(p.stat().st_size for p in v) / 1e6 for k, v in files.items()}
    n = {k: len(v) for k, v in files.items()}
    bare = {"slices_per_s": round(n["small"] / _median(runs["bare_1"], "seconds"), 1),
            "mb_per_s": round(mb["small"] / _median(runs["bare_1"], "seconds"), 1),
            "cpu_ms_per_slice": round(1e3 * _median(runs["bare_1"], "cpu_s") / n["small"], 3)}
    result: dict[str, Any] = {
        "bare_decode_loop": bare,
        "bare_decode_loop_2_processes": {
            "slices_per_s": round(n["small"] / _median(runs["bare_2"], "seconds"), 1),
            "scaling_vs_1": round(_median(runs["bare_1"], "seconds") / _median(runs["bare_2"], "seconds"), 2)},
        "ingest": {f"workers_{w}": _per_workers(runs, n, mb, w, bare) for w in (1, 2)},
    }
    one, two = result["ingest"]["workers_1"], result["ingest"]["workers_2"]
    result["scaling_2_vs_1_workers"] = {
        "steady": round(two["steady_slices_per_s"] / one["steady_slices_per_s"], 2),
        "whole_run": round(two["large_cohort"]["slices_per_s"] / one["large_cohort"]["slices_per_s"], 2)}
    result["compressed_1_worker"] = {}
    for kind in COMPRESSED:
        bare_rate = n[kind] / _median(runs[f"bare_{kind}"], "seconds")
        whole = _ingest_summary(runs[f"ingest_{kind}"], n[kind], mb[kind])
        half = _ingest_summary(runs[f"ingest_{kind}-half"], n[f"{kind}-half"], mb[f"{kind}-half"])
        steady = (n[kind] - n[f"{kind}-half"]) / max(whole["seconds"] - half["seconds"], 1e-9)
        result["compressed_1_worker"][kind] = {
            "slices": n[kind], "bare_decode_loop_slices_per_s": round(bare_rate, 1),
            "ingest_slices_per_s": whole["slices_per_s"], "ingest_seconds": whole["seconds"],
            "ingest_steady_slices_per_s": round(steady, 1),
            "ingest_vs_bare_loop_steady": round(steady / bare_rate, 3),
            "ingest_vs_bare_loop_whole_run": round(whole["slices_per_s"] / bare_rate, 3)}
    return result


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "pyarrow": pa.__version__,
            "pydicom": pydicom.__version__, "load_average_1_5_15_before": [round(v, 2) for v in os.getloadavg()]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=8, help="series of the small uncompressed cohort")
    parser.add_argument("--slices", type=int, default=120, help="slices per series")
    parser.add_argument("--large-factor", type=int, default=2, help="the large cohort has this many times the series")
    parser.add_argument("--compressed-slices", type=int, default=120, help="slices of each compressed site")
    parser.add_argument("--size", type=int, default=512, help="pixels per side (the targets are for 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/pe-triage-bench")
    parser.add_argument("--out", default="benchmarks/results/ingest.json")
    args = parser.parse_args(argv)
    if args.large_factor < 2:
        parser.error("--large-factor must be at least 2: the steady rate is the difference between the cohorts")

    workdir = Path(args.workdir)
    sources = cohorts(workdir, args.patients, args.slices, args.large_factor, args.compressed_slices, args.size)
    machine = _machine()
    runs = measure(sources, workdir, args.repeats)
    machine["load_average_1_5_15_after"] = [round(v, 2) for v in os.getloadavg()]
    result = {"machine": machine,
              "cohort": {"series_small": args.patients, "series_large": args.patients * args.large_factor,
                         "slices_per_series": args.slices, "size_px": args.size, "repeats": args.repeats,
                         "transfer_syntax": "Explicit VR Little Endian", "zstd_level": IngestConfig().zstd_level},
              **summarise(runs, sources)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

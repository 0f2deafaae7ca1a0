"""Training step throughput: two parts, each writing its own JSON.

``archs`` (``--out``): throughput and peak memory of CBAMDRN (cbam_drn_d_54) vs plain DRN-D-54 vs
ResNet-50, as the multi-window model the trainer builds (DWL: two branches), same input size, same run.

    python benchmarks/train.py --part archs [--size 224] [--batch 8] [--width 1.0] [--out benchmarks/results/train.json]

``threads`` (``--threads-out``): one training alone vs two side by side (the two stages), each
process on torch's default threads, on the trainer's share (``training.train.training_threads``:
the CPUs it may use over ``train.side_by_side``) or, alone, on one thread; on the demo's model and
input, in the environment given (``OMP_WAIT_POLICY`` is recorded: it decides whether a thread that
waits at a barrier spins or sleeps, which matters once a core is shared). Every process of a
candidate starts its timed steps together and steps for ``--seconds``; reported are the images/s of
all of them together and the swing of single steps (p10 / p90 of per-step images/s), since
oversubscribed cores show as unsteady steps first. Synthetic batches: the loader is not measured.

    python benchmarks/train.py --part threads [--seconds 20] [--rounds 5] [--threads-out benchmarks/results/train-threads.json]

Each architecture runs in its own spawned process (peak RSS per model, no allocator carry-over);
the candidates are interleaved over ``--rounds`` rounds and medians reported, since timings on a
shared 2-core VM vary by ±30 %. On CUDA the step uses bf16 autocast + channels_last (the trainer's
GPU path), reports peak allocated GPU memory and the GPU's utilisation sampled during the timed steps.
Target (training issue): CBAM's overhead over plain DRN <= 1.3x time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from pathlib import Path
from queue import Empty
from typing import Any

import torch
import torch.nn.functional as F

from pe_triage.config import ModelConfig, TrainConfig
from pe_triage.models import build_model, parameter_count
from pe_triage.parallel import available_cpus

ARCHS = ("cbam_drn_d_54", "drn_d_54", "resnet50")


def _gpu_utilisation(samples: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5)
            samples.append(int(out.stdout.split()[0]))
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return
        stop.wait(0.2)


def _measure(arch: str, width: float, size: int, batch: int, windows: int, steps: int, queue: Any) -> None:
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as the trainer does
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(ModelConfig(arch=arch, width=width), windows).to(device)
    fmt = torch.channels_last if cuda else torch.contiguous_format  # channels_last training crashes this CPU build
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, windows, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=device).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.binary_cross_entropy_with_logits(model(x)[:, 0].float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_gpu_utilisation, args=(samples, stop), daemon=True) if cuda else None
    if sampler:
        sampler.start()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stop.set()
    queue.put({
        "images_per_s": batch * steps / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "gpu_utilisation_pct": statistics.median(samples) if samples else None,
        "parameters": parameter_count(model),
    })


def _collect(queue: Any, procs: list[Any]) -> list[dict[str, Any]]:
    """One result per process; a process that died without one is an error, not a hang."""
    results: list[dict[str, Any]] = []
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=1.0))
        except Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a benchmark process failed (exit codes {[p.exitcode for p in procs]})") from None
    for p in procs:
        p.join()
    return results


def run_one(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(arch, args.arch_width, args.size, args.batch, args.windows, args.steps, queue))
    proc.start()
    return _collect(queue, [proc])[0]


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": mp.cpu_count(),
            "available_cpus": available_cpus(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "load_average_before": list(os.getloadavg())}


def _write(path: str, result: dict[str, Any]) -> None:
    result["machine"]["load_average_after"] = list(os.getloadavg())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


def archs(args: argparse.Namespace) -> dict[str, Any]:
    machine = _machine()
    names = args.archs.split(",")
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in names}
    for r in range(args.rounds):
        for arch in names:
            runs[arch].append(run_one(arch, args))
            print(f"round {r + 1} {arch}: {runs[arch][-1]['images_per_s']:.2f} img/s", flush=True)
    summary = {
        arch: {
            "images_per_s": statistics.median(m["images_per_s"] for m in ms),
            "peak_rss_mb": max(m["peak_rss_mb"] for m in ms),
            "peak_gpu_mb": ms[0]["peak_gpu_mb"],
            "gpu_utilisation_pct": statistics.median(m["gpu_utilisation_pct"] for m in ms) if ms[0]["gpu_utilisation_pct"] is not None else None,
            "parameters": ms[0]["parameters"],
            "runs": [round(m["images_per_s"], 3) for m in ms],
        }
        for arch, ms in runs.items()
    }

    def ratio(a: str, b: str) -> float | None:
        return summary[a]["images_per_s"] / summary[b]["images_per_s"] if a in summary and b in summary else None

    result = {
        "machine": machine,
        "setup": {"size": args.size, "batch": args.batch, "width": args.arch_width, "windows": args.windows, "steps": args.steps,
                  "rounds": args.rounds, "precision": "bf16 autocast + channels_last" if torch.cuda.is_available() else "fp32"},
        "models": summary,
        "cbam_overhead_vs_drn": ratio("drn_d_54", "cbam_drn_d_54"),
        "drn_vs_resnet50_time": ratio("resnet50", "drn_d_54"),
    }
    _write(args.out, result)
    print(json.dumps({k: result[k] for k in ("setup", "cbam_overhead_vs_drn", "drn_vs_resnet50_time")}, indent=2))
    return result


def _steady(model_cfg: ModelConfig, size: int, batch: int, threads: int | None, start: Any, seconds: float,
            queue: Any) -> None:
    """One training process of a candidate: warm up, wait for the others, then step for ``seconds``."""
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as the trainer does
    if threads is not None:
        torch.set_num_threads(threads)
    model = build_model(model_cfg, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 2, size, size), torch.randint(0, 2, (batch,)).float()

    def step() -> None:
        loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start.wait()
    rates: list[float] = []
    t0 = time.perf_counter()
    while not rates or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        step()
        rates.append(batch / (time.perf_counter() - t))
    queue.put({"threads": torch.get_num_threads(), "images": batch * len(rates), "seconds": time.perf_counter() - t0,
               "steps": rates})


def thread_candidates(cpus: int) -> dict[str, list[int | None]]:
    """Candidate -> thread setting of each of its processes (None: torch's default, as before the trainer set it)."""
    from pe_triage.training.train import training_threads  # here: spawned steppers need not import the trainer

    return {
        "one_default": [None],
        "one_share": [training_threads(TrainConfig(), cpus)],
        "one_single": [1],
        "two_default": [None, None],
        "two_share": [training_threads(TrainConfig(side_by_side=2), cpus)] * 2,
    }


def _candidate_once(model_cfg: ModelConfig, args: argparse.Namespace, threads: list[int | None]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(len(threads))
    procs = [ctx.Process(target=_steady, args=(model_cfg, args.threads_size, args.threads_batch, t, start, args.seconds, queue))
             for t in threads]
    for p in procs:
        p.start()
    return _collect(queue, procs)


def _steadiness(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    totals = [sum(p["images"] / p["seconds"] for p in run) for run in runs]
    steps = sorted(r for run in runs for p in run for r in p["steps"])
    p10, p50, p90 = (steps[min(len(steps) - 1, int(q * len(steps)))] for q in (0.1, 0.5, 0.9))
    return {"images_per_s": statistics.median(totals), "runs": [round(t, 2) for t in totals],
            "threads": [p["threads"] for p in runs[0]],
            "per_process_images_per_s": statistics.median(p["images"] / p["seconds"] for run in runs for p in run),
            "step_images_per_s": {"p10": p10, "median": p50, "p90": p90, "swing_p90_over_p10": p90 / p10,
                                  "steps": len(steps)}}


def _ratio(summary: dict[str, Any], a: str, b: str, value: Any) -> float | None:
    return float(value(summary[a]) / value(summary[b])) if a in summary and b in summary else None


def threads(args: argparse.Namespace) -> dict[str, Any]:
    machine = _machine()
    model_cfg = ModelConfig(arch=args.threads_arch, width=args.threads_width, fusion=args.fusion)
    candidates = {k: v for k, v in thread_candidates(available_cpus()).items() if k in args.candidates.split(",")}
    runs: dict[str, list[list[dict[str, Any]]]] = {c: [] for c in candidates}
    for r in range(args.rounds):
        for name, setting in candidates.items():
            runs[name].append(_candidate_once(model_cfg, args, setting))
            total = sum(p["images"] / p["seconds"] for p in runs[name][-1])
            print(f"round {r + 1} {name} threads {[p['threads'] for p in runs[name][-1]]}: {total:.1f} img/s", flush=True)
    summary = {name: _steadiness(rs) for name, rs in runs.items()}
    result = {
        "machine": machine,
        "setup": {"arch": args.threads_arch, "width": args.threads_width, "fusion": args.fusion, "size": args.threads_size,
                  "batch": args.threads_batch, "seconds": args.seconds, "rounds": args.rounds},
        "candidates": summary,
        # two trainings side by side on their share against on torch's default threads: throughput and step swing
        "two_share_vs_default_images_per_s": _ratio(summary, "two_share", "two_default", lambda c: c["images_per_s"]),
        "two_swing_share_vs_default": _ratio(summary, "two_share", "two_default",
                                             lambda c: c["step_images_per_s"]["swing_p90_over_p10"]),
    }
    _write(args.threads_out, result)
    print(json.dumps({n: {k: v for k, v in c.items() if k != "runs"} for n, c in summary.items()}, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("archs", "threads", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=5)
    archs_args = parser.add_argument_group("archs")
    archs_args.add_argument("--archs", default=",".join(ARCHS), help="comma-separated")
    archs_args.add_argument("--size", type=int, default=224)
    archs_args.add_argument("--batch", type=int, default=8)
    archs_args.add_argument("--width", dest="arch_width", type=float, default=1.0)
    archs_args.add_argument("--windows", type=int, default=2, help="branches (2 = DWL)")
    archs_args.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    archs_args.add_argument("--out", default="benchmarks/results/train.json")
    threads_args = parser.add_argument_group("threads (defaults: the demo's model, input and batch)")
    threads_args.add_argument("--threads-arch", default="cbam_drn_d_54")
    threads_args.add_argument("--threads-width", type=float, default=0.125)
    threads_args.add_argument("--fusion", default="stacked")
    threads_args.add_argument("--threads-size", type=int, default=128)
    threads_args.add_argument("--threads-batch", type=int, default=32)
    threads_args.add_argument("--seconds", type=float, default=20.0, help="timed stepping per process and round")
    threads_args.add_argument("--candidates", default="one_default,one_share,one_single,two_default,two_share",
                              help="comma-separated, of: one_default, one_share, one_single, two_default, two_share")
    threads_args.add_argument("--threads-out", default="benchmarks/results/train-threads.json")
    args = parser.parse_args(argv)
    return {part: run(args) for part, run in (("archs", archs), ("threads", threads)) if args.part in (part, "all")}


if __name__ == "__main__":
    main()

"""Training step throughput and peak memory: CBAMDRN (cbam_drn_d_54) vs plain DRN-D-54 vs ResNet-50,
as the multi-window model the trainer builds (DWL: two branches), same input size, same run.

    python benchmarks/train.py [--size 224] [--batch 8] [--width 1.0] [--out benchmarks/results/train.json]

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
import platform
import resource
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pe_triage.config import ModelConfig
from pe_triage.models import build_model, parameter_count

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


def run_one(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(arch, args.width, args.size, args.batch, args.windows, args.steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return dict(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--windows", type=int, default=2, help="branches (2 = DWL)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/train.json")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in ARCHS}
    for r in range(args.rounds):
        for arch in ARCHS:
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
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": mp.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "setup": {"size": args.size, "batch": args.batch, "width": args.width, "windows": args.windows, "steps": args.steps,
                  "rounds": args.rounds, "precision": "bf16 autocast + channels_last" if torch.cuda.is_available() else "fp32"},
        "models": summary,
        "cbam_overhead_vs_drn": summary["drn_d_54"]["images_per_s"] / summary["cbam_drn_d_54"]["images_per_s"],
        "drn_vs_resnet50_time": summary["resnet50"]["images_per_s"] / summary["drn_d_54"]["images_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("setup", "cbam_overhead_vs_drn", "drn_vs_resnet50_time")}, indent=2))


if __name__ == "__main__":
    main()

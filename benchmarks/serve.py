"""Latency and throughput of ``pe-triage serve`` (issue 18, item 5): a warm server triaging one
synthetic study sent as DICOM files (multipart), end to end.

    python benchmarks/serve.py [--slices 300 --size 512 --requests 10] [--device cpu|cuda]
        [--config configs/demo.yaml] [--work DIR] [--out FILE]

The models are the demo configuration's architecture (``--config``) with random weights: serving
time does not depend on what the weights learned. The server runs as a real ``pe-triage serve``
process on a local model folder (the registered form, ``save_composite``), on every core; after one
warm-up request the client sends ``--requests`` studies one after another. Reported: client latency
p50/p95 and studies per minute, and the server's time split per request (``timings_ms`` of
``/v1/triage``: receive, decode, crop, model, report) with the rest of the client's time as
``transfer_and_encode`` (the request upload before the server sees it and the JSON answer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import machine  # noqa: E402  (the sibling benchmark's machine description)

from pe_triage.artifact import save_model  # noqa: E402
from pe_triage.config import Config, SynthConfig, load_config, to_dict  # noqa: E402
from pe_triage.models import build_model  # noqa: E402
from pe_triage.predict import Triage  # noqa: E402
from pe_triage.preprocess import resolve_windows  # noqa: E402
from pe_triage.registry.pyfunc import save_composite  # noqa: E402
from pe_triage.registry.server import free_port  # noqa: E402
from pe_triage.synth import generate_cohort  # noqa: E402

STEPS = ("receive", "decode", "crop", "model", "report")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=300, help="slices of the study (issue 18: 300)")
    ap.add_argument("--size", type=int, default=512, help="slice size in pixels (issue 18: 512)")
    ap.add_argument("--requests", type=int, default=10, help="timed requests after one warm-up")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", default="configs/demo.yaml", help="model and preprocessing (the demo model size)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/serve-DEVICE-SLICESxSIZE.json)")
    return ap


def stage_models(work: Path, config: Config) -> tuple[Path, Path]:
    """Both stages: the configuration's architecture and windows, random weights."""
    windows = [w.to_dict() for w in resolve_windows(config.preprocess)]
    paths = []
    for stage in (1, 2):
        torch.manual_seed(stage)
        meta = {"stage": stage, "model": to_dict(config.model), "windows": windows, "threshold": 0.5,
                "preprocess": to_dict(config.preprocess) | {"workers": None}, "data": {}, "package_version": "benchmark"}
        paths.append(save_model(work / f"stage{stage}", build_model(config.model, len(windows)).eval(), meta, history=[]))
    return paths[0], paths[1]


def start_server(model: Path, device: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = shutil.which("pe-triage", path=os.path.dirname(sys.executable)) or "pe-triage"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "serve", "--model", str(model), "--port", str(port), "--device", device],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not become ready; see {log_path}")
        time.sleep(0.5)


def measure(url: str, files: list[Path], n: int) -> list[dict[str, float]]:
    """One warm-up request, then ``n`` timed ones: client latency and the server's split (ms)."""
    parts = [("file", (f"{i}.dcm", f.read_bytes(), "application/dicom")) for i, f in enumerate(files)]
    runs = []
    for i in range(n + 1):
        start = time.perf_counter()
        response = requests.post(f"{url}/v1/triage", files=parts, timeout=900)
        latency = 1000 * (time.perf_counter() - start)
        if response.status_code != 200:
            raise RuntimeError(f"/v1/triage answered {response.status_code}: {response.text[:500]}")
        server = response.json()["timings_ms"]
        if i:
            runs.append({"latency": latency, **{k: float(server.get(k, 0)) for k in STEPS},
                         "transfer_and_encode": latency - server["total"]})
    return runs


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    latency = np.array([r["latency"] for r in runs])
    return {
        "latency_ms": {"p50": round(float(np.percentile(latency, 50))), "p95": round(float(np.percentile(latency, 95))),
                       "mean": round(float(latency.mean()))},
        "studies_per_min": round(60_000 / float(latency.mean()), 2),
        "split_ms_median": {k: round(statistics.median(r[k] for r in runs)) for k in (*STEPS, "transfer_and_encode")},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    config = load_config(a.config)
    with tempfile.TemporaryDirectory(prefix="pe-triage-serve-bench-") as tmp:
        work = a.work or Path(tmp)
        synth = SynthConfig(sites=1, patients_per_site=1, slices=a.slices, size=a.size, seed=0, write_tissue_maps=False)
        t0 = time.monotonic()
        generate_cohort(work / "cohort", synth)
        files = sorted((work / "cohort" / "sites").rglob("*.dcm"))
        body_mb = round(sum(f.stat().st_size for f in files) / 2**20, 1)
        s1, s2 = stage_models(work, config)
        save_composite(work / "model", s1, s2, Triage.load(s1, s2))
        prepare_s = time.monotonic() - t0
        proc, url = start_server(work / "model", a.device, work / "serve.log")
        try:
            runs = measure(url, files, a.requests)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    result = {"benchmark": "serve", **machine(), "server_threads": os.environ.get("OMP_NUM_THREADS", "all cores"),
              "load_average_1min": round(os.getloadavg()[0], 2), "device": a.device, "slices": len(files), "size": a.size,
              "body_mb": body_mb,
              "model": to_dict(config.model), "preprocess_size": config.preprocess.size,
              "requests": a.requests, "prepare_seconds": round(prepare_s, 1), **summarise(runs), "runs": runs}
    out = a.out or Path(f"benchmarks/results/serve-{a.device}-{a.slices}x{a.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(files)} slices {a.size}px on {a.device}: p50 {result['latency_ms']['p50']} ms, "
          f"p95 {result['latency_ms']['p95']} ms, {result['studies_per_min']} studies/min; "
          f"split {result['split_ms_median']}")
    return result


if __name__ == "__main__":
    main()

"""benchmarks/ingest.py at a smoke size (seconds): a change of defaults or of the library's API breaks the
test suite, not the next person who runs the benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ingest.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_ingest", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the 2-process bare loop pickles its function by module name
    spec.loader.exec_module(module)
    return module


def test_ingest_benchmark_runs_at_smoke_size(tmp_path: Path) -> None:
    bench = load_script()
    out = tmp_path / "ingest.json"
    result = bench.main(["--patients", "1", "--slices", "3", "--compressed-slices", "2", "--size", "64",
                         "--repeats", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert {"cpus", "processor", "load_average_1_5_15_before", "load_average_1_5_15_after"} <= set(result["machine"])
    assert result["bare_decode_loop"]["slices_per_s"] > 0 and result["bare_decode_loop"]["cpu_ms_per_slice"] > 0
    assert result["bare_decode_loop_2_processes"]["scaling_vs_1"] > 0
    for workers in (1, 2):
        run = result["ingest"][f"workers_{workers}"]
        for cohort, slices in (("small_cohort", 3), ("large_cohort", 6)):
            assert run[cohort]["slices"] == slices and run[cohort]["workers_used"] == workers
            assert run[cohort]["peak_rss_mb"] > 0 and run[cohort]["cpu_seconds"] > 0
        assert {"steady_slices_per_s", "steady_cpu_ms_per_slice", "fixed_seconds", "per_worker_vs_bare_loop_steady",
                "per_worker_vs_bare_loop_steady_cpu", "per_worker_vs_bare_loop_whole_run",
                "peak_rss_large_vs_small"} <= set(run)
    assert set(result["scaling_2_vs_1_workers"]) == {"steady", "whole_run"}
    for kind in ("rle", "jpeg2000"):
        compressed = result["compressed_1_worker"][kind]
        assert compressed["slices"] == 2 and compressed["ingest_slices_per_s"] > 0
        assert compressed["bare_decode_loop_slices_per_s"] > 0
        assert {"ingest_steady_slices_per_s", "ingest_vs_bare_loop_steady", "ingest_vs_bare_loop_whole_run"} <= set(compressed)

"""benchmarks/evaluate.py at a smoke size (seconds): a change of defaults or of the library's API
breaks the test suite, not the next person who runs the benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "evaluate.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_evaluate", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_evaluate_benchmark_runs_at_smoke_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PE_TRIAGE_PROGRESS", "off")
    bench = load_script()
    out = tmp_path / "evaluate.json"
    result = bench.main(["--sizes", "16,24", "--image", "32", "--repeats", "1", "--bootstrap", "20", "--gradcam", "1",
                         "--localisation", "4", "--kernel-images", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert {"cpus", "affinity", "threads", "load_average_before", "load_average_after"} <= set(result["machine"])
    assert result["setup"]["sizes"] == [24, 24]  # whole patients of 8 slices, at least one per class
    for runs in result["results"].values():
        assert set(runs) == {"bare", "bootstrap", "gradcam", "full"}
        for run in runs.values():
            assert run["slices_per_s"] > 0 and run["slices_per_cpu_s"] > 0
            assert {"score", "metrics", "report"} <= set(run["phases_s"])
        assert {"localisation", "overlays"} <= set(runs["full"]["phases_s"])
    assert set(result["scaling"]) == {"bare", "bootstrap", "gradcam", "full"}
    kernel = result["forward_kernel"]
    assert {f"threads_{t}_batch_{b}" for t in (1, 2) for b in (1, 4, 16, 64)} < set(kernel)
    assert kernel["threads_1_batch_4"]["images_per_cpu_s"] > 0 and kernel["one_thread_batch_4_over_64"] > 0

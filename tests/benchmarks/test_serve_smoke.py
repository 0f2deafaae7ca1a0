"""benchmarks/serve.py at a smoke size (seconds): a real ``pe-triage serve`` process, a tiny study,
two timed requests; a change of the service's API or timings breaks the suite, not the next run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_serve", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_serve_benchmark_runs_at_smoke_size(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    result = load_script().main(["--slices", "6", "--size", "128", "--requests", "2", "--work", str(tmp_path / "work"),
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["slices"] == 6 and len(result["runs"]) == 2 and result["device"] == "cpu"
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p95"] and result["studies_per_min"] > 0
    split = result["split_ms_median"]
    assert set(split) == {"receive", "decode", "crop", "model", "report", "transfer_and_encode"}
    assert split["model"] > 0 and split["decode"] > 0
    assert result["model"]["arch"] == "cbam_drn_d_54"  # the demo model size, from configs/demo.yaml

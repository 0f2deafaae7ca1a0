"""benchmarks/preprocess.py at a smoke size (seconds): a change of defaults or of the library's API
breaks the test suite, not the next person who runs the benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "preprocess.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_preprocess", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def test_preprocess_benchmark_runs_at_smoke_size(tmp_path: Path, real_ct: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PE_TRIAGE_PROGRESS", "off")
    bench = load_script()
    out = tmp_path / "preprocess.json"
    result = bench.main(["--repeats", "1", "--slices", "12", "--long-repeat", "2", "--loader-patients", "5",
                         "--loader-slices", "6", "--loader-size", "64", "--workdir", str(tmp_path / "work"),
                         "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert {"cpus", "processor", "load_average_1min"} <= set(result["machine"])
    kernel = result["window_crop_resize_per_core"]
    assert kernel["library"]["slices_per_s"] > 0 and kernel["library"]["slices_per_cpu_s"] > 0
    assert kernel["naive_reference"]["slices_per_s"] > 0 and kernel["speedup"] > 0
    step = result["preprocess_step_incl_read_decode_write"]
    for name, slices in (("lidc", 12), ("long", 24)):
        for workers in (1, 2):
            run = step[f"{name}_workers_{workers}"]
            assert run["slices"] == slices and run["slices_per_s"] > 0 and run["cpu_ms_per_slice"] > 0
            assert 1 <= run["workers_used"] <= workers
        assert step[f"{name}_speedup_2_over_1"] > 0
    assert step["pool_start_s"] > 0 and step["parallel_capacity"] > 0
    assert set(result["loader_samples_per_s"]) == {f"workers_{w}_augment_{a}" for w in (0, 2) for a in (False, True)}

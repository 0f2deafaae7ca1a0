"""benchmarks/learning.py and benchmarks/context.py at a smoke size (seconds): a tiny cohort, a few
training samples, every figure written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = ["--sites", "2", "--patients-per-site", "12", "--slices", "6", "--source-size", "96", "--input", "32",
        "--lesions", "conspicuous", "--samples", "32", "--epoch-samples", "16", "--batch", "8", "--workers", "0",
        "--arch", "cbam_drn_d_22", "--width", "0.125"]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def benchmarks(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("learning", "context"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return {"learning": load("learning"), "context": load("context")}


def test_learning_and_context_benchmarks_run_at_smoke_size(benchmarks: dict[str, ModuleType], tmp_path: Path) -> None:
    work = tmp_path / "work"  # one cohort for both: built by the first, reused by the second
    result = benchmarks["learning"].main([*TINY, "--work", str(work), "--context", "1", "--out", str(tmp_path / "l.json")])
    assert json.loads((tmp_path / "l.json").read_text()) == json.loads(json.dumps(result))
    for stage in ("stage1", "stage2"):
        assert 0.0 <= result["stages"][stage]["val_auroc"] <= 1.0 and "localisation" in result["stages"][stage]
    assert result["model"]["context"] == 1
    out = benchmarks["context"].main([*TINY, "--work", str(work), "--contexts", "0,1", "--seeds", "0,1",
                                      "--out", str(tmp_path / "c.json")])
    assert out["prepare_seconds"] < 5, "the cohort was built again"
    for context in ("0", "1"):
        summary = out["contexts"][context]["summary"]
        assert summary["stage2_val_auroc"]["n"] == 2 and summary["patient_pe_specificity"]["n"] == 2
        assert out["contexts"][context]["model"]["context"] == int(context)

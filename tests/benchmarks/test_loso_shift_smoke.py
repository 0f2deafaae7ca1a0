"""benchmarks/loso_shift.py at a smoke size: both conditions run end to end through the library's
leave-one-site-out steps and every figure is written (the gate's verdict itself needs the real size)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two cohorts and eight small training pairs: about a minute on one core

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_loso_shift_benchmark_runs_both_conditions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("loso_shift", BENCHMARKS / "loso_shift.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "loso_shift", module)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    module.main(["--work", str(tmp_path / "work"), "--patients-per-site", "12", "--samples", "64", "--source-size", "64",
                 "--input", "32", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["shift"]["sites"] == ["site-c"]
    for name in ("no_shift", "shifted"):
        c = result["conditions"][name]
        assert set(c["held_out"]) == {"site-a", "site-b", "site-c"} and c["worst"]["metric"] in (
            "slice_stage1_auroc", "slice_stage2_auroc")
        gates = c["gates"]
        assert gates["max_site_auroc_drop"]["passed"] is (c["worst"]["drop"] <= 0.10)
        worst_pe = max(d["patient_pe_sensitivity"] for d in c["drops"].values() if d["patient_pe_sensitivity"] is not None)
        assert gates["max_site_pe_sensitivity_drop"]["passed"] is (worst_pe <= 0.15)

"""benchmarks/learning.py, benchmarks/context.py and benchmarks/exam.py's comparison at a smoke size
(seconds): a tiny cohort, a few training samples, every figure written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pe_triage.config import Config
from pe_triage.evaluation.metrics import RULES

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
    for name in ("learning", "exam", "context"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return {"learning": load("learning"), "exam": load("exam"), "context": load("context")}


def check_exam_comparison(exam: ModuleType, work: Path, cache: Path) -> None:
    """benchmarks/exam.py's comparison on the stage pair learning.py left in ``work``: a row per rule and
    per exam variant, all on the same test patients, figures and thresholds in [0, 1]."""
    paths = {"stage1": str(work / "model-stage1"), "stage2": str(work / "model-stage2"),
             "windows": str(work / "windows"), "splits": str(work / "splits.parquet")}
    pair = exam.compare_pair(paths, [("gru", "all"), ("attention", "logits")], Config(), cache)
    assert set(pair["rows"]) == {*RULES, "exam[gru:all]", "exam[attention:logits]"}
    assert pair["exams"]["test"] > 0 and any(cache.iterdir())
    for name, row in pair["rows"].items():
        assert row["patients"] == pair["exams"]["test"], name
        assert all(0.0 <= t <= 1.0 for t in row["thresholds"].values()), name
        assert all(v is None or 0.0 <= v <= 1.0 for v in pair["figures"][name].values()), name


@pytest.mark.slow  # ~30 s of CPU: two cohorts' worth of training, embedding and exam fits
def test_learning_context_and_exam_benchmarks_run_at_smoke_size(benchmarks: dict[str, ModuleType], tmp_path: Path) -> None:
    work = tmp_path / "work"  # one cohort for all: built by the first, reused by the others
    result = benchmarks["learning"].main([*TINY, "--work", str(work), "--context", "1", "--out", str(tmp_path / "l.json")])
    assert json.loads((tmp_path / "l.json").read_text()) == json.loads(json.dumps(result))
    for stage in ("stage1", "stage2"):
        assert 0.0 <= result["stages"][stage]["val_auroc"] <= 1.0 and "localisation" in result["stages"][stage]
    assert result["model"]["context"] == 1
    check_exam_comparison(benchmarks["exam"], work, tmp_path / "cache")
    out = benchmarks["context"].main([*TINY, "--work", str(work), "--contexts", "0,1", "--seeds", "0,1",
                                      "--out", str(tmp_path / "c.json")])
    assert out["prepare_seconds"] < 5, "the cohort was built again"
    assert json.loads((tmp_path / "c.json").read_text()) == json.loads(json.dumps(out))
    for context in ("0", "1"):
        entry = out["contexts"][context]
        assert entry["model"]["context"] == int(context) and set(entry["runs"]) == {"0", "1"}
        assert [entry["runs"][s]["rows"]["any"]["patients"] for s in "01"] == [entry["runs"]["0"]["patients"]["test"]] * 2
        for row in (*RULES, "exam[gru:all]"):
            for figure in ("pe_auroc", "pe_sensitivity", "pe_specificity", "disease_auroc", "pe_spec_at_95sens"):
                stats = entry["summary"][f"patient_{row}_{figure}"]
                assert stats["n"] == 2 and 0.0 <= stats["mean"] <= 1.0 and stats["sd"] >= 0.0
        assert entry["summary"]["stage2_val_auroc"]["n"] == 2
    assert any(line.startswith("| patient_exam[gru:all]_pe_auroc |") for line in benchmarks["context"].table(out))


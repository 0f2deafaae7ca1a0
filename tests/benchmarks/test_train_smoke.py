"""benchmarks/train.py at a smoke size (seconds): a change of defaults or of the library's API breaks
the test suite, not the next person who runs the benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pe_triage.config import TrainConfig
from pe_triage.parallel import available_cpus
from pe_triage.training.train import training_threads

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train.py"


def load_script() -> ModuleType:
    """The script as module ``train``: its spawned processes find their target by that name, on the
    ``sys.path`` (``benchmarks/`` put first) that spawn hands them."""
    spec = importlib.util.spec_from_file_location("train", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_train_benchmark_runs_at_smoke_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    monkeypatch.delitem(sys.modules, "train", raising=False)
    bench = load_script()
    archs, threads = tmp_path / "train.json", tmp_path / "threads.json"
    result = bench.main(["--rounds", "1", "--archs", "cbam_drn_d_54", "--size", "32", "--batch", "2", "--width", "0.125",
                         "--steps", "1", "--out", str(archs), "--threads-size", "32", "--threads-batch", "2",
                         "--seconds", "0.2", "--candidates", "two_default,two_share", "--threads-out", str(threads)])
    assert json.loads(archs.read_text()) == result["archs"] and json.loads(threads.read_text()) == result["threads"]
    for part in result.values():
        assert {"cpus", "available_cpus", "load_average_before", "load_average_after"} <= set(part["machine"])
    model = result["archs"]["models"]["cbam_drn_d_54"]
    assert model["images_per_s"] > 0 and model["peak_rss_mb"] > 0 and model["parameters"] > 0
    candidates = result["threads"]["candidates"]
    assert set(candidates) == {"two_default", "two_share"}
    assert set(bench.thread_candidates(2)) == {"one_default", "one_share", "one_single", "two_default", "two_share"}
    share = training_threads(TrainConfig(side_by_side=2), available_cpus())
    assert candidates["two_share"]["threads"] == [share, share]
    for c in candidates.values():
        steps = c["step_images_per_s"]
        assert c["images_per_s"] > 0 and steps["p10"] <= steps["median"] <= steps["p90"] and steps["steps"] >= len(c["threads"])
    assert result["threads"]["two_share_vs_default_images_per_s"] > 0 and result["threads"]["two_swing_share_vs_default"] > 0

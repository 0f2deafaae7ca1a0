"""The main job end to end on a tiny generated cohort (what `bash scripts/demo.sh` runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pe_triage import schema as S
from pe_triage.cli import main

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text("synth: {sites: 3, patients_per_site: 4, slices: 12, size: 96, seed: 3}\n"
                      "preprocess: {size: 64}\n")
    assert main(["demo", "--out", str(tmp_path / "out"), "--config", str(config)]) == 0
    summary = json.loads((tmp_path / "out" / "demo_summary.json").read_text())
    assert summary["preprocess"]["slices_written"] == 3 * 4 * 12
    assert all(r["files"]["quarantined"] == 0 for r in summary["ingest"].values())
    splits = pq.read_table(tmp_path / "out" / "splits.parquet").to_pylist()
    assert {r[S.SPLIT] for r in splits} == {"train", "val", "test"} and len(splits) == 12

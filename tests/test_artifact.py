"""The model artifact's metadata: read into a typed ModelMeta (old formats upgraded), written as the
same JSON, and refused when a field the code relies on is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pe_triage.artifact import (
    FORMAT,
    FORMAT_1,
    META,
    ArtifactError,
    ModelMeta,
    load_model,
    read_meta,
    save_model,
)
from pe_triage.config import ModelConfig, to_dict
from pe_triage.models import build_model
from pe_triage.windows import Window

TINY = ModelConfig(arch="cbam_drn_d_22", width=0.125)
WINDOWS = [{"name": "lung", "lo": -400, "hi": 1500}, {"name": "mediastinal", "lo": 40.0, "hi": 400.0}]


def test_a_format_1_model_json_reads_in_the_current_layout(tmp_path: Path) -> None:
    (tmp_path / META).write_text(json.dumps({
        "format": FORMAT_1, "stage": 2, "model": {"arch": "cbam_drn_d_22", "width": 0.125, "shared_branches": True},
        "windows": WINDOWS, "threshold": 0.25, "mlflow_run_id": "run-1"}))
    meta = ModelMeta.from_dict(read_meta(tmp_path))
    assert (meta.stage, meta.threshold) == (2, 0.25)
    assert meta.model == ModelConfig(arch="cbam_drn_d_22", width=0.125, min_channels=4, fusion="shared")
    assert meta.windows == (Window("lung", -400, 1500), Window("mediastinal", 40, 400))
    assert meta.window_names == ["lung", "mediastinal"]
    assert meta.raw["mlflow_run_id"] == "run-1" and meta.raw["model"]["fusion"] == "shared"


def test_saved_metadata_is_written_as_given_and_reads_back_typed(tmp_path: Path) -> None:
    meta = {"stage": 1, "model": to_dict(TINY), "windows": WINDOWS, "threshold": 0.5, "val": {"auroc": 0.9}}
    out = save_model(tmp_path / "m", build_model(TINY, len(WINDOWS)), meta, history=[])
    assert (out / META).read_text() == json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True)
    loaded = load_model(out).meta
    assert loaded == ModelMeta.from_dict({"format": FORMAT, **meta})
    assert (loaded.stage, loaded.model, loaded.threshold, loaded.raw["val"]) == (1, TINY, 0.5, {"auroc": 0.9})


def test_metadata_without_a_required_field_is_refused(tmp_path: Path) -> None:
    meta = {"stage": 1, "model": to_dict(TINY), "windows": WINDOWS}
    with pytest.raises(ArtifactError, match="model metadata lacks 'threshold'"):
        save_model(tmp_path / "m", build_model(TINY, len(WINDOWS)), meta, history=[])
    assert not (tmp_path / "m").exists()

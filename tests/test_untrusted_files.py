"""Files a user, a pod or the registry can write are never unpickled: a crafted model file is one
clear error line, and what it would run never runs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pe_triage.artifact import WEIGHTS, ArtifactError, load_model, save_model
from pe_triage.cli import main
from pe_triage.config import ModelConfig
from pe_triage.models import build_model

TINY = ModelConfig(arch="cbam_drn_d_22", width=0.125)
WINDOWS = [{"name": "lung", "lo": -400, "hi": 1500}, {"name": "mediastinal", "lo": 40.0, "hi": 400.0}]


class _Hostile:
    """Unpickling this creates ``marker``: what a crafted file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _tampered(tmp_path: Path) -> Path:
    """A genuine model folder whose weights file was replaced by a crafted pickle."""
    folder = save_model(tmp_path / "model", build_model(TINY, 2),
                        {"stage": 1, "model": {"arch": TINY.arch, "width": TINY.width}, "windows": WINDOWS, "threshold": 0.5}, [])
    torch.save({"conv.weight": torch.zeros(1), "payload": _Hostile(tmp_path / "pwned")}, folder / WEIGHTS)
    return folder


def test_a_crafted_weights_file_is_refused_and_never_runs(tmp_path: Path) -> None:
    folder = _tampered(tmp_path)
    with pytest.raises(ArtifactError, match=r"model\.pt: holds objects other than tensors and plain values; refused, none of "
                                            r"it run$"):
        load_model(folder)
    assert not (tmp_path / "pwned").exists()
    (folder / WEIGHTS).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ArtifactError, match=r"model\.pt: not a readable torch file \(corrupt or cut short\)$"):
        load_model(folder)


def test_a_crafted_model_ends_a_command_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(_tampered(tmp_path))
    assert main(["evaluate", "--stage1", folder, "--stage2", folder, "--windows", str(tmp_path), "--splits",
                 str(tmp_path / "s.parquet"), "--out", str(tmp_path / "eval")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].endswith("refused, none of it run"), errors
    assert "Traceback" not in caplog.text + "".join(capsys.readouterr())
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "eval").exists()

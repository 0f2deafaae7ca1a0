"""The configuration blocks the docs tell teams to copy must load: a renamed or removed key breaks
the guide silently otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pe_triage.config import load_config

DOCS = Path(__file__).resolve().parents[1] / "docs"
RSPECT = DOCS / "reproduce-on-rspect.md"


def yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def _write(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("n", range(len(yaml_blocks(RSPECT))))
def test_rspect_guide_yaml_loads(tmp_path: Path, n: int) -> None:
    load_config(_write(tmp_path, yaml_blocks(RSPECT)[n]))  # unknown keys and invalid values raise ConfigError


def test_rspect_guide_gpu_config_is_the_study_model(tmp_path: Path) -> None:
    """The guide's main block sets what its text promises: full-width CBAMDRN, branches, DWL, bf16 on CUDA."""
    blocks = yaml_blocks(RSPECT)
    assert len(blocks) == 2
    cfg = load_config(_write(tmp_path, blocks[0]))
    assert (cfg.model.arch, cfg.model.width, cfg.model.fusion) == ("cbam_drn_d_54", 1.0, "branches")
    assert cfg.train.windows == ("vascular", "clinical_lung")
    assert set(cfg.train.windows) <= set(cfg.preprocess.windows)
    assert (cfg.train.device, cfg.train.amp) == ("cuda", True)
    twl = load_config(_write(tmp_path, blocks[1]))
    assert set(twl.train.windows) <= set(cfg.preprocess.windows) and len(twl.train.windows) == 3


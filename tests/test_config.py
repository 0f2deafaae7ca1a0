"""YAML configuration: partial files override defaults; mistakes are named, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from pe_triage.config import Config, ConfigError, IngestConfig, load_config, parse_config


def test_defaults_without_a_file() -> None:
    assert load_config() == Config()
    assert load_config().ingest.zstd_level == 1


def test_partial_yaml_overrides_only_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ingest:\n  workers: 3\nsynth:\n  pe_extent_slices: [2, 5]\n  pe_fraction: 1\n")
    cfg = load_config(path)
    assert cfg.ingest == IngestConfig(workers=3)
    assert cfg.synth.pe_extent_slices == (2, 5) and cfg.synth.pe_fraction == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ingest:\n  wokers: 3\n", r"ingest: unknown key\(s\) \['wokers'\]"),
        ("ingest:\n  workers: three\n", r"ingest.workers: expected int"),
        ("ingest:\n  strict_labels: 1\n", r"ingest.strict_labels: expected bool"),
        ("synth:\n  pe_extent_slices: [1, 2, 3]\n", r"synth.pe_extent_slices: expected 2 values"),
        ("- a\n- b\n", r"top level must be a mapping"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_text_configuration_is_read_like_a_file() -> None:
    """Pipeline components get the YAML as text: same defaults, same checks as a file."""
    assert parse_config("") == Config()
    assert parse_config("ingest:\n  workers: 3\n").ingest == IngestConfig(workers=3)
    with pytest.raises(ConfigError, match=r"^configuration: top level must be a mapping"):
        parse_config("- a\n")

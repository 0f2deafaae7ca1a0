"""YAML configuration: partial files override defaults; mistakes are named, not ignored."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from pe_triage.config import Config, ConfigError, IngestConfig, load_config, parse_config


def _choice_fields(cls: Any = Config, path: tuple[str, ...] = ()) -> Iterator[tuple[str, type, str, tuple[Any, ...]]]:
    """(key path, section class, field name, choices) of every ``Literal`` field under ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _choice_fields(tp, (*path, f.name))
        elif typing.get_origin(tp) is Literal:
            yield ".".join((*path, f.name)), cls, f.name, typing.get_args(tp)


CHOICES = list(_choice_fields())


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
        ("train:\n  imbalance: weights\n", r"c.yaml: train.imbalance: 'weights' is not one of \['sampler', 'weight', 'none'\]$"),
        ("train:\n  device: yes\n", r"c.yaml: train.device: True is not one of \['auto', 'cpu', 'cuda'\]$"),  # YAML 1.1: a bool
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


def test_the_string_choices_are_literals() -> None:
    assert [key for key, *_ in CHOICES] == [
        "synth.lesions", "preprocess.crop.mode", "model.fusion", "model.pooling", "train.imbalance", "train.device",
        "evaluate.patient_rule", "evaluate.indeterminate", "evaluate.attribution", "operating_point.level",
        "exam.arch", "exam.features"]


def _yaml(key: str, value: object) -> str:
    """A configuration that sets the dotted ``key`` alone."""
    data: Any = value
    for part in reversed(key.split(".")):
        data = {part: data}
    return yaml.safe_dump(data)


@pytest.mark.parametrize(("key", "section", "name", "choices"), CHOICES, ids=[c[0] for c in CHOICES])
def test_a_value_outside_the_choices_is_named_with_its_key(key: str, section: type, name: str,
                                                            choices: tuple[Any, ...]) -> None:
    for value in choices:
        loaded: Any = parse_config(_yaml(key, value))
        for part in key.split("."):
            loaded = getattr(loaded, part)
        assert loaded == value
    from_yaml = f"configuration: {key}: 'bogus' is not one of {list(choices)}"
    with pytest.raises(ConfigError, match=f"^{re.escape(from_yaml)}$"):
        parse_config(_yaml(key, "bogus"))
    in_python = f"{section.__name__}.{name}: 'bogus' is not one of {list(choices)}"
    with pytest.raises(ConfigError, match=f"^{re.escape(in_python)}$"):
        section(**{name: "bogus"})  # a section built in Python checks its choices too


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ingest:\n  workers: [1\n", r"^configuration, line 3, column 1: invalid YAML: expected ',' or '\]', but got "
                                     r"'<stream end>' \(while parsing a flow sequence\)$"),
        ("!!python/object/apply:os.system ['true']\n", r"^configuration, line 1, column 1: invalid YAML: could not determine "
                                                      r"a constructor for the tag 'tag:yaml.org,2002:python/object/apply"),
        ("ingest:\n  7: a\n  wokers: 2\n", r"^configuration: ingest: unknown key\(s\) \['7', 'wokers'\]"),
    ],
    ids=["syntax", "python-tag", "number-key"],
)
def test_text_that_is_not_a_configuration_is_one_config_error_line(text: str, message: str) -> None:
    """What a pipeline component gets as text fails like a file: a ConfigError naming where, on one line."""
    with pytest.raises(ConfigError, match=message) as raised:
        parse_config(text)
    assert "\n" not in str(raised.value)

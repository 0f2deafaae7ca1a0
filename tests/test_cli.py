"""The command line: clear errors with exit status 2, never a traceback, never the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import write_series

from pe_triage.cli import main
from pe_triage.dicom import KEY_ENV


def test_ingest_refuses_to_run_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    write_series(tmp_path / "src", 2)
    assert main(["ingest", "--site", "a", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert KEY_ENV in caplog.text
    assert not (tmp_path / "out").exists()


def test_ingest_with_a_key_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    secret = "hospital-secret-0123456789abcdef"
    monkeypatch.setenv(KEY_ENV, secret)
    write_series(tmp_path / "src", 3)
    assert main(["ingest", "--site", "a", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                 "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["files"]["ingested"] == 3
    assert secret not in caplog.text
    assert all(secret.encode() not in p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_bad_arguments_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["ingest", "--site", "Bad Name", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--demo"]) == 2
    assert "site name" in caplog.text
    assert main(["ingest", "--site", "a", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--demo"]) == 2
    assert "no such folder" in caplog.text
    (tmp_path / "c.yaml").write_text("ingest:\n  wrkers: 2\n")
    assert main(["ingest", "--site", "a", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--demo",
                 "--config", str(tmp_path / "c.yaml")]) == 2
    assert "wrkers" in caplog.text


def test_split_names_bad_ratios(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["split", "--windows", str(tmp_path), "--out", str(tmp_path / "s.parquet"), "--ratios", "5:3"]) == 2
    assert "5:3" in caplog.text

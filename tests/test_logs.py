"""Logging set-up: the project's progress shown, other libraries' chatter not, JSON lines on request."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pe_triage.logs import FORMAT_ENV, configured_logging, log_format


def _records() -> None:
    logging.getLogger("pe_triage.ingest").info("ingest site-a: 10/20 file")
    logging.getLogger("pe_triage.ingest").debug("header of file 3")
    logging.getLogger("openjpeg.encode").info("tile number 1 / 1")
    logging.getLogger("openjpeg.encode").debug("encoding started")
    logging.getLogger("urllib3.connectionpool").warning("retrying")


@pytest.mark.parametrize(("verbosity", "shown"), [
    (0, ["INFO pe_triage.ingest: ingest site-a: 10/20 file", "WARNING urllib3.connectionpool: retrying"]),
    (1, ["INFO pe_triage.ingest: ingest site-a: 10/20 file", "DEBUG pe_triage.ingest: header of file 3",
         "INFO openjpeg.encode: tile number 1 / 1", "WARNING urllib3.connectionpool: retrying"]),
    (2, ["INFO pe_triage.ingest: ingest site-a: 10/20 file", "DEBUG pe_triage.ingest: header of file 3",
         "INFO openjpeg.encode: tile number 1 / 1", "DEBUG openjpeg.encode: encoding started",
         "WARNING urllib3.connectionpool: retrying"]),
], ids=["default", "-v", "-vv"])
def test_levels_show_the_projects_progress_and_keep_the_rest_quiet(capsys: pytest.CaptureFixture[str],
                                                                    verbosity: int, shown: list[str]) -> None:
    with configured_logging(verbosity, "text"):
        _records()
    assert capsys.readouterr().err.splitlines() == shown


def test_json_lines_carry_time_level_logger_and_message(capsys: pytest.CaptureFixture[str]) -> None:
    with configured_logging(0, "json"):
        _records()
        try:
            raise KeyError("boom")
        except KeyError:
            logging.getLogger("pe_triage.cli").exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["level"], e["logger"], e["message"]) for e in lines] == [
        ("INFO", "pe_triage.ingest", "ingest site-a: 10/20 file"), ("WARNING", "urllib3.connectionpool", "retrying"),
        ("ERROR", "pe_triage.cli", "failed")]
    assert all(e["time"].endswith("+00:00") for e in lines) and "KeyError: 'boom'" in lines[-1]["exception"]


def test_the_format_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORMAT_ENV, "JSON")
    assert log_format() == "json" and log_format("text") == "text"
    monkeypatch.setenv(FORMAT_ENV, "yaml")
    with pytest.raises(ValueError, match=f"'yaml' .*{FORMAT_ENV}.*text, json"):
        log_format()


def test_a_basic_config_handler_is_replaced_and_a_capture_kept(capsys: pytest.CaptureFixture[str],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """kfp's executor calls basicConfig (stdout, INFO for everyone) before a component runs: the
    component's set-up takes its place, and a test's capture handler stays."""
    root = logging.getLogger()
    basic = logging.StreamHandler(sys.stdout)
    root.addHandler(basic)
    try:
        with configured_logging():
            assert basic not in root.handlers and caplog.handler in root.handlers
            logging.getLogger("pe_triage.x").info("progress")
    finally:
        root.removeHandler(basic)
    out = capsys.readouterr()
    assert out.out == "" and out.err == "INFO pe_triage.x: progress\n"
    assert [r.getMessage() for r in caplog.records] == ["progress"]


def test_mlflow_logs_through_the_one_handler(tmp_path: Path) -> None:
    """MLflow installs its own INFO handler when imported: after the set-up its INFO chatter is gone
    and its warnings arrive in the chosen format (a fresh process: the import is what is tested)."""
    code = ("import logging; from pe_triage.logs import setup_logging; setup_logging(0, 'json'); import mlflow; "
            "logging.getLogger('mlflow.store').info('chatter'); logging.getLogger('mlflow.store').warning('careful')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["message"] for line in proc.stderr.splitlines()] == ["careful"]

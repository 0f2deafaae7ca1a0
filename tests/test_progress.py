"""Progress: log lines where nobody watches a terminal, a summary line always."""

from __future__ import annotations

import logging

import pytest

from pe_triage import progress as P


def test_off_a_terminal_it_logs_periodic_lines_and_a_summary(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(P.MODE_ENV, "log")
    clock = iter([0.0, 10.0, 40.0, 41.0, 80.0, 80.0])  # start, four updates, close
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="pe_triage.progress")
    with P.progress(5, "ingest site-a", unit="file", every_s=30.0) as bar:
        bar.update()  # t=10: too soon for a line
        bar.update(loss=0.5)  # t=40: a line
        bar.update()  # t=41: too soon
        bar.update(2)  # t=80: a line
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("ingest site-a: 2/5 file (") and "ETA" in lines[0] and "loss=0.5" in lines[0]
    assert lines[1].startswith("ingest site-a: 5/5 file")
    assert lines[-1].startswith("ingest site-a: 5 file in 80.0 s")
    assert len(lines) == 3


def test_off_mode_logs_only_the_summary(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(P.MODE_ENV, "off")
    caplog.set_level(logging.INFO, logger="pe_triage.progress")
    with P.progress(None, "preprocess", unit="slice", every_s=0.0) as bar:
        for _ in range(3):
            bar.update()
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["preprocess: 3 slice"]


def test_a_terminal_gets_a_bar(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(P.MODE_ENV, "bar")
    with P.progress(2, "train stage 1", unit="img") as bar:
        bar.update(2, loss=0.25)
    assert "train stage 1" in capsys.readouterr().err

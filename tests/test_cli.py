"""The command line: clear errors with exit status 2, never a traceback, never the key."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import write_series
from pydicom.uid import JPEG2000Lossless

from pe_triage import __version__
from pe_triage.cli import build_parser, main
from pe_triage.dicom import KEY_ENV
from pe_triage.logs import FORMAT_ENV


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


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _one_clear_line(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line a failed command logged; no traceback anywhere."""
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "Traceback" not in caplog.text + "".join(capsys.readouterr())
    return errors[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("split:\n  seed: [1, 2\n", r", line 3, column 1: invalid YAML: expected ',' or '\]'"),
        ("split:\n  seed: 1\n bad: 3\n", r", line 3, column 2: invalid YAML"),
        ("!!python/object/apply:os.system ['touch pwned']\n", r", line 1, column 1: invalid YAML: could not determine a "),
        ("split:\n  seed: three\n", r": split.seed: expected int, got 'three'$"),
        ("split:\n  1: a\n  sed: 2\n", r": split: unknown key\(s\) \['1', 'sed'\]"),
        (b"split:\n  seed: \xff\n", r": not UTF-8 text \(byte 15\)$"),
    ],
    ids=["unclosed", "indent", "python-tag", "wrong-type", "int-key", "not-utf8"],
)
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                       text: str | bytes, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["split", "--windows", str(tmp_path), "--out", str(tmp_path / "s.parquet"), "--config", str(config)]) == 2
    line = _one_clear_line(caplog, capsys)
    assert line.startswith(str(config)) and re.search(expected, line), line
    assert not (tmp_path / "pwned").exists()


def test_a_config_folder_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", "--windows", str(tmp_path), "--out", str(tmp_path / "s.parquet"), "--config", str(tmp_path)]) == 2
    assert _one_clear_line(caplog, capsys) == f"split: Is a directory [EISDIR]: {tmp_path}"


def test_disk_full_is_one_line_and_a_failed_exit(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ENOSPC from the kernel: the command's writes go to /dev/full, which refuses every one."""
    import pe_triage.splits

    def fills_the_disk(*args: object, **kw: object) -> None:
        with open("/dev/full", "wb") as f:
            f.write(b"splits")

    monkeypatch.setattr(pe_triage.splits, "split_dataset", fills_the_disk)
    assert main(["split", "--windows", str(tmp_path), "--out", str(tmp_path / "s.parquet")]) == 2
    line = _one_clear_line(caplog, capsys)
    assert line.startswith("split: No space left on device [ENOSPC]") and "free space" in line, line


def test_an_os_error_under_the_source_does_not_name_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Folder names under a site's source are often patient names: the message names the source alone."""
    import pe_triage.ingest

    def unreadable(*args: object, **kw: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "src" / "DOE^JOHN" / "IM1.dcm"))

    monkeypatch.setattr(pe_triage.ingest, "ingest_site", unreadable)
    assert main(["ingest", "--site", "a", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--demo"]) == 2
    line = _one_clear_line(caplog, capsys)
    assert "DOE" not in caplog.text and line == f"ingest: Permission denied [EACCES]: a file under {tmp_path / 'src'}"


class _Conflict(RuntimeError):
    """What the registry's and the ingest's lock errors are: RuntimeError subclasses."""


def test_a_runtime_error_of_a_command_is_one_line_and_exit_2(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import pe_triage.splits

    def locked(*args: object, **kw: object) -> None:
        raise _Conflict("dataset is locked by another run\n(started 3 s ago)")

    monkeypatch.setattr(pe_triage.splits, "split_dataset", locked)
    assert main(["split", "--windows", str(tmp_path), "--out", str(tmp_path / "s.parquet")]) == 2
    assert _one_clear_line(caplog, capsys) == "dataset is locked by another run (started 3 s ago)"


def test_a_programming_error_is_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pe_triage.splits

    def broken(*args: object, **kw: object) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(pe_triage.splits, "split_dataset", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["split", "--windows", str(tmp_path), "--out", str(tmp_path / "s.parquet")])


PHI = "DOE^JOHN 1970-01-01"


def test_label_manifest_errors_name_rows_and_columns_never_cell_values(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A shifted column puts a patient's name where a label belongs: the error must not repeat it."""
    write_series(tmp_path / "src", 2)
    (tmp_path / "labels.csv").write_text(f"patient_id,sop_uid,label,diagnosis\nPAT-0001,1.2.3.4.5.1,{PHI},\n"
                                         f"PAT-0002,,,{PHI}\nPAT-0003,1.2.3.4.5.2,pe,\nPAT-0003,1.2.3.4.5.2,pe,\n")
    assert main(["ingest", "--site", "a", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--demo",
                 "--labels", str(tmp_path / "labels.csv")]) == 2
    line = _one_clear_line(caplog, capsys)
    assert "DOE" not in caplog.text and "1970" not in caplog.text
    assert "row 2, column label: not one of ['indeterminate', 'other', 'pe']" in line, line
    assert "row 3, column diagnosis: not one of " in line and "row 5: the same slice is labelled again (first on row 4)" in line


def test_a_manifest_that_is_not_csv_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    write_series(tmp_path / "src", 2)
    (tmp_path / "labels.csv").write_text(f"patient_id,label\nPAT-0001,pe\nPAT-0001,\"{PHI * 8000}\"\n")
    assert main(["ingest", "--site", "a", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--demo",
                 "--labels", str(tmp_path / "labels.csv")]) == 2
    assert _one_clear_line(caplog, capsys) == ("label manifest: not readable as CSV after line 2 "
                                               "(field larger than field limit (131072))")
    assert "DOE" not in caplog.text


def _commands(parser: argparse.ArgumentParser, path: str = "pe-triage") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and command group under ``parser``, with its full invocation."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield f"{path} {name}", command
                yield from _commands(command, f"{path} {name}")


def test_every_command_has_plain_text_help_with_an_example() -> None:
    """Help is read in a terminal: no reStructuredText or Markdown markup, and an example per command
    laid out as written (a help formatter that keeps line breaks)."""
    commands = dict(_commands(build_parser()))
    assert {"pe-triage ingest", "pe-triage predict", "pe-triage demo", "pe-triage pipeline run-local"} <= set(commands)
    for path, command in commands.items():
        text = command.format_help()
        assert not re.search(r"``|`|:(func|class|mod|data|meth):", text), f"{path} --help has markup"
        assert re.search(rf"\nexamples?:\n  {re.escape(path)}[ \n]", text), f"{path} --help has no example"
        assert command.description, f"{path} --help does not say what it does"


def test_predict_help_says_what_it_writes() -> None:
    text = dict(_commands(build_parser()))["pe-triage predict"].format_help()
    assert "JSON report" in text and "stdout" in text and "--out" in text and "no patient names" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"pe-triage {__version__}\n"


def test_a_bad_log_format_from_the_environment_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(FORMAT_ENV, "xml")
    assert main(["split", "--windows", str(tmp_path), "--out", str(tmp_path / "s.parquet")]) == 2
    assert "'xml'" in _one_clear_line(caplog, capsys)
    assert not (tmp_path / "s.parquet").exists()


def test_the_console_shows_progress_not_codec_chatter(tmp_path: Path) -> None:
    """The real command in a real process, with a JPEG 2000 site (whose encoder logs every tile at
    INFO): stderr holds the project's own lines only, each a JSON object with --log-format json, and
    -v placed after the command counts too."""
    command = [sys.executable, "-m", "pe_triage.cli", "--log-format", "json", "synth", "--out", str(tmp_path / "c"),
               "--sites", "3", "--patients-per-site", "1", "--slices", "2", "--size", "32"]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_clean_env())
    assert quiet.returncode == 0, quiet.stderr
    assert JPEG2000Lossless in (tmp_path / "c" / "truth" / "cohort.json").read_text()  # the chatty encoder did run
    lines = [json.loads(line) for line in quiet.stderr.splitlines()]
    assert lines and all(e["logger"].startswith("pe_triage") for e in lines), lines
    command[command.index("--out") + 1] = str(tmp_path / "again")
    loud = subprocess.run([*command, "-v"], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert loud.returncode == 0 and any(json.loads(line)["logger"].startswith("openjpeg") for line in loud.stderr.splitlines())


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (FORMAT_ENV, "MLFLOW_CONFIGURE_LOGGING")}

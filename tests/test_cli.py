"""The command line: clear errors with exit status 2, never a traceback, never the key."""

from __future__ import annotations

import errno
import json
import logging
import re
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

"""Inputs named by path or URI are read only under configured prefixes (issue 18, item 3): checked
after resolving symlinks, nothing allowed by default, refusals that name no path; the pyfunc behind
MLflow's scoring server (a real process) answers a refused or unusable input with a 400 carrying the
real message, instead of walking the server's files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from test_predict import stage_model

from pe_triage.config import ConfigError, ServeConfig, SynthConfig, parse_config
from pe_triage.predict import InputNotAllowed, Triage, allowed_input
from pe_triage.synth import generate_cohort


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``allowed/`` with a study folder and a file, a sibling ``allowed-not/`` and ``outside/``."""
    for folder in ("allowed/study", "allowed-not", "outside"):
        (tmp_path / folder).mkdir(parents=True)
    for file in ("allowed/study/1.dcm", "allowed-not/1.dcm", "outside/secret.dcm"):
        (tmp_path / file).write_bytes(b"x")
    return tmp_path


def test_nothing_is_allowed_by_default(tree: Path) -> None:
    assert ServeConfig().allowed_prefixes == () and parse_config("").serve.allowed_prefixes == ()
    with pytest.raises(InputNotAllowed, match="no allowed input prefixes are configured"):
        allowed_input(str(tree / "allowed" / "study"), ServeConfig().allowed_prefixes)


def test_only_paths_under_a_prefix_are_allowed(tree: Path) -> None:
    prefixes = [str(tree / "allowed")]
    assert allowed_input(str(tree / "allowed" / "study"), prefixes) == str(tree / "allowed" / "study")
    assert allowed_input(str(tree / "allowed" / "study" / "1.dcm"), prefixes + ["/nonexistent"]).endswith("1.dcm")
    assert allowed_input(str(tree / "allowed"), [str(tree / "allowed") + "/"]) == str(tree / "allowed")
    for refused in ("/etc", "/", str(tree / "outside"), str(tree / "allowed-not" / "1.dcm"),
                    str(tree / "allowed" / ".." / "outside" / "secret.dcm"), "relative/../../etc", "file:///etc",
                    "s3://bucket/allowed"):
        with pytest.raises(InputNotAllowed, match=r"outside the 1 allowed input prefix\(es\)") as refusal:
            allowed_input(refused, prefixes)
        assert str(tree) not in str(refusal.value) and "etc" not in str(refusal.value)  # the path is not echoed


def test_a_symlink_is_judged_by_where_it_leads(tree: Path) -> None:
    prefixes = [str(tree / "allowed")]
    (tree / "allowed" / "escape").symlink_to(tree / "outside")
    (tree / "allowed" / "etc").symlink_to("/etc")
    (tree / "allowed" / "study" / "leak.dcm").symlink_to(tree / "outside" / "secret.dcm")
    for link in ("escape", "etc", "study/leak.dcm", "escape/secret.dcm"):
        with pytest.raises(InputNotAllowed):
            allowed_input(str(tree / "allowed" / link), prefixes)
    (tree / "outside" / "into").symlink_to(tree / "allowed" / "study")
    assert allowed_input(str(tree / "outside" / "into"), prefixes) == str(tree / "allowed" / "study")  # read at its target
    (tree / "link-to-allowed").symlink_to(tree / "allowed")  # a prefix that is itself a link
    assert allowed_input(str(tree / "allowed" / "study"), [str(tree / "link-to-allowed")]) == str(tree / "allowed" / "study")


def test_s3_uris_are_matched_by_whole_segments() -> None:
    prefixes = ["s3://exports/today/", "/data"]
    assert allowed_input("s3://exports/today/study-1/", prefixes) == "s3://exports/today/study-1"
    assert allowed_input("s3://exports/today", prefixes) == "s3://exports/today"
    for refused in ("s3://exports/today-not/x", "s3://exports/other", "s3://exports/today/../other/x",
                    "s3://exports/today//x", "s3://exports/today/./x", "s3://other/today/x", "s3:///today/x"):
        with pytest.raises(InputNotAllowed):
            allowed_input(refused, prefixes)


def test_prefixes_must_be_absolute_paths_or_s3_uris() -> None:
    assert parse_config("serve:\n  allowed_prefixes: [/mnt/exports, 's3://b/x']\n").serve.allowed_prefixes == (
        "/mnt/exports", "s3://b/x")
    for bad in ("exports", "s3://", "s3:///x", "http://host/x"):
        with pytest.raises(ConfigError, match="serve.allowed_prefixes"):
            ServeConfig(allowed_prefixes=(bad,))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allowlist-cohort")
    generate_cohort(root, SynthConfig(sites=1, patients_per_site=1, slices=6, size=96, seed=3))
    return root / "sites" / "site-a" / "dicom" / "P0001"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("allowlist-models")
    return stage_model(root / "stage1", 1), stage_model(root / "stage2", 2)


def test_triage_reads_dicom_only_under_the_prefixes(pair: tuple[Path, Path], study: Path, tmp_path: Path) -> None:
    triage = Triage.load(*pair)
    unrestricted, _ = triage.predict_dicom(str(study))  # the command line: the operator's own files
    allowed, _ = triage.predict_dicom(str(study), allowed_prefixes=[str(study.parent)])
    assert allowed.drop(columns=["p_disease", "p_pe"]).equals(unrestricted.drop(columns=["p_disease", "p_pe"]))
    (tmp_path / "link").symlink_to(study)
    for prefixes in ([], [str(tmp_path)]):
        with pytest.raises(InputNotAllowed):
            triage.predict_dicom([str(tmp_path / "link")], allowed_prefixes=prefixes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def scoring_server(pair: tuple[Path, Path], study: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow models serve`` of the composite model, allowed to read the study's site folder only."""
    from pe_triage.registry.pyfunc import ALLOWED_PREFIXES_ENV, save_composite

    model = save_composite(tmp_path_factory.mktemp("allowlist-model") / "model", *pair, Triage.load(*pair))
    port = _free_port()
    env = {**os.environ, ALLOWED_PREFIXES_ENV: f"/nonexistent, {study.parent}", "OMP_NUM_THREADS": "1"}
    log = tmp_path_factory.mktemp("allowlist-log") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager",
                                 "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the scoring server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _post(url: str, records: list[dict]) -> requests.Response:
    return requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=120)


def test_the_scoring_server_refuses_paths_outside_with_a_clear_400(scoring_server: str, study: Path,
                                                                   tmp_path: Path) -> None:
    (tmp_path / "etc").symlink_to("/etc")
    for path in ("/etc", str(study.parent / ".." / ".." / ".."), str(tmp_path / "etc")):
        answer = _post(scoring_server, [{"dicom_path": path}])
        assert answer.status_code == 400, answer.text
        assert answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "outside the 2 allowed input prefix(es)" in answer.json()["message"]
    answer = _post(scoring_server, [{"dicom_path": str(study)}])
    assert answer.status_code == 200, answer.text
    assert {row["study_uid"] for row in answer.json()["predictions"]} == {"study-1"}


def test_the_scoring_server_carries_the_predict_error_message(scoring_server: str, study: Path) -> None:
    answer = _post(scoring_server, [{"study_uid": "s", "series_uid": "x", "slice_index": 0}])
    assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "slice input needs columns" in answer.json()["message"]
    answer = _post(scoring_server, [{"dicom_path": str(study / "missing")}])
    assert answer.status_code == 400 and "names no file, folder or prefix" in answer.json()["message"]
    assert str(study) not in answer.json()["message"].split("Error:")[-1]

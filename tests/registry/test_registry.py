"""The model registry against a real ``mlflow server`` (SQLite, local artifacts): register, gates,
promotion, rollback, every decision recorded; the champion loaded by alias predicts what the
in-memory models predict, in this process and in a fresh one; the CLI's exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from factories import pseudo
from mlflow.tracking import MlflowClient
from test_predict import edited

from pe_triage import tracking
from pe_triage.config import IngestConfig, RegistryConfig
from pe_triage.ingest import ingest_site
from pe_triage.predict import Triage
from pe_triage.registry.cli import add_commands
from pe_triage.registry.registry import (
    CHALLENGER,
    CHAMPION,
    EVALUATED_FILE,
    MIN_GATES,
    PREVIOUS,
    RegistryError,
    load_registered,
    promote,
    register,
    rollback,
)
from pe_triage.registry.server import free_port
from pe_triage.tracking import TrackingUnavailable

SUMMARY_KEYS = (
    "slice_stage1_accuracy", "slice_disease_sensitivity", "slice_wnl_sensitivity", "slice_stage1_auroc",
    "slice_stage1_auroc_ci_low", "slice_stage2_accuracy", "slice_pe_sensitivity", "slice_pe_specificity",
    "slice_stage2_auroc", "slice_stage2_auroc_ci_low", "slice_cascade_accuracy", "patient_accuracy",
    "patient_disease_sensitivity", "patient_wnl_sensitivity", "patient_pe_sensitivity", "patient_pe_specificity",
    "patient_cascade_accuracy",
)


def write_metrics(path: Path, *, pe: float = 0.95, disease: float = 0.95, test: str = "windows-A") -> Path:
    """A metrics folder as ``pe-triage evaluate`` writes it (the parts the registry reads)."""
    summary: dict[str, Any] = {k: 0.9 for k in SUMMARY_KEYS} | {
        "patient_pe_sensitivity": pe, "slice_disease_sensitivity": disease, "slice_stage2_auroc": None,
        "slices": 120, "patients": 6,
    }
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({
        "summary": summary,
        "test_data": {"windows_digest": test, "splits_digest": "sd-1", "split": "test", "fold": "default",
                      "slices": 120, "patients": 6},
        "config": {"patient_rule": "any", "k": 2},
        "thresholds": {"stage1": 0.45, "stage2": 0.5},  # the pair's operating points (fixture ``pair``)
        "models": {s: {"config_hash": "hash-0", "mlflow_run_id": None} for s in ("stage1", "stage2")},
        "per_site": {"site-a": {"summary": summary}, "site-b": {"summary": summary | {"patient_pe_sensitivity": 1.0}}},
    }))
    (path / "report.md").write_text("# evaluation\n")
    return path


def aliases(uri: str, name: str) -> dict[str, str]:
    return dict(MlflowClient(uri).get_registered_model(name).aliases)


def tags(uri: str, name: str, version: int) -> dict[str, str]:
    return dict(MlflowClient(uri).get_model_version(name, str(version)).tags)


def test_register_promote_refuse_rollback(mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str],
                                          tmp_path: Path) -> None:
    v1 = register(*pair, str(write_metrics(tmp_path / "m1")), config=cfg, uri=mlflow_server, actor="alice")
    assert v1["version"] == 1 and aliases(mlflow_server, cfg.model_name) == {CHALLENGER: "1"}
    t = tags(mlflow_server, cfg.model_name, 1)
    assert t["dataset.windows_digest"] == "wd-1" and t["dataset.sites"] == "site-a,site-b"
    assert (t["stage1.git_commit"], t["stage1.config_hash"], t["stage1.training_run_id"]) == ("commit-0", "hash-0", "None")
    assert float(t["metric.patient_pe_sensitivity"]) == 0.95 and t["test_data.windows_digest"] == "windows-A"
    assert t["registered_by"] == "alice" and t["config_hash"]
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(v1["run_id"])}
    assert {"model", "evaluation", "model_card.md"} <= artifacts
    card = Path(MlflowClient(mlflow_server).download_artifacts(v1["run_id"], "model_card.md", str(tmp_path))).read_text()
    for heading in ("## Intended use", "## Data", "## Metrics on the test data", "## Limits", "| site-a | site-b |"):
        assert heading in card

    first = promote(config=cfg, uri=mlflow_server, actor="bob")
    assert first["outcome"] == "promoted" and "first champion" in first["reason"]
    on = [name for name, key in MIN_GATES if not key.startswith("exam_")]  # every minimum but the exam model's, by default
    assert [g["name"] for g in first["gates"]] == on
    assert aliases(mlflow_server, cfg.model_name) == {CHAMPION: "1"}

    register(*pair, str(write_metrics(tmp_path / "m2", pe=0.92)), config=cfg, uri=mlflow_server, actor="alice")
    refused = promote(config=cfg, uri=mlflow_server, actor="bob")  # 0.92 passes the minimum, loses 0.03 > 0.02
    assert refused["outcome"] == "refused" and "gate max_regression.patient_pe_sensitivity failed" in refused["reason"]
    assert [g["name"] for g in refused["gates"] if not g["passed"]] == ["max_regression.patient_pe_sensitivity"]
    assert aliases(mlflow_server, cfg.model_name) == {CHAMPION: "1", CHALLENGER: "2"}
    t2 = tags(mlflow_server, cfg.model_name, 2)
    assert t2["last_decision.outcome"] == "refused" and t2["last_decision.actor"] == "bob"
    assert "max_regression.patient_pe_sensitivity" in t2["last_decision.reason"]
    history = [json.loads(v) for k, v in t2.items() if k.startswith("decision.")]
    assert sorted(d["action"] for d in history) == ["promote", "register"]

    register(*pair, str(write_metrics(tmp_path / "m3", pe=0.96)), config=cfg, uri=mlflow_server)
    promoted = promote(3, config=cfg, uri=mlflow_server, actor="bob")
    assert promoted["outcome"] == "promoted" and "replaces version 1" in promoted["reason"]
    assert aliases(mlflow_server, cfg.model_name) == {CHAMPION: "3", PREVIOUS: "1"}  # a promoted challenger is no more one

    again = promote(3, config=cfg, uri=mlflow_server, actor="bob")
    assert again["outcome"] == "unchanged"

    back = rollback(config=cfg, uri=mlflow_server, actor="carol")
    assert (back["champion_before"], back["champion"]) == (3, 1)
    assert aliases(mlflow_server, cfg.model_name) == {CHAMPION: "1"}
    assert tags(mlflow_server, cfg.model_name, 1)["last_decision.outcome"] == "restored"
    t3 = tags(mlflow_server, cfg.model_name, 3)
    assert t3["last_decision.outcome"] == "rolled_back" and t3["last_decision.actor"] == "carol"
    with pytest.raises(RegistryError, match="no previous-champion"):
        rollback(config=cfg, uri=mlflow_server)


def test_a_champion_re_evaluated_on_the_candidates_test_data_is_compared_and_must_still_be_champion(
        mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path) -> None:
    """What the retraining pipeline's evaluate-champion step hands to promote: the champion's metrics
    on the candidate's test data, tagged with the version evaluated."""
    register(*pair, str(write_metrics(tmp_path / "m1", test="windows-A")), config=cfg, uri=mlflow_server)
    assert promote(config=cfg, uri=mlflow_server)["outcome"] == "promoted"
    register(*pair, str(write_metrics(tmp_path / "m2", pe=0.96, test="windows-B")), config=cfg, uri=mlflow_server)
    registration_metrics = promote(2, config=cfg, uri=mlflow_server)  # v1 was evaluated on windows-A
    assert [g["name"] for g in registration_metrics["gates"] if not g["passed"]] == ["same_test_data"]

    again = write_metrics(tmp_path / "champion-on-B", pe=0.9, test="windows-B")
    (again / EVALUATED_FILE).write_text(json.dumps({"version": 3}))  # not the champion: it moved meanwhile
    moved = promote(2, config=cfg, uri=mlflow_server, champion_metrics=str(again))
    assert moved["outcome"] == "refused" and "champion moved to version 1" in moved["reason"]
    (again / EVALUATED_FILE).write_text(json.dumps({"version": 1}))
    compared = promote(2, config=cfg, uri=mlflow_server, champion_metrics=str(again))
    gates = {g["name"]: g["passed"] for g in compared["gates"]}
    assert compared["outcome"] == "promoted" and gates["same_test_data"] and gates["max_regression.patient_pe_sensitivity"]
    assert aliases(mlflow_server, cfg.model_name) == {CHAMPION: "2", PREVIOUS: "1"}


def test_gates_and_bad_input(mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no challenger"):
        promote(config=cfg, uri=mlflow_server)
    with pytest.raises(RegistryError, match="no champion"):
        rollback(config=cfg, uri=mlflow_server)
    with pytest.raises(RegistryError, match="no metrics.json"):
        register(*pair, str(tmp_path), config=cfg, uri=mlflow_server)
    with pytest.raises(RegistryError, match="threshold"):
        register(*pair, str(edit_metrics(write_metrics(tmp_path / "t"), thresholds={"stage1": 0.3})), config=cfg,
                 uri=mlflow_server)
    with pytest.raises(RegistryError, match="another stage2 model"):
        register(*pair, str(edit_metrics(write_metrics(tmp_path / "x"), models={"stage2": {"config_hash": "hash-9"}})),
                 config=cfg, uri=mlflow_server)
    other = edited(Path(pair[1]), tmp_path / "other-data",
                   data={"windows_digest": "wd-2", "splits_digest": "sd-1", "fold": "default"})
    with pytest.raises(RegistryError, match="different data"):
        register(pair[0], str(other), str(write_metrics(tmp_path / "o")), config=cfg, uri=mlflow_server)

    register(*pair, str(write_metrics(tmp_path / "low", pe=0.5)), config=cfg, uri=mlflow_server)
    low = promote(config=cfg, uri=mlflow_server)  # no champion yet: thresholds only
    assert low["outcome"] == "refused" and "gate min_patient_pe_sensitivity failed" in low["reason"]

    client = MlflowClient(mlflow_server)  # a version registered by hand, without metrics
    run = client.create_run(client.get_experiment_by_name(cfg.experiment).experiment_id)
    client.create_model_version(cfg.model_name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    bare = promote(2, config=cfg, uri=mlflow_server)
    assert bare["outcome"] == "refused" and "gate metrics failed" in bare["reason"]

    register(*pair, str(write_metrics(tmp_path / "a")), config=cfg, uri=mlflow_server)
    assert promote(config=cfg, uri=mlflow_server)["outcome"] == "promoted"
    register(*pair, str(write_metrics(tmp_path / "b", test="windows-B")), config=cfg, uri=mlflow_server)
    elsewhere = promote(config=cfg, uri=mlflow_server)
    assert elsewhere["outcome"] == "refused" and "gate same_test_data failed" in elsewhere["reason"]
    better_on_b = write_metrics(tmp_path / "champion-on-b", pe=0.99, test="windows-B")  # the champion, evaluated on B
    worse = promote(4, config=cfg, uri=mlflow_server, champion_metrics=str(better_on_b))
    assert "gate max_regression.patient_pe_sensitivity failed" in worse["reason"]
    same_on_b = write_metrics(tmp_path / "champion-b", test="windows-B")
    ok = promote(4, config=cfg, uri=mlflow_server, champion_metrics=str(same_on_b))
    assert ok["outcome"] == "promoted" and aliases(mlflow_server, cfg.model_name)[CHAMPION] == "4"


def edit_metrics(path: Path, **changes: Any) -> Path:
    metrics = json.loads((path / "metrics.json").read_text())
    (path / "metrics.json").write_text(json.dumps(metrics | changes))
    return path


def test_unreachable_server_is_a_clear_error(cfg: RegistryConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)  # the backoff, without the wait
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable, match="not reachable after 4 attempts"):
        promote(config=cfg, uri=down)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RegistryError, match="no MLflow tracking URI"):
        rollback(config=cfg)


@pytest.fixture(scope="module")
def champion(mlflow_server: str, pair: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    name = f"pe-triage-{uuid.uuid4().hex[:8]}"
    config = RegistryConfig(model_name=name, experiment=name)
    register(*pair, str(write_metrics(tmp_path_factory.mktemp("metrics") / "m")), config=config, uri=mlflow_server)
    assert promote(config=config, uri=mlflow_server)["promoted"]
    return f"models:/{name}@champion"


@pytest.fixture(scope="module")
def expected(pair: tuple[str, str], study: Path) -> pd.DataFrame:
    """What the stage models predict in memory, without the registry."""
    return Triage.load(*pair).predict_dicom(str(study))[0]


def test_champion_by_alias_predicts_like_the_in_memory_models(mlflow_server: str, champion: str, expected: pd.DataFrame,
                                                             study: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc

    registered, version = load_registered(champion, uri=mlflow_server)
    assert version == 1
    got, _ = registered.predict_dicom(str(study))
    pd.testing.assert_frame_equal(got, expected)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("PE_TRIAGE_ALLOWED_PREFIXES", str(study))  # the pyfunc reads paths only under these
    model = mlflow.pyfunc.load_model(champion)
    via_pyfunc = model.predict(pd.DataFrame({"dicom_path": [str(study)]}))
    np.testing.assert_allclose(via_pyfunc["p_disease"], expected["p_disease"], atol=1e-6)
    np.testing.assert_allclose(via_pyfunc["p_pe"], expected["p_pe"], atol=1e-6)

    ingest_site("site-a", str(study), str(tmp_path / "slices"), pseudo=pseudo("site-a"), config=IngestConfig(workers=1))
    rows = pads.dataset(tmp_path / "slices", format="parquet", partitioning="hive").to_table().to_pandas()
    rows = rows[["study_uid", "series_uid", "slice_index", "rows", "cols", "pixel_spacing_row_mm", "pixel_spacing_col_mm",
                 "hu_planes"]]
    by_slices = model.predict(rows).sort_values("slice_index")  # the signature's slice form (schema enforced)
    np.testing.assert_allclose(by_slices["p_disease"], expected["p_disease"], atol=1e-5)
    assert list(by_slices["triage"]) == list(expected["triage"])


@pytest.mark.slow
def test_champion_loads_in_a_fresh_process(mlflow_server: str, champion: str, expected: pd.DataFrame, study: Path,
                                           tmp_path: Path) -> None:
    script = (
        "import json, sys, mlflow.pyfunc, pandas as pd\n"
        f"out = mlflow.pyfunc.load_model({champion!r}).predict(pd.DataFrame({{'dicom_path': [{str(study)!r}]}}))\n"
        "print(json.dumps(out['p_disease'].tolist()))\n"
    )
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PE_TRIAGE_ALLOWED_PREFIXES": str(study)}
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(json.loads(done.stdout.strip().splitlines()[-1]), expected["p_disease"], atol=1e-6)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pe-triage")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(mlflow_server: str, champion: str, cfg: RegistryConfig, pair: tuple[str, str], study: Path, tmp_path: Path,
             caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"registry:\n  model_name: {cfg.model_name}\n  experiment: {cfg.experiment}\n")
    common = ["--config", str(config), "--tracking-uri", mlflow_server]
    metrics = write_metrics(tmp_path / "m", disease=0.5)
    assert cli("register", "--stage1", pair[0], "--stage2", pair[1], "--metrics", str(metrics), *common) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1  # stdout holds only the JSON result
    with caplog.at_level(logging.ERROR):
        assert cli("promote", *common) == 1
    assert "gate min_slice_disease_sensitivity failed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli("rollback", *common) == 2
    assert "no champion" in caplog.text

    report = tmp_path / "out" / "report.json"
    assert cli("predict", "--model", champion, "--dicom", str(study), "--out", str(report),
               "--tracking-uri", mlflow_server) == 0
    written = json.loads(report.read_text())
    assert written["model_version"] == 1 and [s["study"] for s in written["studies"]] == ["study-1"]
    assert len(written["studies"][0]["series"][0]["slices"]) == 8

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli("promote", "--config", str(config), "--tracking-uri", f"http://127.0.0.1:{free_port()}") == 2
    assert "not reachable" in caplog.text

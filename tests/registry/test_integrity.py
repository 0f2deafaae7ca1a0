"""A registered version cannot be changed behind the registry's back (issue 16, defect 1), against a
real ``mlflow server`` that serves its artifacts: no pickle in the model, a file PUT through the
artifacts API is refused at load (and never executed), and a champion alias moved without a
recorded passing decision is refused."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import time
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from test_predict import stage_model
from test_registry import cli, write_metrics

from pe_triage.config import RegistryConfig
from pe_triage.registry.registry import CHAMPION, RegistryError, load_registered, promote, register, rollback


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("integrity-models")
    return str(stage_model(root / "stage1", 1, threshold=0.45)), str(stage_model(root / "stage2", 2, threshold=0.5))


def run_files(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of a run (recursively), as the server lists them."""
    found = []
    for entry in client.list_artifacts(run_id, path or None):
        found += run_files(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return found


def put_artifact(server: str, client: MlflowClient, run_id: str, path: str, data: bytes) -> None:
    """Overwrite (or add) a run artifact through the server's artifacts API, as any namespace pod could."""
    root = client.get_run(run_id).info.artifact_uri.removeprefix("mlflow-artifacts:")
    requests.put(f"{server}/api/2.0/mlflow-artifacts/artifacts{root}/{path}", data=data, timeout=30).raise_for_status()


class Payload:
    """A pickle that, when loaded, writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_a_version_holds_no_pickle(mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path) -> None:
    v1 = register(*pair, str(write_metrics(tmp_path / "m")), config=cfg, uri=mlflow_server)
    client = MlflowClient(mlflow_server)
    files = run_files(client, v1["run_id"])
    assert "model/MLmodel" in files and any(f.endswith("model.pt") for f in files)
    assert [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))] == []
    local = client.download_artifacts(v1["run_id"], "model/MLmodel", str(tmp_path))
    flavor = yaml.safe_load(Path(local).read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and flavor["model_code_path"].endswith(".py")  # models from code


def test_a_pickle_put_into_the_runs_artifacts_is_never_executed(
        mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    v1 = register(*pair, str(write_metrics(tmp_path / "m")), config=cfg, uri=mlflow_server)
    assert promote(config=cfg, uri=mlflow_server)["promoted"]
    client, marker = MlflowClient(mlflow_server), tmp_path / "marker"
    mlmodel = yaml.safe_load(Path(client.download_artifacts(v1["run_id"], "model/MLmodel", str(tmp_path))).read_text())
    flavor = mlmodel["flavors"]["python_function"]
    flavor.pop("model_code_path", None)
    flavor |= {"python_model": "python_model.pkl", "loader_module": "mlflow.pyfunc.model"}
    put_artifact(mlflow_server, client, v1["run_id"], "model/MLmodel", yaml.safe_dump(mlmodel).encode())
    put_artifact(mlflow_server, client, v1["run_id"], "model/python_model.pkl", pickle.dumps(Payload(marker)))

    for uri in (f"models:/{cfg.model_name}@{CHAMPION}", f"models:/{cfg.model_name}/1"):
        try:
            load_registered(uri, uri=mlflow_server)
            error: Exception | None = None
        except Exception as e:  # noqa: BLE001 - whatever it is, the marker decides first
            error = e
        assert not marker.exists(), f"loading {uri} executed the pickle"
        assert isinstance(error, RegistryError), error
        assert "version 1" in str(error) and "model/python_model.pkl" in str(error) and "model/MLmodel" in str(error)

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli("predict", "--model", f"models:/{cfg.model_name}@{CHAMPION}", "--dicom", str(tmp_path),
                   "--tracking-uri", mlflow_server) == 2
    assert not marker.exists()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "version 1" in errors[0].getMessage() and errors[0].exc_info is None


def test_a_tampered_artifact_is_refused_naming_the_version_and_the_file(
        mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path) -> None:
    v1 = register(*pair, str(write_metrics(tmp_path / "m")), config=cfg, uri=mlflow_server)
    client = MlflowClient(mlflow_server)
    (meta_path,) = [f for f in run_files(client, v1["run_id"], "model") if f.endswith("model.json") and "stage1" in f]
    meta = json.loads(Path(client.download_artifacts(v1["run_id"], meta_path, str(tmp_path))).read_text())
    put_artifact(mlflow_server, client, v1["run_id"], meta_path, json.dumps(meta | {"threshold": 0.01}).encode())
    with pytest.raises(RegistryError, match=rf"version 1 .*{meta_path}"):
        load_registered(f"models:/{cfg.model_name}/1", uri=mlflow_server)


def test_tampered_metrics_cannot_pass_the_gates(mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str],
                                                tmp_path: Path) -> None:
    v1 = register(*pair, str(write_metrics(tmp_path / "low", pe=0.5)), config=cfg, uri=mlflow_server)
    good = (write_metrics(tmp_path / "good") / "metrics.json").read_bytes()
    put_artifact(mlflow_server, MlflowClient(mlflow_server), v1["run_id"], "evaluation/metrics.json", good)
    with pytest.raises(RegistryError, match=r"version 1 .*evaluation/metrics.json"):
        promote(config=cfg, uri=mlflow_server)
    assert CHAMPION not in MlflowClient(mlflow_server).get_registered_model(cfg.model_name).aliases


def test_a_champion_alias_moved_behind_the_gates_back_is_refused(
        mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path) -> None:
    register(*pair, str(write_metrics(tmp_path / "m1")), config=cfg, uri=mlflow_server)
    assert promote(config=cfg, uri=mlflow_server, actor="bob")["promoted"]
    register(*pair, str(write_metrics(tmp_path / "m2", pe=0.5)), config=cfg, uri=mlflow_server)
    assert promote(2, config=cfg, uri=mlflow_server)["outcome"] == "refused"
    champion = f"models:/{cfg.model_name}@{CHAMPION}"
    assert load_registered(champion, uri=mlflow_server)[1] == 1

    MlflowClient(mlflow_server).set_registered_model_alias(cfg.model_name, CHAMPION, "2")  # no gate, no record
    with pytest.raises(RegistryError, match=r"version 2.*last recorded decision.*promote.*version 1.*bob"):
        load_registered(champion, uri=mlflow_server)
    assert load_registered(f"models:/{cfg.model_name}/2", uri=mlflow_server)[1] == 2  # pinned: digests only

    register(*pair, str(write_metrics(tmp_path / "m3", pe=0.96)), config=cfg, uri=mlflow_server)
    promoted = promote(3, config=cfg, uri=mlflow_server)
    assert promoted["promoted"] and load_registered(champion, uri=mlflow_server)[1] == 3
    assert (promoted["champion_before"], promoted["previous_champion"]) == (2, 1)
    # the version the alias was forced to is not chained as a previous champion: rollback restores the last gated one
    assert rollback(config=cfg, uri=mlflow_server)["champion"] == 1
    assert load_registered(champion, uri=mlflow_server)[1] == 1


def test_a_rollback_is_a_recorded_decision_and_a_forged_previous_alias_is_refused(
        mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path) -> None:
    for i, pe in enumerate((0.95, 0.96, 0.5)):
        register(*pair, str(write_metrics(tmp_path / f"m{i}", pe=pe)), config=cfg, uri=mlflow_server)
    assert promote(1, config=cfg, uri=mlflow_server)["promoted"] and promote(2, config=cfg, uri=mlflow_server)["promoted"]
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(cfg.model_name, "previous-champion", "3")  # never a champion
    with pytest.raises(RegistryError, match=r"previous-champion.*version 3.*version 1"):
        rollback(config=cfg, uri=mlflow_server)
    client.set_registered_model_alias(cfg.model_name, "previous-champion", "1")
    assert rollback(config=cfg, uri=mlflow_server)["champion"] == 1
    assert load_registered(f"models:/{cfg.model_name}@{CHAMPION}", uri=mlflow_server)[1] == 1


def test_a_load_during_a_champion_move_waits_for_it(mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str],
                                                    tmp_path: Path) -> None:
    """Between the recorded decision and the alias move, alias and record disagree for a moment: a
    load that sees a move under way (a live lock entry) waits for it instead of refusing."""
    from concurrent.futures import ThreadPoolExecutor

    from pe_triage.registry.integrity import record_champion
    from pe_triage.registry.lock import champion_lock

    for i, pe in enumerate((0.95, 0.96)):
        register(*pair, str(write_metrics(tmp_path / f"m{i}", pe=pe)), config=cfg, uri=mlflow_server)
    assert promote(1, config=cfg, uri=mlflow_server)["promoted"]
    client, fast = MlflowClient(mlflow_server), dataclasses.replace(cfg, lock_poll_s=0.1, lock_wait_s=30)
    with ThreadPoolExecutor(1) as pool, champion_lock(client, cfg.model_name, fast, actor="carol", action="promote"):
        record_champion(client, cfg.model_name, {"action": "promote", "outcome": "promoted", "champion": 2,
                                                 "actor": "carol", "gates": [{"passed": True}]})
        loading = pool.submit(load_registered, f"models:/{cfg.model_name}@{CHAMPION}", uri=mlflow_server, config=fast)
        time.sleep(1.5)
        assert not loading.done()
        client.set_registered_model_alias(cfg.model_name, CHAMPION, "2")
    assert loading.result(timeout=60)[1] == 2


def test_a_model_folder_is_read_not_run(pair: tuple[str, str], tmp_path: Path) -> None:
    """The loader reads MLmodel as data: a pickled python model, or an artifact path leaving the
    folder, is refused; a changed file is named by the digest check."""
    from pe_triage.predict import PredictError, Triage
    from pe_triage.registry.integrity import manifest, verify
    from pe_triage.registry.pyfunc import load_triage, save_composite

    folder = save_composite(tmp_path / "model", *pair, Triage.load(*pair))
    assert load_triage(folder).stage1.meta.threshold == 0.45
    original = (folder / "MLmodel").read_text()
    mlmodel = yaml.safe_load(original)
    flavor = mlmodel["flavors"]["python_function"]
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel | {"flavors": {"python_function": flavor | {
        "python_model": "python_model.pkl"}}}))
    with pytest.raises(PredictError, match="pickled or foreign"):
        load_triage(folder)
    flavor["artifacts"]["stage1"]["path"] = "../../etc"
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(PredictError, match="outside the model folder"):
        load_triage(folder)

    (folder / "MLmodel").write_text(original)
    digests = manifest([(folder, "model")])
    version = type("Version", (), {"version": "7", "tags": {"integrity.manifest": json.dumps(digests)}})()
    verify("m", version, folder, "model")
    (folder / "artifacts" / "triage.json").write_text("{}")
    with pytest.raises(RegistryError, match=r"m version 7 .*model/artifacts/triage.json \(digest differs\)"):
        verify("m", version, folder, "model")

"""Retraining triggers against a real MLflow server: no champion, new labelled data, drift in the
monitoring records or ``force`` train; the champion's own data without drift is skipped with a
reason that names the digest, the version and the period; decisions are recorded as MLflow runs."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from monitoring.test_drift import acquisition, records

from pe_triage import schema as S
from pe_triage.config import Config, MonitorConfig, RegistryConfig
from pe_triage.monitoring import MonitorStore
from pe_triage.provenance import dataset_digest
from pe_triage.registry.trigger import record_decision, recorded_skip, should_retrain


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slices-like store (the columns the drift reference reads): 200 studies of 2 slices."""
    root = tmp_path_factory.mktemp("trigger") / "slices"
    cols = acquisition(np.random.default_rng(1), 200, False)
    frame = pd.DataFrame({S.STUDY_UID: [f"study-{i}" for i in range(200)], **cols}).loc[lambda f: f.index.repeat(2)]
    (root / "site=a").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), root / "site=a" / "part-0.parquet")
    return root


@pytest.fixture
def config(tmp_path: Path) -> Config:
    name = f"trigger-{uuid.uuid4().hex[:8]}"
    return Config(registry=RegistryConfig(model_name=name, experiment=name))


def champion(uri: str, name: str, slices_digest: str | None) -> None:
    """A version with the dataset tags ``register`` writes, made champion."""
    client = MlflowClient(uri)
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(f"{name}-runs"))
    tags = {"dataset.slices_digest": str(slices_digest)}
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id, tags=tags)
    client.set_registered_model_alias(name, "champion", version.version)


def test_no_champion_no_registry_and_force_train(mlflow_server: str, config: Config, slices: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    untracked = should_retrain("ab" * 32, store=str(slices), config=config, uri=None)
    assert untracked.train and "no MLflow tracking URI" in untracked.reason
    decision = should_retrain("ab" * 32, store=str(slices), config=config, uri=mlflow_server)
    assert decision.train and "no champion" in decision.reason
    champion(mlflow_server, config.registry.model_name, dataset_digest(slices))
    forced = should_retrain(dataset_digest(slices), store=str(slices), config=config, uri=mlflow_server, force=True)
    assert forced.train and "--force" in forced.reason


def test_the_champions_data_is_skipped_with_the_reason_and_new_data_trains(mlflow_server: str, config: Config,
                                                                           slices: Path) -> None:
    digest = dataset_digest(slices)
    champion(mlflow_server, config.registry.model_name, digest)
    same = should_retrain(digest, store=str(slices), config=config, uri=mlflow_server)
    assert not same.train
    assert same.reason.startswith(f"skipped: nothing new: the slices store digest {digest[:12]} is the champion's (version 1)")
    assert "monitor.store is not configured" in same.reason and same.details["champion_version"] == 1
    other = should_retrain("cd" * 32, store=str(slices), config=config, uri=mlflow_server)
    assert other.train and other.reason.startswith("new or changed labelled data") and digest[:12] in other.reason


def test_a_champion_without_lineage_trains(mlflow_server: str, config: Config, slices: Path) -> None:
    champion(mlflow_server, config.registry.model_name, None)
    decision = should_retrain(dataset_digest(slices), store=str(slices), config=config, uri=mlflow_server)
    assert decision.train and "records no slices digest" in decision.reason


def test_drift_since_the_champion_trains_and_calm_records_do_not(mlflow_server: str, config: Config, slices: Path,
                                                                tmp_path: Path) -> None:
    digest = dataset_digest(slices)
    champion(mlflow_server, config.registry.model_name, digest)
    store = MonitorStore(str(tmp_path / "monitor"))
    config = replace(config, monitor=MonitorConfig(store=store.loc.uri))
    after = datetime.now(UTC) + timedelta(seconds=1)
    earlier = [{**r, "model_version": "2"} for r in records("north", after - timedelta(days=30), 2, shifted=True)]
    store.append(earlier)  # the previous champion's: not counted
    store.append(records("north", after, 3))
    calm = should_retrain(digest, store=str(slices), config=config, uri=mlflow_server)
    assert not calm.train and "no drift in 200 monitoring record(s) since" in calm.reason
    store.append(records("south", after, 4, shifted=True))
    drift = should_retrain(digest, store=str(slices), config=config, uri=mlflow_server)
    assert drift.train and "drift since" in drift.reason and "south:" in drift.reason and "north" not in drift.reason
    assert S.KERNEL in drift.details["drifted_sites"]["south"]


def test_decisions_are_recorded_and_a_skip_is_found_by_its_job(mlflow_server: str, config: Config, slices: Path) -> None:
    digest = dataset_digest(slices)
    champion(mlflow_server, config.registry.model_name, digest)
    skip = should_retrain(digest, store=str(slices), config=config, uri=mlflow_server)
    train = should_retrain(digest, store=str(slices), config=config, uri=mlflow_server, force=True)
    run_id = record_decision(skip, config=config, uri=mlflow_server, job="111")
    record_decision(train, config=config, uri=mlflow_server, job="222")
    run = MlflowClient(mlflow_server).get_run(str(run_id))
    assert run.data.tags["pe_triage.trigger.train"] == "false" and run.data.params["slices_digest"] == digest
    assert recorded_skip("111", config=config, uri=mlflow_server) == skip.reason
    assert recorded_skip("222", config=config, uri=mlflow_server) is None
    assert recorded_skip("333", config=config, uri=mlflow_server) is None

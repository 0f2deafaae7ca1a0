"""``pe-triage pipeline submit|schedule`` against a KFP REST server over HTTP (``kfp_server``: no
real KFP can run here): the pipeline is uploaded as a named version (package version + content
hash), re-submitting the same content reuses that version, a change makes a new one, and runs and
recurring runs name the version, never a package."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp_server import KfpServer

from pe_triage import __version__
from pe_triage.cli import main


@pytest.fixture
def kfp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[KfpServer]:
    monkeypatch.delenv("PE_TRIAGE_CLUSTER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads its context file from the home folder
    with KfpServer() as server:
        yield server


def _versions(kfp: KfpServer) -> dict[str, list[str]]:
    names = {p["pipeline_id"]: p["display_name"] for p in kfp.state.pipelines.values()}
    return {names[pid]: [v["display_name"] for v in versions] for pid, versions in kfp.state.versions.items()}


def _version_of(kfp: KfpServer, body: dict[str, Any]) -> str:
    ref = body["pipeline_version_reference"]
    (version,) = [v for v in kfp.state.versions[ref["pipeline_id"]] if v["pipeline_version_id"] == ref["pipeline_version_id"]]
    return str(version["display_name"])


def test_submit_uploads_a_named_version_once_and_runs_it(kfp: KfpServer, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("train: {epochs: 3}\n")
    args = ["pipeline", "submit", "onboarding", "--host", kfp.host, "--slices-store", "s3://b/slices", "--site", "site-a",
            "s3://b/a/dicom", "s3://b/a/labels.csv", "--tracking-uri", "http://mlflow:5000", "--config", str(config)]
    assert main(args) == 0
    ((name, (first, named)),) = _versions(kfp).items()
    assert name == "pe-triage-onboarding" and first == name and named.startswith(f"{__version__}-")
    (run,) = kfp.state.runs
    assert _version_of(kfp, run) == named and "pipeline_spec" not in run, "the run names the version, not a package"
    package = kfp.state.packages[kfp.state.versions[run["pipeline_version_reference"]["pipeline_id"]][1]["pipeline_version_id"]]
    assert named == f"{__version__}-{hashlib.sha256(package).hexdigest()[:12]}"
    assert next(yaml.safe_load_all(package))["pipelineInfo"]["name"] == "pe-triage-onboarding"
    assert run["runtime_config"]["parameters"]["sites"] == [{"site": "site-a", "source": "s3://b/a/dicom",
                                                             "labels": "s3://b/a/labels.csv"}]
    assert run["runtime_config"]["parameters"]["config"] == "train: {epochs: 3}\n"

    uploads = kfp.state.uploads
    assert main(args) == 0
    assert kfp.state.uploads == uploads and len(kfp.state.runs) == 2, "same content: the version is reused"
    assert _version_of(kfp, kfp.state.runs[1]) == named

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"images": {"cpu": "registry.example.org/pe-triage:1", "cuda": "r/c:1"}}))
    assert main([*args, "--cluster-config", str(cluster)]) == 0
    assert kfp.state.uploads == uploads + 1 and len(_versions(kfp)["pe-triage-onboarding"]) == 3
    assert _version_of(kfp, kfp.state.runs[2]) not in (named, first), "other cluster options: a new version"


def test_schedule_replaces_the_recurring_run_of_the_named_version(kfp: KfpServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["pipeline", "schedule", "--host", kfp.host, "--cron", "0 0 2 * * 0", "--name", "nightly"]
    assert main([*base, "--slices-store", "s3://b/slices", "--tracking-uri", "http://mlflow:5000"]) == 0
    (old,) = kfp.state.recurring.values()
    assert old["display_name"] == "nightly" and old["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * 0"
    assert int(old["max_concurrency"]) == 1 and old["no_catchup"] is True and old["mode"] == "ENABLE"
    assert _version_of(kfp, old).startswith(f"{__version__}-")

    cluster = tmp_path / "cluster.yaml"  # the Helm chart's scheduling Job: store and tracking URI from its cluster.yaml
    cluster.write_text(yaml.safe_dump({"slicesStore": "s3://h/slices", "mlflowTrackingUri": "http://mlflow.ns:5000"}))
    monkeypatch.setenv("PE_TRIAGE_CLUSTER_CONFIG", str(cluster))
    assert main(base) == 0
    (new,) = kfp.state.recurring.values()
    assert kfp.state.log[1:] == [f"create {new['recurring_run_id']}", f"delete {old['recurring_run_id']}"], \
        "the earlier schedule of that name is replaced, after the new one exists"
    assert new["runtime_config"]["parameters"] == {"slices_store": "s3://h/slices", "config": "",
                                                   "tracking_uri": "http://mlflow.ns:5000"}
    assert _version_of(kfp, new) == _version_of(kfp, old) and kfp.state.uploads == 2, "same content: version reused"
    assert main([*base[:-4], "--cron", "0 2 * * 0"]) == 2, "KFP cron has six fields"


def test_multi_user_uploads_into_the_namespace_and_reuses_its_version(kfp: KfpServer) -> None:
    args = ["pipeline", "submit", "retraining", "--host", kfp.host, "--slices-store", "s3://b/s", "--namespace", "team-a"]
    assert main(args) == 0 and main(args) == 0
    ((pipeline,),) = [[p for p in kfp.state.pipelines.values()]]
    assert pipeline["namespace"] == "team-a" and kfp.state.uploads == 2  # the pipeline's first version + the named one
    assert _version_of(kfp, kfp.state.runs[0]) == _version_of(kfp, kfp.state.runs[1])


def test_a_bad_configuration_fails_before_anything_is_uploaded(kfp: KfpServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochz: 3}\n")
    assert main(["pipeline", "submit", "retraining", "--host", kfp.host, "--slices-store", "s3://b/s", "--config", str(bad)]) == 2
    assert kfp.state.uploads == 0 and not kfp.state.runs


def test_force_reaches_the_retraining_run_and_schedule_and_is_refused_for_onboarding(kfp: KfpServer) -> None:
    submit = ["pipeline", "submit", "retraining", "--host", kfp.host, "--slices-store", "s3://b/s"]
    assert main(submit) == 0 and main([*submit, "--force"]) == 0
    assert "force" not in kfp.state.runs[0]["runtime_config"]["parameters"], "without --force the pipeline's default (False)"
    assert kfp.state.runs[1]["runtime_config"]["parameters"]["force"] is True
    assert main(["pipeline", "schedule", "--host", kfp.host, "--cron", "0 0 2 * * 0", "--slices-store", "s3://b/s",
                 "--force"]) == 0
    (recurring,) = kfp.state.recurring.values()
    assert recurring["runtime_config"]["parameters"]["force"] is True
    onboarding = ["pipeline", "submit", "onboarding", "--host", kfp.host, "--slices-store", "s3://b/s", "--site", "a", "s3://b/a"]
    assert main([*onboarding, "--force"]) == 2 and len(kfp.state.runs) == 2

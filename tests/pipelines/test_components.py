"""The component bodies are thin shells: each called directly (``python_func``) with artifact
stand-ins on a small onboarded cohort, checking what it passes to its library call and what it
writes into its output artifacts."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from kfp import dsl
from pe_triage_components import COMPONENTS as C

from pe_triage.quality import dataset_version

CONFIG = "preprocess: {size: 64, workers: 1}\ningest: {workers: 1}\n"


def _out(cls: type[dsl.Artifact], folder: Path, name: str) -> dsl.Artifact:
    """An output artifact as the KFP executor hands it over: its parent folder exists, it does not."""
    folder.mkdir(parents=True, exist_ok=True)
    return cls(name=name, uri=str(folder / name), metadata={})


def test_every_component_body_imports_only_the_library_and_yaml() -> None:
    for component in vars(C).values():
        tree = ast.parse(component.component_spec.implementation.container.command[3])
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        allowed = {"kfp", "typing", "pe_triage", "yaml", "json", "shutil", "logging"}
        assert {m.split(".")[0] for m in modules} <= allowed, component.name


def test_ingest_writes_the_store_and_a_reference_artifact(onboarded, tmp_path: Path) -> None:
    cohort, _, _ = onboarded
    site = cohort / "sites" / "site-a"
    slices = _out(dsl.Dataset, tmp_path, "slices")
    store = tmp_path / "store"
    C.ingest.python_func(site="site-a", source=str(site / "dicom"), labels=str(site / "labels.csv"), store=str(store),
                         config=CONFIG, demo_key=True, slices=slices)
    report = json.loads(Path(slices.path).read_text())
    assert report["files"]["ingested"] == report["files"]["seen"] > 0
    assert slices.metadata["store"] == str(store) and slices.metadata["site"] == "site-a"
    assert slices.metadata["slices"] == report["dataset"]["slices"] == pq.read_table(store / "site=site-a").num_rows
    again = _out(dsl.Dataset, tmp_path / "again", "slices")
    C.ingest.python_func(site="site-a", source=str(site / "dicom"), labels="", store=str(store), config="", demo_key=True,
                         slices=again)
    assert again.metadata["files"]["ingested"] == 0  # idempotent: a retried step adds nothing


def test_ingest_refuses_to_run_without_a_key(onboarded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pe_triage.dicom import MissingKeyError

    monkeypatch.delenv("PE_TRIAGE_PSEUDONYM_KEY", raising=False)
    cohort, _, _ = onboarded
    with pytest.raises(MissingKeyError):
        C.ingest.python_func(site="site-a", source=str(cohort / "sites" / "site-a" / "dicom"), labels="", store=str(tmp_path),
                             config="", demo_key=False, slices=_out(dsl.Dataset, tmp_path, "slices"))


def test_data_quality_renders_the_report_and_its_metrics(onboarded, tmp_path: Path) -> None:
    _, store, _ = onboarded
    slices = dsl.Dataset(name="slices", uri=str(tmp_path / "ref"), metadata={"store": str(store), "site": "site-b"})
    report, metrics = _out(dsl.Markdown, tmp_path, "report"), _out(dsl.Metrics, tmp_path, "metrics")
    quality = _out(dsl.Artifact, tmp_path, "quality")
    C.data_quality.python_func(slices=slices, config="", tracking_uri="", report=report, metrics=metrics, quality=quality)
    assert Path(report.path).read_text().startswith("# Data quality: site-b")
    result = json.loads(Path(quality.path).read_text())
    assert metrics.metadata["slices"] == result["counts"]["slices"]
    assert quality.metadata["digest"] == result["version"]["digest"] and quality.metadata["mlflow_run_id"] == ""


def test_data_steps_chain_through_artifacts(onboarded, tmp_path: Path) -> None:
    _, store, _ = onboarded
    digest = C.dataset_version.python_func(store=str(store))
    assert digest == dataset_version(str(store))["digest"]
    slices = dsl.Dataset(name="artifact", uri=str(store), metadata={"digest": digest})
    windows = _out(dsl.Dataset, tmp_path, "windows")
    C.preprocess.python_func(slices=slices, slices_digest=digest, config=CONFIG, windows=windows)
    assert windows.metadata["slices_digest"] == digest and windows.metadata["size"] == 64
    assert windows.metadata["series"] == len(list(store.glob("site=*/*.parquet")))
    splits = _out(dsl.Dataset, tmp_path, "splits")
    C.split.python_func(windows=windows, config=CONFIG, splits=splits)
    table = pq.read_table(splits.path)
    assert set(table["split"].to_pylist()) == {"train", "val", "test"}
    assert splits.metadata["patients"] == table.num_rows


def test_exit_handler_records_the_final_state(mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    status = dsl.PipelineTaskFinalStatus(state="FAILED", pipeline_job_resource_name="runs/123",
                                         pipeline_task_name="exit-handler-1", error_code=1, error_message="train failed")
    C.record_outcome.python_func(status=status, pipeline="pe-triage-retraining", config="registry: {experiment: outcome-test}",
                                 tracking_uri=mlflow_server)
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("outcome-test-pipelines").experiment_id])
    assert run.data.tags["pe_triage.outcome"] == "FAILED" and run.data.tags["kfp.error"] == "train failed"
    assert run.data.tags["kfp.job"] == "runs/123" and run.data.metrics["succeeded"] == 0.0


def test_convert_labels_passes_a_manifest_through_and_converts_a_public_set(real_ct: Path, tmp_path: Path) -> None:
    import shutil

    assert C.convert_labels.python_func(labels="s3://b/site/labels.csv", labels_format="manifest", config="") == \
        "s3://b/site/labels.csv"  # a manifest is not read here: ingest reads it
    xml = tmp_path / "LIDC-IDRI-0002" / "071.xml"
    xml.parent.mkdir()
    shutil.copy(real_ct / "lidc-idri-0002" / "071.xml", xml)
    out = C.convert_labels.python_func(labels=str(xml), labels_format="lidc", config="labels: {min_readers: 3}\n")
    assert out == f"{xml}.manifest.csv"
    assert json.loads(Path(f"{xml}.report.json").read_text())["counts"]["nodules_below_min_readers"] == 1

"""Onboarding data-quality report: counts that agree with ingest, acquisition distributions that match
each synthetic site's scanner, drift flagged between sites that differ and not where they agree, a
dataset version that tracks the store, and the report logged to MLflow as a dataset version."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from factories import pseudo, write_series

from pe_triage.config import IngestConfig
from pe_triage.ingest import ingest_site
from pe_triage.provenance import dataset_digest
from pe_triage.quality import (
    PSI_THRESHOLD,
    QualityError,
    dataset_version,
    flat_metrics,
    psi,
    site_report,
    to_markdown,
)
from pe_triage.registry.datasets import datasets_experiment, log_quality_report
from pe_triage.synth.sites import site_conventions


@pytest.fixture(scope="module")
def reports(onboarded) -> dict[str, dict]:
    _, slices, _ = onboarded
    return {site: site_report(str(slices), site) for site in ("site-a", "site-b", "site-c")}


def test_counts_agree_with_ingest_and_the_quarantine_table(onboarded, reports) -> None:
    _, slices, ingest = onboarded
    for site, report in reports.items():
        dataset = ingest[site]["dataset"]
        counted = ("patients", "series", "slices")
        assert {k: report["counts"][k] for k in counted} == {k: dataset[k] for k in counted}
        assert report["counts"]["files_latest_ingest"] == ingest[site]["files"]
        reasons = pq.read_table(slices / "_quarantine" / f"site={site}" / "quarantine.parquet")["reason"].to_pylist()
        assert sum(report["quarantine"].values()) == len(reasons)
        balance = report["class_balance"]
        assert sum(balance["slices"].values()) == report["counts"]["slices"]
        assert balance["slices"] == {k: dataset["labels"].get(k, 0)
                                     for k in ("wnl", "pe", "other", "indeterminate", "unlabelled")}
        assert sum(balance["patients"].values()) + balance["patients_excluded_unlabelled"] == report["counts"]["patients"]


def test_acquisition_and_hu_distributions_describe_the_sites_scanner(reports) -> None:
    for index, (_site, report) in enumerate(sorted(reports.items())):
        conv = site_conventions(index)
        acq = report["acquisition"]
        n = report["counts"]["slices"]
        assert acq["manufacturer"] == {conv.manufacturer: n} and acq["kernel"] == {conv.kernel: n}
        assert acq["slice_thickness_mm"]["values"] == {f"{conv.thickness:g}": n}
        assert acq["kvp"]["values"] == {f"{conv.kvp:g}": n}
        hu = report["hu"]
        assert 0 < hu["sampled_slices"] <= n
        values = list(hu["percentiles"].values())
        assert values == sorted(values) and values[0] >= -1024 and values[-1] <= 3071
        assert values[0] < -900 and values[-1] > 0  # air around and in the chest, contrast-filled vessels
        assert sum(hu["histogram"]["counts"]) == hu["sampled_pixels"]


def test_drift_is_flagged_where_sites_differ_and_not_where_they_agree(reports) -> None:
    for site, report in reports.items():
        drift = report["drift"]
        assert drift["reference_sites"] == sorted(set(reports) - {site})
        assert drift["features"]["manufacturer"]["flagged"] and drift["features"]["slice_thickness_mm"]["flagged"]
        assert drift["features"]["matrix"] == {"psi": 0.0, "flagged": False}  # every synthetic slice is 96x96
        assert drift["flagged"] == sorted(k for k, v in drift["features"].items() if v["flagged"])
        assert any("drift" in w for w in report["warnings"])
    rng = np.random.default_rng(0)
    same = rng.normal(size=5000)
    bins = np.linspace(-4, 4, 11)
    assert psi(np.histogram(same[:2500], bins)[0], np.histogram(same[2500:], bins)[0]) < 0.05
    assert psi(np.array([100, 0]), np.array([0, 100])) > PSI_THRESHOLD


def test_the_first_site_has_nothing_to_compare_with(onboarded, tmp_path: Path) -> None:
    _, slices, _ = onboarded
    for part in ("site=site-b", "_reports/site=site-b", "_quarantine/site=site-b", "_dataset.json"):
        src = slices / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / part)
    report = site_report(str(tmp_path), "site-b")
    assert report["drift"] == {"reference_sites": [], "psi_threshold": PSI_THRESHOLD, "features": {}, "flagged": []}
    assert "nothing to compare" in to_markdown(report)
    with pytest.raises(QualityError, match="site-a"):
        site_report(str(tmp_path), "site-a")


def test_class_balance_counts_indeterminate_slices_and_patients(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_series(src / "p1", 3, series="1.2.3.4.5", patient="PAT-0001")
    write_series(src / "p2", 3, series="1.2.8.5", patient="PAT-0002", study="1.2.8")
    (tmp_path / "labels.csv").write_text("patient_id,sop_uid,label,diagnosis\n"
                                         "PAT-0001,1.2.3.4.5.1,pe,\nPAT-0001,1.2.3.4.5.2,indeterminate,\n"
                                         "PAT-0002,1.2.8.5.3,indeterminate,\n")
    ingest_site("s", str(src), str(tmp_path / "slices"), pseudo=pseudo("s"), labels=str(tmp_path / "labels.csv"),
                config=IngestConfig(workers=1))
    report = site_report(str(tmp_path / "slices"), "s")
    balance = report["class_balance"]
    assert balance["slices"] == {"wnl": 3, "pe": 1, "other": 0, "indeterminate": 2, "unlabelled": 0}
    assert balance["patients"] == {"wnl": 0, "pe": 1, "other": 0, "indeterminate": 1}
    markdown = to_markdown(report)
    assert "| wnl | pe | other | indeterminate | unlabelled |" in markdown and "| slices | 3 | 1 | 0 | 2 | 0 |" in markdown
    assert flat_metrics(report)["slices_indeterminate"] == 2


def test_dataset_version_is_the_provenance_digest_and_follows_the_store(onboarded, tmp_path: Path) -> None:
    _, slices, _ = onboarded
    whole = dataset_version(str(slices))
    assert whole["digest"] == dataset_digest(slices)
    assert whole["rows"] == sum(dataset_version(str(slices), s)["rows"] for s in ("site-a", "site-b", "site-c"))
    copy = tmp_path / "store"
    shutil.copytree(slices, copy)
    assert dataset_version(str(copy))["digest"] == whole["digest"]  # location-independent
    shutil.rmtree(copy / "site=site-c")
    assert dataset_version(str(copy))["digest"] != whole["digest"]
    assert dataset_version(str(copy), "site-a") == dataset_version(str(slices), "site-a") | {"uri": str(copy)}


def test_report_is_json_counts_only_and_renders(reports) -> None:
    for site, report in reports.items():
        text = json.dumps(report)
        assert not re.search(r"\b(pt|st|se|im|file)-[0-9a-f]{24}\b", text)  # no pseudonyms either: counts only
        metrics = flat_metrics(report)
        assert metrics["slices"] == report["counts"]["slices"] and all(math.isfinite(v) for v in metrics.values())
        markdown = to_markdown(report)
        assert markdown.startswith(f"# Data quality: {site}") and "## Drift against the other sites" in markdown


def test_quality_report_is_logged_as_a_dataset_version(reports, mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    report = reports["site-a"]
    run_id = log_quality_report(report, experiment="quality-test", uri=mlflow_server)
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == datasets_experiment("quality-test")
    assert run.data.tags["pe_triage.site_digest"] == report["version"]["digest"]
    assert run.data.tags["pe_triage.dataset_digest"] == report["dataset_digest"]
    assert run.data.metrics["slices"] == report["counts"]["slices"]
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "slices:site-a" and report["version"]["digest"].startswith(dataset_input.dataset.digest)
    assert "site=site-a" in dataset_input.dataset.source
    assert {a.path for a in client.list_artifacts(run_id, "quality")} == {"quality/quality.json", "quality/quality.md"}
    assert log_quality_report(report, experiment="quality-test", uri="") is None  # no tracking configured: nothing logged

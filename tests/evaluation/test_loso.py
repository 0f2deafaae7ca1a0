"""Leave one site out as a step (``evaluation.loso``): which folds a windows store gives, the summary's
arithmetic (per-site drop against the pooled test split, the worst gated drop), what it writes and
logs to a real MLflow server, and one fold trained, calibrated and evaluated end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from factories import write_evaluation, write_site_windows
from mlflow.tracking import MlflowClient

from pe_triage import schema as S
from pe_triage.artifact import read_meta
from pe_triage.config import Config, LosoConfig, ModelConfig, RegistryConfig, TrainConfig
from pe_triage.evaluation.evaluate import EvaluationError
from pe_triage.evaluation.loso import WORST, read_summary, site_folds, summarize, train_fold

SITES = ("site-a", "site-b", "site-c")
#: a tiny model that learns the toy squares in one short epoch on one thread
TINY = dataclasses.replace(
    Config(), model=ModelConfig(arch="cbam_drn_d_22", width=0.125),
    train=TrainConfig(windows=("vascular", "mediastinal", "lung"), epochs=2, batch_size=8, num_workers=0, device="cpu",
                      threads=1, patience=0, amp=False, samples_per_epoch=64),
    evaluate=dataclasses.replace(Config().evaluate, bootstrap=20))


def test_folds_one_per_site_or_none_with_the_reason(tmp_path: Path) -> None:
    windows = write_site_windows(tmp_path)
    folds, reason = site_folds(windows, str(tmp_path / "splits.parquet"), Config())
    assert folds == list(SITES) and reason == ""
    table = pq.read_table(tmp_path / "splits.parquet").to_pylist()
    for fold in SITES:  # the held-out site is the fold's test split, and only there
        assert {r[S.SITE] for r in table if r[S.FOLD] == fold and r[S.SPLIT] == "test"} == {fold}
        assert fold not in {r[S.SITE] for r in table if r[S.FOLD] == fold and r[S.SPLIT] != "test"}
    fewer = dataclasses.replace(Config(), loso=LosoConfig(min_sites=4))
    assert site_folds(windows, str(tmp_path / "none.parquet"), fewer) == ([], "3 site(s), fewer than loso.min_sites 4")
    off = dataclasses.replace(Config(), loso=LosoConfig(enabled=False))
    assert site_folds(windows, str(tmp_path / "off.parquet"), off) == ([], "loso.enabled is false")
    assert not (tmp_path / "none.parquet").exists() and not (tmp_path / "off.parquet").exists()


def test_two_sites_give_no_folds_by_default(tmp_path: Path) -> None:
    windows = write_site_windows(tmp_path, sites=("site-a", "site-b"))
    assert site_folds(windows, str(tmp_path / "s.parquet"), Config()) == ([], "2 site(s), fewer than loso.min_sites 3")


def test_summary_drops_and_the_worst_gated_one(tmp_path: Path, mlflow_server: str) -> None:
    pooled = write_evaluation(tmp_path / "pooled", S.DEFAULT_FOLD)
    folds = [write_evaluation(tmp_path / "a", "site-a", slice_stage1_auroc=0.93),
             write_evaluation(tmp_path / "b", "site-b", slice_stage2_auroc=0.72, patient_pe_sensitivity=0.5),
             write_evaluation(tmp_path / "c", "site-c", slice_stage2_auroc=None)]  # a class absent at site-c
    config = dataclasses.replace(Config(), registry=RegistryConfig(experiment="loso-test", model_name="loso-test"))
    summary = summarize(folds, pooled, str(tmp_path / "loso"), config=config, tracking_uri=mlflow_server)
    assert summary["drops"]["site-a"]["slice_stage1_auroc"] == pytest.approx(0.02)
    assert summary["drops"]["site-b"]["patient_pe_sensitivity"] == pytest.approx(0.5)  # shown, not gated
    assert summary[WORST] == {"site": "site-b", "metric": "slice_stage2_auroc", "drop": pytest.approx(0.18)}
    assert summary["unmeasured"] == [["site-c", "slice_stage2_auroc"]]
    assert read_summary(str(tmp_path / "loso"))[WORST]["site"] == "site-b"
    html = (tmp_path / "loso" / "leave_one_site_out.html").read_text()
    assert "worst gated drop: slice stage2 auroc at site-b, +0.180" in html and "pooled test split" in html
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("loso-test").experiment_id],
                                "tags.step = 'leave_one_site_out'")
    assert run.data.metrics["worst_drop"] == pytest.approx(0.18)
    assert run.data.metrics["site-b.drop.slice_stage2_auroc"] == pytest.approx(0.18)
    assert "leave_one_site_out/leave_one_site_out.json" in {
        a.path for a in client.list_artifacts(run.info.run_id, "leave_one_site_out")}


def test_summary_refuses_unlike_data_and_records_a_skip(tmp_path: Path) -> None:
    pooled = write_evaluation(tmp_path / "pooled", S.DEFAULT_FOLD)
    folds = [write_evaluation(tmp_path / s, s) for s in SITES]
    other = json.loads((Path(pooled) / "metrics.json").read_text())
    other["test_data"]["windows_digest"] = "w2"
    (Path(pooled) / "metrics.json").write_text(json.dumps(other))
    with pytest.raises(EvaluationError, match="other windows"):
        summarize(folds, pooled, str(tmp_path / "x"))
    bad = dataclasses.replace(Config(), loso=LosoConfig(gate_metrics=("slice_stage3_auroc",)))
    with pytest.raises(EvaluationError, match="slice_stage3_auroc"):
        summarize(folds, pooled, str(tmp_path / "y"), config=bad)
    skipped = summarize([], pooled, str(tmp_path / "skip"), skipped="2 site(s), fewer than loso.min_sites 3")
    assert skipped == {"skipped": "2 site(s), fewer than loso.min_sites 3", "folds": {}, WORST: None}
    assert "Not run: 2 site(s)" in (tmp_path / "skip" / "leave_one_site_out.md").read_text()


def test_one_fold_trains_without_its_site_and_is_evaluated_on_it(tmp_path: Path) -> None:
    windows = write_site_windows(tmp_path)
    site_folds(windows, str(tmp_path / "splits.parquet"), TINY)
    metrics = train_fold(windows, str(tmp_path / "splits.parquet"), "site-b", str(tmp_path / "evaluation"), config=TINY,
                         work=str(tmp_path / "fold"))
    assert metrics["test_data"]["fold"] == "site-b" and metrics["test_data"]["patients"] == 6
    assert set(metrics["per_site"]) == {"site-b"}
    assert read_meta(tmp_path / "fold" / "calibrated1")["data"]["fold"] == "site-b"
    assert (tmp_path / "evaluation" / "metrics.json").is_file()
    assert not list((tmp_path / "evaluation").glob("gradcam/*.png"))  # numbers only

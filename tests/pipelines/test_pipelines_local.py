"""Both pipelines end to end under kfp.local against a real MLflow server: a synthetic three-site
cohort is onboarded (quality reports logged as dataset versions), a tiny model retrained, evaluated,
registered and promoted; the registered model then loads by alias and predicts. A second retraining
run on the same store skips training and says why (forced, it is served from the step cache), a
failing run still records its outcome, and a run after a new site is onboarded trains and is compared
with the champion re-evaluated on the new test patients."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from pe_triage_pipelines.demo import study_tables
from pe_triage_pipelines.local import run_local

from pe_triage.config import RegistryConfig, SynthConfig
from pe_triage.registry.overview import registry_overview
from pe_triage.synth import generate_cohort

pytestmark = pytest.mark.slow

EXPERIMENT = "pe-triage-e2e"
#: small enough for a 2-core CPU: 18 patients of 24 slices at 96 px, a 1/8-width DRN-D-22, 2 epochs
CONFIG = f"""
ingest: {{workers: 1}}
preprocess: {{size: 64, workers: 1}}
model: {{arch: cbam_drn_d_22, width: 0.125}}
train: {{epochs: 2, batch_size: 16, num_workers: 0, patience: 0, samples_per_epoch: 96}}
evaluate: {{bootstrap: 20, gradcam_per_category: 1}}
registry:
  model_name: pe-triage
  experiment: {EXPERIMENT}
  # every minimum off: a 2-epoch model cannot reach them, and this test is about the promotion path
  # (the leave-one-site-out folds still run: 3 sites; their gates are off for the same reason)
  gates: {{min_patient_pe_sensitivity: null, min_patient_disease_sensitivity: null, min_slice_disease_sensitivity: null,
          min_slice_disease_specificity: null, min_slice_pe_specificity: null, min_patient_pe_specificity: null,
          min_stage1_auroc_ci_low: null, min_stage2_auroc_ci_low: null, max_site_auroc_drop: null,
          max_site_pe_sensitivity_drop: null}}
"""
SLICE_COLUMNS = ["study_uid", "series_uid", "slice_index", "rows", "cols", "pixel_spacing_row_mm", "pixel_spacing_col_mm",
                 "hu_planes"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    generate_cohort(root / "cohort", SynthConfig(sites=3, patients_per_site=6, slices=24, size=96, seed=11))
    sites = [{"site": d.name, "source": str(d / "dicom"), "labels": str(d / "labels.csv")}
             for d in sorted((root / "cohort" / "sites").iterdir())]
    common = {"slices_store": str(root / "slices"), "config": CONFIG, "tracking_uri": mlflow_server}
    run_local("onboarding", {**common, "sites": sites, "demo_key": True}, pipeline_root=root / "kfp")
    run_local("retraining", common, pipeline_root=root / "kfp")
    return {"root": root, "common": common, "sites": sites}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_onboarding_logged_one_dataset_version_per_site(ran: dict, mlflow_server: str) -> None:
    client = _client(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(f"{EXPERIMENT}-datasets").experiment_id])
    assert sorted(r.data.tags["pe_triage.site"] for r in runs) == ["site-a", "site-b", "site-c"]
    assert all(r.inputs.dataset_inputs and r.data.metrics["slices"] == 6 * 24 for r in runs)


def test_retraining_registered_and_promoted_a_model_that_predicts(ran: dict, mlflow_server: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc

    client = _client(mlflow_server)
    (version,) = client.search_model_versions("name = 'pe-triage'")
    aliases = client.get_registered_model("pe-triage").aliases
    assert aliases.get("champion") == version.version or aliases.get("challenger") == version.version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/pe-triage@{'champion' if 'champion' in aliases else 'challenger'}")
    rows = pads.dataset(Path(ran["common"]["slices_store"]) / "site=site-a", format="parquet").to_table().to_pandas()
    rows = rows[rows["series_uid"] == rows["series_uid"].iloc[0]][SLICE_COLUMNS]
    out = model.predict(rows)
    assert len(out) == len(rows) and out["p_disease"].between(0, 1).all() and out["p_pe"].between(0, 1).all()
    assert set(out["triage"]) <= {"wnl", "other", "pe"}
    assert [r.data.tags["pe_triage.outcome"] for r in _runs(client, "pipeline_outcome")] == ["SUCCEEDED"]
    (trigger,) = _runs(client, "retrain_trigger")
    assert trigger.data.tags["pe_triage.trigger.train"] == "true"
    assert "no champion" in trigger.data.tags["pe_triage.trigger.reason"]
    assert version.tags["dataset.slices_digest"] == trigger.data.params["slices_digest"]  # the lineage the trigger reads


def _runs(client, kind: str) -> list:
    """The ``-pipelines`` experiment's runs of one kind, newest first."""
    experiment = client.get_experiment_by_name(f"{EXPERIMENT}-pipelines").experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`pe_triage.kind` = '{kind}'",
                              order_by=["attributes.start_time DESC"])


def test_leave_one_site_out_trained_a_fold_per_site_and_the_version_carries_its_summary(ran: dict,
                                                                                      mlflow_server: str) -> None:
    client = _client(mlflow_server)
    version = client.get_model_version("pe-triage", "1")
    assert version.tags["loso.worst_site"] in {s["site"] for s in ran["sites"]}
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment], "tags.step = 'leave_one_site_out'")
    assert {k.split(".")[0] for k in run.data.metrics if k != "worst_drop"} == {s["site"] for s in ran["sites"]}
    folds = client.search_runs([experiment], "tags.step = 'evaluate' and tags.fold != 'default'")
    assert sorted(r.data.tags["fold"] for r in folds) == sorted(s["site"] for s in ran["sites"])


def test_the_demo_summary_reads_the_registry(ran: dict, mlflow_server: str, tmp_path: Path) -> None:
    overview = registry_overview(tmp_path, config=RegistryConfig(experiment=EXPERIMENT), uri=mlflow_server)
    assert overview["latest"] == 1 and overview["aliases"] == {"champion": 1}  # promote moved challenger to champion
    tables = study_tables(overview["metrics"])
    assert "stage 1: disease vs WNL" in tables and "PE detection" in tables
    assert overview["metrics"]["per_site"] and all(f"\n{site} " in tables for site in overview["metrics"]["per_site"])
    assert (Path(overview["evaluation"]) / "report.html").is_file()


def test_a_second_run_on_the_same_store_skips_training_and_says_why(ran: dict, mlflow_server: str,
                                                                   capsys: pytest.CaptureFixture) -> None:
    run_local("retraining", ran["common"], pipeline_root=ran["root"] / "kfp")
    executed = set(re.findall(r"Executing task '([\w-]+)'", re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)))
    assert {"dataset-version", "check-trigger"} <= executed and not executed & {"preprocess", "train", "train-2", "register"}
    client = _client(mlflow_server)
    outcome = _runs(client, "pipeline_outcome")[0].data.tags
    assert outcome["pe_triage.outcome"] == "SKIPPED"
    reason = outcome["pe_triage.trigger.reason"]
    assert reason.startswith("skipped: nothing new: the slices store digest ") and "is the champion's (version 1)" in reason
    assert _runs(client, "retrain_trigger")[0].data.tags["pe_triage.trigger.reason"] == reason
    assert len(client.search_model_versions("name = 'pe-triage'")) == 1


def test_a_forced_second_run_is_served_from_the_step_cache(ran: dict, mlflow_server: str, capsys: pytest.CaptureFixture,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    run_local("retraining", {**ran["common"], "force": True}, pipeline_root=ran["root"] / "kfp")
    hits = {m.split()[1] for m in caplog.messages if "cache hit" in m}
    # every step of the model's path (others' steps, e.g. leave-one-site-out, may add to them)
    assert {"preprocess", "split", "train", "train-2", "calibrate", "evaluate", "register", "check-gates"} <= hits
    assert "dataset-version" in re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # the store's version is read afresh
    assert len(_client(mlflow_server).search_model_versions("name = 'pe-triage'")) == 1  # nothing registered twice


def test_a_failed_run_still_records_its_outcome(ran: dict, mlflow_server: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError):
        run_local("retraining", {**ran["common"], "slices_store": str(tmp_path / "empty")}, pipeline_root=tmp_path / "kfp")
    runs = _runs(_client(mlflow_server), "pipeline_outcome")
    assert runs[0].data.tags["pe_triage.outcome"] == "FAILED" and runs[0].data.metrics["succeeded"] == 0.0


def test_a_run_after_a_new_site_trains_and_compares_with_the_champion_on_the_new_patients(ran: dict,
                                                                                         mlflow_server: str) -> None:
    """A fourth site onboarded: the store's digest is no longer the champion's, so the scheduled run
    (no --force) trains. The new site (and another split seed) put other patients in the test split:
    the champion is re-evaluated on them before promotion, so the regression gates run on the same
    test data instead of failing it."""
    import json

    root = ran["root"]
    generate_cohort(root / "cohort4", SynthConfig(sites=4, patients_per_site=6, slices=24, size=96, seed=11))
    site = root / "cohort4" / "sites" / "site-d"
    run_local("onboarding", {**ran["common"], "sites": [{"site": "site-d", "source": str(site / "dicom"),
                                                         "labels": str(site / "labels.csv")}], "demo_key": True},
              pipeline_root=root / "kfp")
    common = {**ran["common"], "config": ran["common"]["config"] + "split: {seed: 3}\n"}
    run_local("retraining", common, pipeline_root=root / "kfp")
    client = _client(mlflow_server)
    trigger = _runs(client, "retrain_trigger")[0].data.tags
    assert trigger["pe_triage.trigger.train"] == "true"
    assert trigger["pe_triage.trigger.reason"].startswith("new or changed labelled data: the slices store digest ")
    assert _runs(client, "pipeline_outcome")[0].data.tags["pe_triage.outcome"] == "SUCCEEDED"
    latest = max(client.search_model_versions("name = 'pe-triage'"), key=lambda v: int(v.version))
    assert latest.version == "2"
    gates = {g["name"]: g for g in json.loads(latest.tags["last_decision.gates"])}
    assert gates["same_test_data"]["passed"]
    assert {"max_regression.slice_stage1_auroc", "max_regression.patient_pe_sensitivity"} <= set(gates)
    assert latest.tags["last_decision.outcome"] in ("promoted", "refused")


def test_the_exam_model_was_trained_on_the_pair_evaluated_beside_the_rules_and_registered(ran: dict,
                                                                                         mlflow_server: str) -> None:
    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    trained = client.search_runs([experiment], "tags.step = 'train-exam'")
    assert trained and all(r.info.status == "FINISHED" and "val_pe_auroc" in r.data.metrics for r in trained)
    evaluated = client.search_runs([experiment], "tags.step = 'evaluate' and tags.fold = 'default'")
    # the candidates' and the champion's re-evaluations alike: the exam model's figures beside the rules'
    assert evaluated and all(any(k.startswith("exam_patient_") for k in r.data.metrics) for r in evaluated)
    version = client.get_model_version("pe-triage", "1")
    assert version.tags["pe_triage.exam_model"] != "none", "the version carries its exam model"

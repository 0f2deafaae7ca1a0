"""Leave one site out in the retraining pipeline: compiled, one GPU fold per site under a
``ParallelFor`` whose summary ``check_gates`` and ``register`` receive; and its components called
directly on a three-site toy cohort, placeholder iteration (too few sites) included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from factories import write_evaluation, write_site_windows
from kfp import dsl
from pe_triage_components import COMPONENTS as C
from pe_triage_pipelines.cluster import ClusterOptions
from pe_triage_pipelines.compile import compile_all

from pe_triage.evaluation.loso import WORST


def _tasks(spec: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    found: dict[str, tuple[str, dict[str, Any]]] = {}

    def walk(component: str, dag: dict[str, Any]) -> None:
        for name, task in dag["tasks"].items():
            found[name] = (component, task)
            ref = spec["components"][task["componentRef"]["name"]]
            if "dag" in ref:
                walk(task["componentRef"]["name"], ref["dag"])

    walk("root", spec["root"]["dag"])
    return found


@pytest.fixture(scope="module")
def retraining(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(compile_all(tmp_path_factory.mktemp("ir"))["retraining"].read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_one_gpu_fold_per_site_and_the_summary_reaches_the_gates_and_the_registry(retraining) -> None:
    spec, executors = retraining
    tasks = _tasks(spec)
    loop_parent, loop = next((p, t) for n, (p, t) in tasks.items() if t["taskInfo"]["name"] == "site-folds")
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--loso-folds-Output"
    assert loop["iteratorPolicy"]["parallelismLimit"] == ClusterOptions().parallel_folds
    fold_parent, fold = tasks["loso-fold"]
    assert fold_parent == loop["componentRef"]["name"]  # trained once per item of the loop
    assert fold["inputs"]["parameters"]["fold"]["componentInputParameter"].startswith("pipelinechannel--loso-folds-Output")
    label = spec["components"][fold["componentRef"]["name"]]["executorLabel"]
    resources = spec["deploymentSpec"]["executors"][label]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"  # trains like train
    assert executors[label]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
    summary = tasks["loso-summary"][1]
    assert tasks["loso-summary"][0] == loop_parent
    collected = summary["inputs"]["artifacts"]["evaluations"]["taskOutputArtifact"]
    assert collected == {"producerTask": loop["taskInfo"]["name"] and next(n for n, (_, t) in tasks.items() if t is loop),
                         "outputArtifactKey": "pipelinechannel--loso-fold-evaluation"}
    pooled = summary["inputs"]["artifacts"]["pooled"]["taskOutputArtifact"]
    assert pooled == {"producerTask": "evaluate", "outputArtifactKey": "evaluation"}  # drops against the main pair's test
    for consumer in ("register", "check-gates"):
        loso = tasks[consumer][1]["inputs"]["artifacts"]["loso"]["taskOutputArtifact"]
        assert loso == {"producerTask": "loso-summary", "outputArtifactKey": "loso"}, consumer
    for name in ("register", "check-gates"):  # optional: a version registered by hand needs none
        inputs = spec["components"][tasks[name][1]["componentRef"]["name"]]["inputDefinitions"]["artifacts"]
        assert inputs["loso"].get("isOptional") is True


def _out(cls: type[dsl.Artifact], folder: Path, name: str) -> dsl.Artifact:
    folder.mkdir(parents=True, exist_ok=True)
    return cls(name=name, uri=str(folder / name), metadata={})


def _windows(path: str) -> dsl.Dataset:
    return dsl.Dataset(name="windows", uri=path, metadata={})


TINY = """
model: {arch: cbam_drn_d_22, width: 0.125}
train: {windows: [vascular, mediastinal, lung], epochs: 1, batch_size: 8, num_workers: 0, device: cpu, threads: 1,
        patience: 0, amp: false, samples_per_epoch: 32}
evaluate: {bootstrap: 10}
"""


def test_components_fold_and_summary_on_a_toy_cohort(tmp_path: Path) -> None:
    windows = _windows(write_site_windows(tmp_path))
    splits = _out(dsl.Dataset, tmp_path / "folds", "site_splits")
    folds = C.loso_folds.python_func(windows=windows, config=TINY, site_splits=splits)
    assert folds == ["site-a", "site-b", "site-c"] and splits.metadata["skipped"] == ""
    evaluation = _out(dsl.Artifact, tmp_path / "fold-b", "evaluation")
    C.loso_fold.python_func(windows=windows, site_splits=splits, fold="site-b", config=TINY, tracking_uri="",
                            evaluation=evaluation)
    metrics = json.loads((Path(evaluation.path) / "metrics.json").read_text())
    assert metrics["test_data"]["fold"] == "site-b" and evaluation.metadata["fold"] == "site-b"
    digest = metrics["test_data"]["windows_digest"]  # the fakes: on the toy's windows and splits, as the real fold is
    others = [evaluation if s == "site-b" else
              dsl.Artifact(name="e", uri=write_evaluation(tmp_path / s, s, windows_digest=digest,
                                                          splits_digest=metrics["test_data"]["splits_digest"]), metadata={})
              for s in folds]
    pooled = dsl.Artifact(name="pooled", uri=write_evaluation(tmp_path / "pooled", "default", windows_digest=digest),
                          metadata={})
    loso, report, views = (_out(cls, tmp_path / "summary", n) for cls, n in
                           ((dsl.Artifact, "loso"), (dsl.HTML, "report"), (dsl.Metrics, "metrics")))
    C.loso_summary.python_func(evaluations=others, pooled=pooled, site_splits=splits, config=TINY, tracking_uri="",
                               loso=loso, report=report, metrics=views)
    summary = json.loads((Path(loso.path) / "leave_one_site_out.json").read_text())
    assert sorted(summary["folds"]) == folds and summary[WORST] is not None
    assert views.metadata["worst_drop"] == pytest.approx(summary[WORST]["drop"])
    assert "<table" in Path(report.path).read_text()


def test_too_few_sites_run_one_placeholder_that_trains_nothing_and_the_summary_says_why(tmp_path: Path) -> None:
    windows = _windows(write_site_windows(tmp_path, sites=("site-a", "site-b")))
    splits = _out(dsl.Dataset, tmp_path / "folds", "site_splits")
    assert C.loso_folds.python_func(windows=windows, config="", site_splits=splits) == [""]
    assert splits.metadata["skipped"] == "2 site(s), fewer than loso.min_sites 3"
    placeholder = _out(dsl.Artifact, tmp_path / "fold", "evaluation")
    C.loso_fold.python_func(windows=windows, site_splits=splits, fold="", config="", tracking_uri="", evaluation=placeholder)
    assert Path(placeholder.path).read_text() == ""  # nothing trained
    loso, report, views = (_out(cls, tmp_path / "summary", n) for cls, n in
                           ((dsl.Artifact, "loso"), (dsl.HTML, "report"), (dsl.Metrics, "metrics")))
    C.loso_summary.python_func(evaluations=[placeholder], pooled=placeholder, site_splits=splits, config="", tracking_uri="",
                               loso=loso, report=report, metrics=views)
    summary = json.loads((Path(loso.path) / "leave_one_site_out.json").read_text())
    assert summary["skipped"] == "2 site(s), fewer than loso.min_sites 3" and summary[WORST] is None
    assert "Not run" in Path(report.path).read_text()

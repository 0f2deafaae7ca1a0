"""Data by reference on a cluster with a data root: the compiled retraining pipeline passes the
slices store's URI and digest (no importer, no store as an input artifact), every step mounts the
data volume, evaluation moves to a GPU node when configured; and the ``preprocess_store`` component
updates the persistent windows store in place: only a new series is preprocessed, an unchanged
store is reused as is."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl
from pe_triage_components import COMPONENTS
from pe_triage_pipelines.cluster import ClusterOptions
from pe_triage_pipelines.compile import compile_pipeline

from pe_triage.quality import dataset_version

DATA = ClusterOptions(data_root="/data/pe-triage", data_claim="pe-triage-data", data_mount="/data")
#: forward passes over whole splits (the exam step embeds train and val as evaluate scores test)
EVALUATIONS = ("exec-evaluate", "exec-evaluate-champion", "exec-train-exam")


def _compiled(tmp_path: Path, options: ClusterOptions) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(component specs, executors, kubernetes platform specs) of the retraining pipeline."""
    spec, platform = yaml.safe_load_all(compile_pipeline("retraining", tmp_path / "retraining.yaml", options).read_text())
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return spec["components"], spec["deploymentSpec"]["executors"], kubernetes


def test_the_cluster_pipeline_passes_the_store_by_uri_and_digest(tmp_path: Path) -> None:
    components, executors, platform = _compiled(tmp_path, DATA)
    assert not any("importer" in e for e in executors.values()), "no slices store imported as an artifact"
    inputs = components["comp-preprocess-store"]["inputDefinitions"]
    assert set(inputs["parameters"]) == {"slices_store", "slices_digest", "config", "windows_root"}
    assert "artifacts" not in inputs, "the preprocess step reads the store by URI"
    assert "comp-preprocess" not in components
    for label, pod in platform.items():
        if label == "exec-check-gates":
            continue
        assert [(m["mountPath"], m["pvcNameParameter"]["runtimeValue"]["constant"]) for m in pod["pvcMount"]] == [
            ("/data", "pe-triage-data")], label
    local, executors, platform = _compiled(tmp_path / "local", ClusterOptions())
    assert "comp-preprocess-store" not in local and any("importer" in e for e in executors.values())
    assert not any("pvcMount" in pod for pod in platform.values())


def test_evaluation_runs_on_a_gpu_node_only_when_configured(tmp_path: Path) -> None:
    _, executors, platform = _compiled(tmp_path, ClusterOptions(evaluate_gpu=True, gpus=4))
    for label in EVALUATIONS:
        container = executors[label]["container"]
        assert container["resources"]["accelerator"]["resourceCount"] == "1" and "cuda" in container["image"], label
        assert platform[label]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
        assert platform[label]["tolerations"][0]["key"] == "nvidia.com/gpu"
    _, executors, platform = _compiled(tmp_path / "cpu", ClusterOptions(gpus=4))
    for label in EVALUATIONS:
        assert "accelerator" not in executors[label]["container"].get("resources", {}) and "nodeSelector" not in platform[label]


def test_cluster_config_data_section_and_gpu_evaluation() -> None:
    options = ClusterOptions.from_cluster_config({"data": {"root": "/mnt/d/pe", "claimName": "rel-data", "mountPath": "/mnt/d"},
                                                  "gpu": {"count": 1, "evaluate": True}})
    got = (options.data_root, options.data_claim, options.data_mount, options.evaluate_gpu)
    assert got == ("/mnt/d/pe", "rel-data", "/mnt/d", True)
    assert ClusterOptions.from_cluster_config({"data": {"root": ""}}).data_root is None
    for bad in ({"root": "s3://bucket/pe", "claimName": "c"}, {"root": "/elsewhere/pe", "claimName": "c"}, {"root": "/data/pe"}):
        with pytest.raises(ValueError, match="data root"):
            ClusterOptions.from_cluster_config({"data": bad})


def _preprocess(store: Path, root: Path, config: str = "") -> dict[str, Any]:
    windows = dsl.Dataset(name="windows", uri=str(root.parent / "out" / "windows"), metadata={})
    COMPONENTS.preprocess_store.python_func(slices_store=str(store), slices_digest=dataset_version(str(store))["digest"],
                                            config=config, windows_root=str(root), windows=windows)
    return windows.metadata


def test_a_second_preprocess_processes_only_the_new_series(onboarded: tuple[Path, Path, dict], tmp_path: Path) -> None:
    _, slices, _ = onboarded
    store = tmp_path / "slices"
    shutil.copytree(slices, store)
    newest = sorted(store.glob("site=*/*.parquet"))[-1]
    held_back = newest.rename(tmp_path / newest.name)
    (tmp_path / "out").mkdir()

    first = _preprocess(store, tmp_path / "data")
    assert first["reference"] and not first["reused"] and first["uri"].startswith(str(tmp_path / "data" / "windows"))
    windows = Path(first["uri"])
    before = {p: p.stat().st_mtime_ns for p in windows.glob("site=*/*.parquet")}

    held_back.rename(newest)
    second = _preprocess(store, tmp_path / "data")
    assert second["uri"] == first["uri"] and second["slices_digest"] != first["slices_digest"]
    report = yaml.safe_load((windows / "_reports" / "preprocess_report.json").read_text())
    assert report["series"] == {"total": len(before) + 1, "written": 1, "unchanged": len(before)}
    assert {p: p.stat().st_mtime_ns for p in before} == before, "the series already preprocessed are not rewritten"
    assert second["windows_digest"] != first["windows_digest"]

    splits = dsl.Dataset(name="splits", uri=str(tmp_path / "out" / "splits"), metadata={})
    reference = dsl.Dataset(name="windows", uri=str(tmp_path / "out" / "windows"), metadata=second)  # its file: the record
    COMPONENTS.split.python_func(windows=reference, config="", splits=splits)
    assert splits.metadata["patients"], "a step after preprocess_store reads the store the reference names"

    third = _preprocess(store, tmp_path / "data")
    assert third["reused"] and third["windows_digest"] == second["windows_digest"]
    other = _preprocess(store, tmp_path / "data", "preprocess: {size: 64}\n")
    assert other["uri"] != first["uri"] and not other["reused"], "another configuration: a store of its own"


def test_a_digest_that_is_not_hex_is_refused(tmp_path: Path) -> None:
    from pe_triage.preprocess import PreprocessError, preprocess_into

    with pytest.raises(PreprocessError, match="hex digest"):
        preprocess_into(str(tmp_path), str(tmp_path / "data"), slices_digest="../../etc")

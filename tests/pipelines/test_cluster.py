"""Pod plumbing of the compiled pipelines, read from the KFP YAML: one DDP rank per GPU (the launcher
for 0, 1 and 4 GPUs), a memory-backed /dev/shm on every step, the checkpoint volume of the training
steps, per-step timeouts and retries; and the ``pods`` section of the chart's cluster.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from factories import write_toy_cohort
from kfp import dsl
from pe_triage_components import COMPONENTS
from pe_triage_pipelines.cluster import ClusterOptions
from pe_triage_pipelines.compile import compile_pipeline

from pe_triage.training.launch import (
    CHECKPOINT_ROOT_ENV,
    PROCESSES_ENV,
    checkpoint_dir,
    launcher,
    train_command,
)

TRAIN = ("exec-train", "exec-train-2")
#: training pods: the two stages and the leave-one-site-out folds (one executor, one pod per fold)
TRAINING = (*TRAIN, "exec-loso-fold")


def _compiled(tmp_path: Path, options: ClusterOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(container specs, kubernetes platform specs) of every executor of the retraining pipeline."""
    spec, platform = yaml.safe_load_all(compile_pipeline("retraining", tmp_path / "retraining.yaml", options).read_text())
    return ({k: v["container"] for k, v in spec["deploymentSpec"]["executors"].items() if "container" in v},  # not the importer
            platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"])


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_training_starts_one_rank_per_gpu_of_its_pod(tmp_path: Path, gpus: int) -> None:
    containers, platform = _compiled(tmp_path, ClusterOptions(gpus=gpus))
    for label in TRAIN:
        processes = int(_env(containers[label])[PROCESSES_ENV])
        command = launcher(processes)
        if gpus > 1:
            assert command[1:] == ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
            assert containers[label]["resources"]["accelerator"]["resourceCount"] == str(gpus)
        else:
            assert processes == 1 and command == [], "one GPU or none: the step trains in its own process"
        if gpus == 0:
            assert "accelerator" not in containers[label]["resources"] and "nodeSelector" not in platform[label]
        else:
            assert platform[label]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}


def test_every_step_has_a_memory_backed_shm_and_a_timeout_and_training_its_own(tmp_path: Path) -> None:
    options = ClusterOptions(shm_size="6Gi", train_timeout_s=7200, io_timeout_s=600)
    containers, platform = _compiled(tmp_path, options)
    assert set(containers) - set(platform) == {"exec-check-gates"}  # reads a JSON the step before wrote: no pod settings
    for label, pod in platform.items():
        assert pod["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "6Gi", "volumeName": "dshm"}]
        assert int(pod["activeDeadlineSeconds"]) == (7200 if label in TRAINING else 600), label


def test_training_checkpoints_on_the_claim_when_one_is_configured(tmp_path: Path) -> None:
    containers, platform = _compiled(tmp_path / "with", ClusterOptions(checkpoint_claim="ckpts", checkpoint_mount="/ck"))
    for label in TRAIN:
        (mount,) = platform[label]["pvcMount"]
        assert mount["mountPath"] == "/ck" and mount["pvcNameParameter"]["runtimeValue"]["constant"] == "ckpts"
        assert _env(containers[label])[CHECKPOINT_ROOT_ENV] == "/ck"
    assert not any("pvcMount" in pod for label, pod in platform.items() if label not in TRAINING)
    containers, platform = _compiled(tmp_path / "without", ClusterOptions())
    for label in TRAIN:
        assert "pvcMount" not in platform[label] and CHECKPOINT_ROOT_ENV not in _env(containers[label])


def test_a_retried_pod_finds_its_checkpoint_folder_and_another_step_gets_its_own() -> None:
    key = {"stage": 1, "inputs": ("s3://b/windows", "s3://b/splits"), "config": "train: {epochs: 3}", "version": "1.2.0"}
    folder = checkpoint_dir("/ck", **key)  # type: ignore[arg-type]
    assert folder == checkpoint_dir("/ck", **key) and folder.startswith("/ck/stage1-")  # type: ignore[arg-type]
    for change in ({"stage": 2}, {"config": "train: {epochs: 4}"}, {"version": "1.3.0"}, {"inputs": ("s3://b/w2", "s3://b/splits")}):
        assert checkpoint_dir("/ck", **{**key, **change}) != folder  # type: ignore[arg-type]


def test_the_torchrun_command_resumes_from_the_checkpoint_folder() -> None:
    command = train_command(4, windows="w", splits="s", out="o", stage=2, config_file="c.yaml", tracking_uri="",
                            checkpoint_dir="/ck/x")
    assert "--nproc_per_node=4" in command and command[command.index("--checkpoint-dir") + 1] == "/ck/x"
    assert "--resume" in command and "--tracking-uri" not in command
    with pytest.raises(ValueError, match="one process"):
        train_command(1, windows="w", splits="s", out="o", stage=2, config_file="c.yaml", tracking_uri="", checkpoint_dir="x")


def test_cluster_config_pods_section_sets_shm_checkpoints_timeouts_and_retries() -> None:
    options = ClusterOptions.from_cluster_config({"pods": {
        "shmSize": "8Gi", "retries": 5, "timeouts": {"trainSeconds": 3600, "ioSeconds": 900},
        "checkpoints": {"claimName": "rel-pe-triage-checkpoints", "mountPath": "/mnt/ck"}}})
    assert (options.shm_size, options.retries, options.train_timeout_s, options.io_timeout_s) == ("8Gi", 5, 3600, 900)
    assert (options.checkpoint_claim, options.checkpoint_mount) == ("rel-pe-triage-checkpoints", "/mnt/ck")
    default = ClusterOptions.from_cluster_config({"pods": {"checkpoints": {"claimName": ""}}})
    assert default.checkpoint_claim is None and default.shm_size == ClusterOptions().shm_size


def test_the_train_component_checkpoints_on_the_volume_its_pod_mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What gpu_step's environment does to the step: checkpoints under the claim's mount, keyed by the inputs."""
    windows, splits = write_toy_cohort(tmp_path, 32)
    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, str(tmp_path / "volume"))
    monkeypatch.setenv(PROCESSES_ENV, "1")
    config = ("model: {arch: plain_cnn, width: 0.125}\nloader: {augment: false}\n"
              "train: {windows: [vascular, lung], epochs: 1, batch_size: 8, num_workers: 0, samples_per_epoch: 16, threads: 1}\n")
    model = dsl.Model(name="model", uri=str(tmp_path / "out" / "model"), metadata={})
    (tmp_path / "out").mkdir()
    COMPONENTS.train.python_func(windows=dsl.Dataset(name="windows", uri=windows), splits=dsl.Dataset(name="splits", uri=splits),
                                 stage=1, config=config, tracking_uri="", model=model)
    assert model.metadata["stage"] == 1 and 0 <= model.metadata["threshold"] <= 1
    (folder,) = (tmp_path / "volume").iterdir()
    assert (folder / "last.pt").exists() and not (tmp_path / "out" / "model.checkpoints").exists()

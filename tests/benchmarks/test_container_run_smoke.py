"""benchmarks/container_run.py without containers (the real run needs root, a Docker daemon and the
built image, and takes minutes: not in CI). What can drift here: its configuration against the
library's (a new gate left on would skip the promotion steps it must run) and the kfp.local log
lines its step timings are read from."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pe_triage.config import load_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "container_run.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("container_run", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_config_is_valid_and_switches_every_promotion_gate_off(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(load_script().CONFIG)
    config = load_config(str(path))
    gates = {k: v for k, v in vars(config.registry.gates).items() if k != "max_regression"}
    assert gates and all(v is None for v in gates.values()), gates
    assert not config.loso.enabled and config.model.context == 1  # 2.5-D windows through the containers


def test_step_times_pair_each_task_start_with_its_end() -> None:
    log = ("06:27:03.723 - INFO - Executing task \x1b[96m'train'\x1b[0m\n"
           "    INFO pe_triage.training.train: epoch 1/2\n"
           "06:27:04.000 - INFO - Executing task 'split'\n"
           "06:27:05.500 - INFO - Task 'split' finished with status \x1b[92mSUCCESS\x1b[0m\n"
           "06:28:54.417 - ERROR - Task \x1b[96m'train'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m\n"
           "23:59:59.000 - INFO - Executing task 'register'\n"
           "00:00:01.000 - INFO - Task 'register' finished with status SUCCESS\n")
    assert load_script().step_times(log) == [
        {"step": "split", "status": "SUCCESS", "seconds": 1.5},
        {"step": "train", "status": "FAILURE", "seconds": 110.7},
        {"step": "register", "status": "SUCCESS", "seconds": 2.0},
    ]


def _docker_daemon() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _docker_daemon(), reason="no Docker daemon")
def test_an_image_the_daemon_lacks_is_a_clear_error_not_a_pull() -> None:
    with pytest.raises(SystemExit, match="not in the Docker daemon"):
        load_script().check_image_current("localhost/pe-triage-absent:0")

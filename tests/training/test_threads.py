"""Threads: a training process takes its share of the CPUs it may use (affinity, cgroup quota), so
steps side by side do not oversubscribe the cores, and it leaves its caller's thread count as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from factories import write_toy_cohort

import pe_triage.training.train as train_module
from pe_triage import parallel
from pe_triage.config import Config, LoaderConfig, ModelConfig, TrainConfig
from pe_triage.parallel import available_cpus
from pe_triage.training.train import TrainingError, train, training_threads

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("cpu_max", "expected"), [
    (None, AFFINITY),  # no cgroup v2 quota file
    ("max 100000\n", AFFINITY),  # no limit
    ("100000 100000\n", 1),  # a 1-CPU limit
    ("150000 100000\n", 1),  # 1.5 CPUs: a second thread would be throttled half the time
    ("6400000 100000\n", AFFINITY),  # a 64-CPU limit is no more than the cores this process may use
    ("garbage\n", AFFINITY),
])
def test_available_cpus_is_the_affinity_capped_by_the_cgroup_quota(tmp_path: Path, cpu_max: str | None,
                                                                   expected: int) -> None:
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    assert available_cpus(str(tmp_path)) == expected


def test_training_threads_share_the_cpus_among_steps_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert training_threads(TrainConfig(), cpus=8) == 8
    assert training_threads(TrainConfig(side_by_side=2), cpus=8) == 4
    assert training_threads(TrainConfig(side_by_side=2), cpus=2) == 1
    assert training_threads(TrainConfig(side_by_side=3), cpus=2) == 1  # never none
    assert training_threads(TrainConfig(threads=3, side_by_side=2), cpus=8) == 3  # set: taken as it is
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the operator's cap
    assert training_threads(TrainConfig(), cpus=8) == 3 and training_threads(TrainConfig(side_by_side=4), cpus=8) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two ranks on this node
    assert training_threads(TrainConfig(), cpus=8) == 3 and training_threads(TrainConfig(), cpus=4) == 2
    with pytest.raises(TrainingError, match="side_by_side"):
        train("w", "s", "o", stage=1, config=Config(train=TrainConfig(side_by_side=0)))


def test_training_runs_on_its_share_and_restores_the_callers_threads(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    windows, splits = write_toy_cohort(tmp_path, 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(parallel, "available_cpus", lambda: 4)
    seen: list[int] = []
    steps = train_module._train_steps
    monkeypatch.setattr(train_module, "_train_steps", lambda *a: seen.append(torch.get_num_threads()) or steps(*a))
    before = torch.get_num_threads()
    config = Config(model=ModelConfig(arch="cbam_drn_d_22", width=0.125),
                    loader=LoaderConfig(cache_dir=str(tmp_path / "cache"), augment=False),
                    train=TrainConfig(windows=("vascular", "lung"), epochs=1, batch_size=8, num_workers=0,
                                      samples_per_epoch=16, patience=0, side_by_side=2))
    meta = train(windows, splits, str(tmp_path / "m"), stage=1, config=config)
    assert seen == [2] and meta["threads"] == 2  # 4 CPUs, 2 steps side by side
    assert torch.get_num_threads() == before

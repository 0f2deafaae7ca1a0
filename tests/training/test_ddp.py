"""DistributedDataParallel under ``torchrun`` on CPU (gloo): both ranks train, rank 0 alone writes
(files and MLflow), the samples of an epoch are split across the ranks as ``_Run.samples`` says,
and a run killed after its first checkpoint resumes on every rank from that checkpoint, to the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import psutil
import pytest
import torch
import yaml
from factories import write_toy_cohort

from pe_triage.config import TrainConfig
from pe_triage.training.launch import CHECKPOINT_ROOT_ENV, PROCESSES_ENV, train_step
from pe_triage.training.train import CHECKPOINT, _epoch_loader, _epoch_seed, _RankShare, _Shuffle

#: odd on purpose: 129 samples over 2 ranks of batch 8 are 65 + 64 unpadded, 9 batches against 8 (a
#: rank left waiting in an all-reduce); padded, both ranks draw 65
SAMPLES, BATCH, EPOCHS, WORLD = 129, 8, 4, 2

#: run by torchrun on every rank: records each file this rank opens for writing (or renames) under
#: WATCHED into WRITES.<rank>, then runs the CLI
_RANK_SCRIPT = """
import os, sys
watched, rank = os.environ["WATCHED"], os.environ["RANK"]
log = open(os.environ["WRITES"] + "." + rank, "a", buffering=1)
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(watched):
        mode, flags = args[1] or "", args[2] or 0
        if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR):
            log.write(args[0] + "\\n")
    elif event in ("os.rename", "os.replace") and str(args[1]).startswith(watched):
        log.write(str(args[1]) + "\\n")
sys.addaudithook(hook)
from pe_triage.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_every_rank_gets_an_equal_share_of_the_same_sequence() -> None:
    base = _Shuffle(10, 11, seed=3)
    shares = [list(_RankShare(base, rank, 2)) for rank in range(2)]
    assert [len(s) for s in shares] == [6, 6] == [len(_RankShare(base, r, 2)) for r in range(2)]
    assert sorted(shares[0][:6] + shares[1][:5]) == sorted(base)  # all drawn once, one index again to even the shares
    assert [len(list(_RankShare(_Shuffle(3, 2, seed=0), rank, 4))) for rank in range(4)] == [1] * 4  # fewer than ranks


class _Targets(list):
    """A stand-in training set: what the samplers read (its targets) and items the loader never fetches here."""

    targets = [0, 1] * 10


def test_ranks_share_the_order_and_augment_from_seeds_of_their_own() -> None:
    cfg = TrainConfig(seed=5, batch_size=4, num_workers=0)
    runs = [SimpleNamespace(cfg=cfg, rank=rank, world=2, samples=21, train_ds=_Targets(range(20)),
                            loader_kw=lambda: {"batch_size": 4}) for rank in range(2)]
    seeds, orders = [], []
    for run in runs:
        loader = _epoch_loader(run, epoch=3)  # type: ignore[arg-type]
        seeds.append((torch.initial_seed(), loader.generator.initial_seed()))
        orders.append(list(loader.sampler))
    assert seeds[0] == (_epoch_seed(5, 3),) * 2, "rank 0 draws as a single process does"
    assert seeds[1][0] != seeds[0][0] and seeds[1][1] != seeds[0][1]
    assert len(orders[0]) == len(orders[1]) == 11
    single = list(_epoch_loader(SimpleNamespace(**{**vars(runs[0]), "world": 1}), epoch=3).sampler)  # type: ignore[arg-type]
    assert orders[0][:11] == single[0::2] and orders[1][:10] == single[1::2]


def _config_text(tmp_path: Path, **train: object) -> str:
    return yaml.safe_dump({"model": {"arch": "cbam_drn_d_22", "width": 0.125},
                           "loader": {"cache_dir": str(tmp_path / "cache"), "augment": False},
                           "train": {"windows": ["vascular", "lung"], "epochs": EPOCHS, "batch_size": BATCH, "lr": 6e-3,
                                     "num_workers": 0, "samples_per_epoch": SAMPLES, "warmup_epochs": 0.5, "patience": 0,
                                     "threads": 1, "device": "cpu", **train},
                           "registry": {"experiment": "ddp"}})


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_pipeline_step_checkpoints_on_the_volume_and_launches_a_rank_per_gpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: int) -> None:
    windows, splits = write_toy_cohort(tmp_path / "toy", 32)
    monkeypatch.setenv(PROCESSES_ENV, str(processes))
    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, str(tmp_path / "volume"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    meta = train_step(windows, splits, str(tmp_path / "model"), stage=1, config=_config_text(tmp_path, epochs=1),
                      tracking_uri="", inputs=("uri-of-windows", "uri-of-splits"))
    assert meta["epochs_run"] == 1 and (tmp_path / "model" / "model.json").exists()
    (folder,) = (tmp_path / "volume").iterdir()
    assert folder.name.startswith("stage1-") and (folder / CHECKPOINT).exists()
    assert not (tmp_path / "model.checkpoints").exists(), "the checkpoint belongs on the volume, not beside the artifact"


def _command(tmp_path: Path, windows: str, splits: str, uri: str, out: str = "model") -> list[str]:
    (tmp_path / "config.yaml").write_text(_config_text(tmp_path))
    (tmp_path / "rank.py").write_text(_RANK_SCRIPT)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(tmp_path / "rank.py"),
            "train", "--stage", "1", "--windows", windows, "--splits", splits, "--out", str(tmp_path / "run" / out),
            "--config", str(tmp_path / "config.yaml"), "--resume", *(["--tracking-uri", uri] if uri else [])]


def _writes(tmp_path: Path, rank: int) -> list[str]:
    path = tmp_path / f"writes.{rank}"
    return path.read_text().split() if path.exists() else []


@pytest.mark.slow
def test_torchrun_on_two_ranks_writes_once_counts_globally_and_resumes_after_a_kill(tmp_path: Path, mlflow_server: str) -> None:
    windows, splits = write_toy_cohort(tmp_path / "toy", 32)
    command = _command(tmp_path, windows, splits, mlflow_server)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WATCHED": str(tmp_path / "run"), "WRITES": str(tmp_path / "writes")}
    ckpt = tmp_path / "run" / "model.checkpoints" / CHECKPOINT
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not ckpt.exists():  # the end of epoch 1
        assert first.poll() is None, f"training ended before it could be killed:\n{first.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 2 minutes"
        time.sleep(0.01)
    for process in [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]:
        process.send_signal(signal.SIGKILL)  # torchrun and both ranks (sessions of their own), as a node loss would
    killed_log = first.communicate()[0]
    assert not (tmp_path / "run" / "model").exists(), "the artifact appeared although the run was killed"
    assert {"rank 0 of 2", "rank 1 of 2"} <= set(re.findall(r"rank \d of \d", killed_log)), killed_log[-3000:]

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    resumed_from = re.findall(r"resuming after epoch (\d+)", log)
    assert len(resumed_from) == WORLD and len(set(resumed_from)) == 1, "every rank resumes from the same checkpoint"

    assert _writes(tmp_path, 0) and not _writes(tmp_path, 1), f"rank 1 wrote {_writes(tmp_path, 1)}"
    history = json.loads((tmp_path / "run" / "model" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert all(h["samples"] == WORLD * -(-SAMPLES // WORLD) for h in history), "samples: the epoch's, over all ranks"
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1, "one MLflow run: rank 0's, continued by the resumed run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))

    subprocess.run(_command(tmp_path, windows, splits, "", out="straight"), env=env, check=True, capture_output=True, timeout=180)
    a, b = (torch.load(tmp_path / "run" / out / "model.pt", weights_only=True) for out in ("model", "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"

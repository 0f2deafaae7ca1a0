"""Training: threshold and schedule maths, a toy task a small CBAMDRN must learn, the model artifact,
bad input named before any long work, and a run killed mid-epoch that resumes to the same weights."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from factories import write_splits, write_toy_cohort, write_windows

import pe_triage.training.train as train_module
from pe_triage import schema as S
from pe_triage.artifact import load_model, read_meta
from pe_triage.config import Config, LoaderConfig, ModelConfig, TrainConfig
from pe_triage.progress import MODE_ENV as PROGRESS_ENV
from pe_triage.stats import binary_rates, threshold_for_sensitivity
from pe_triage.training.train import CHECKPOINT, TrainingError, checkpoint_dir_for, lr_factor, train

SIZE = 32


def test_threshold_keeps_the_target_sensitivity_with_fewest_alarms() -> None:
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    targets = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    assert threshold_for_sensitivity(probs, targets, 1.0) == 0.3  # every positive kept
    assert threshold_for_sensitivity(probs, targets, 0.75) == 0.6  # 3 of 4
    assert threshold_for_sensitivity(probs, targets, 0.5) == 0.7
    assert threshold_for_sensitivity(probs, targets, 0.7) == 0.6  # ceil(2.8) = 3
    rates = binary_rates(probs, targets, 0.6)
    assert rates == {"sensitivity": 0.75, "specificity": 0.75, "accuracy": 0.75}
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity(probs, np.zeros(8, int), 0.9)


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    factors = [lr_factor(s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] < 0.01 and lr_factor(100, 100, 10) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return write_toy_cohort(tmp_path_factory.mktemp("toy"), SIZE)


def _config(tmp_path: Path, **train: object) -> Config:
    base = TrainConfig(windows=("vascular", "lung"), epochs=3, batch_size=8, lr=6e-3, num_workers=0, samples_per_epoch=48,
                       warmup_epochs=0.5, patience=0)
    return Config(
        model=ModelConfig(arch="cbam_drn_d_22", width=0.125),
        loader=LoaderConfig(cache_dir=str(tmp_path / "cache"), augment=False),
        train=replace(base, **train),  # type: ignore[arg-type]
    )


def test_indeterminate_slices_are_left_out_of_training_and_counted_in_the_artifact(tmp_path: Path) -> None:
    windows, splits = write_toy_cohort(tmp_path, SIZE)
    write_windows(Path(windows), {("site-a", "px"): ["wnl", "indeterminate", "indeterminate"]}, size=SIZE)
    extra = pa.table({S.FOLD: [S.DEFAULT_FOLD], S.SITE: ["site-a"], S.PATIENT_ID: ["px"], S.PATIENT_CLASS: ["wnl"],
                      S.SPLIT: ["train"]}, schema=S.SPLITS_SCHEMA)
    pq.write_table(pa.concat_tables([pq.read_table(splits), extra]), splits)
    meta = train(windows, splits, str(tmp_path / "model"), stage=1, config=_config(tmp_path, epochs=1))
    assert meta["data"]["excluded_indeterminate"] == {"train": 2, "val": 0}
    assert meta["data"]["train_slices"] == {"wnl": 25, "disease": 36}


@pytest.mark.parametrize("stage", [1, 2])
def test_a_small_cbamdrn_learns_the_toy_task_and_writes_a_complete_artifact(toy: tuple[str, str], tmp_path: Path,
                                                                            stage: int) -> None:
    windows, splits = toy
    meta = train(windows, splits, str(tmp_path / "model"), stage=stage, config=_config(tmp_path, epochs=10))
    assert meta["val"]["auroc"] >= 0.9, meta["val"]
    assert meta["val"]["sensitivity"] >= 0.95
    stored = read_meta(tmp_path / "model")
    assert stored["stage"] == stage and stored["threshold"] == meta["threshold"]
    assert [w["name"] for w in stored["windows"]] == ["vascular", "lung"]
    assert stored["data"]["windows_digest"] and stored["data"]["sites"] == ["site-a", "site-b"]
    assert stored["data"]["train_slices"] == ({"wnl": 24, "disease": 36} if stage == 1 else {"other": 18, "pe": 18})
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 11))
    loaded = load_model(tmp_path / "model")
    x = np.zeros((2, 2, SIZE, SIZE), np.uint8)
    assert loaded.predict_proba(x).shape == (2,)
    assert (checkpoint_dir_for(tmp_path / "model") / CHECKPOINT).is_file()


def _tube_or_ball_cohort(root: Path) -> tuple[str, str]:
    """Stage 2 that one slice cannot decide: every lesion slice shows the same bright square with a
    dark hole. In PE patients it persists over 6 slices (a clot along a vessel), in the others each
    one stands alone between clear slices (a ball). 12 train, 24 val patients of 12 slices (many
    patients: one slice's model scores at chance, and chance varies less over many)."""
    rng = np.random.default_rng(3)
    series, images, assignment = {}, {}, {}
    for p in range(36):
        pe = p % 2 == 0
        labels: list[str | None] = ["wnl"] * 12
        lesion = list(range(3, 9)) if pe else [2, 6, 10]
        stack = rng.integers(60, 100, (12, 3, SIZE, SIZE), dtype=np.uint8)
        y, x = rng.integers(4, SIZE - 12, 2)
        for z in lesion:
            labels[z] = "pe" if pe else "other"
            stack[z, 0, y : y + 8, x : x + 8] = 230
            stack[z, 0, y + 2 : y + 6, x + 2 : x + 6] = 20
        key = ("site-a", f"p{p}")
        series[key], images[key], assignment[key] = labels, stack, "train" if p < 12 else "val"
    write_windows(root / "windows", series, size=SIZE, images=images)
    return str(root / "windows"), str(write_splits(root / "splits.parquet", assignment))


def test_neighbouring_slices_tell_a_clot_from_a_ball_where_one_slice_cannot(tmp_path: Path) -> None:
    windows, splits = _tube_or_ball_cohort(tmp_path)
    auroc = {}
    for context in (0, 1):
        config = replace(_config(tmp_path, epochs=8), model=ModelConfig(arch="cbam_drn_d_22", width=0.125, context=context))
        meta = train(windows, splits, str(tmp_path / f"m{context}"), stage=2, config=config)
        auroc[context] = meta["val"]["auroc"]
    assert auroc[1] >= 0.95, auroc  # separable from the neighbours (1.0 on 1 and 2 threads, seeds 0-2)
    assert auroc[0] <= 0.85, auroc  # the same pixels in both classes: chance, whatever it learnt
    loaded = load_model(tmp_path / "m1")
    assert loaded.meta.model.context == 1 and loaded.model.slices_per_window == 3
    assert loaded.predict_proba(np.zeros((2, 6, SIZE, SIZE), np.uint8)).shape == (2,)


def test_bad_input_is_named_before_training(toy: tuple[str, str], tmp_path: Path) -> None:
    windows, splits = toy
    out = str(tmp_path / "m")
    with pytest.raises(TrainingError, match=r"unknown window\(s\) \['bone'\]"):
        train(windows, splits, out, stage=1, config=_config(tmp_path, windows=("vascular", "bone")))
    one_class = write_splits(tmp_path / "s1.parquet", {("site-a", "p1"): "train", ("site-b", "p2"): "val"})
    write_windows(tmp_path / "w1", {("site-a", "p1"): ["wnl", "pe"], ("site-b", "p2"): ["wnl", "wnl"]}, size=SIZE)
    with pytest.raises(TrainingError, match=r"val split of stage 1 has a single class"):
        train(str(tmp_path / "w1"), str(one_class), out, stage=1, config=_config(tmp_path))
    no_val = write_splits(tmp_path / "s2.parquet", {("site-a", "p1"): "train", ("site-b", "p2"): "test"})
    with pytest.raises(TrainingError, match=r"no slices for split 'val'"):
        train(str(tmp_path / "w1"), str(no_val), out, stage=1, config=_config(tmp_path))
    assert not Path(out).exists()


def test_resume_refuses_a_checkpoint_of_another_architecture(toy: tuple[str, str], tmp_path: Path) -> None:
    windows, splits = toy
    out = str(tmp_path / "m")
    train(windows, splits, out, stage=1, config=_config(tmp_path, epochs=1))
    other = replace(_config(tmp_path, epochs=2), model=ModelConfig(arch="drn_d_22", width=0.125))
    with pytest.raises(TrainingError, match=r"another run .*model: checkpoint .*cbam_drn_d_22"):
        train(windows, splits, out, stage=1, config=other, resume=True)
    with pytest.raises(TrainingError, match=r"another run .*stage: checkpoint 1, this run 2"):
        train(windows, splits, out, stage=2, config=_config(tmp_path, epochs=2), resume=True)


class _Hostile:
    """Unpickling this creates ``marker``: what a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_a_hostile_checkpoint_is_refused_and_never_runs(toy: tuple[str, str], tmp_path: Path) -> None:
    windows, splits = toy
    out, marker = tmp_path / "m", tmp_path / "pwned"
    ckpt = checkpoint_dir_for(out) / CHECKPOINT
    ckpt.parent.mkdir(parents=True)
    torch.save({"identity": {}, "payload": _Hostile(marker)}, ckpt)
    with pytest.raises(TrainingError) as refused:  # no sidecar: not even opened
        train(windows, splits, str(out), stage=1, config=_config(tmp_path, epochs=1), resume=True)
    assert not marker.exists(), "the checkpoint's pickle ran"
    assert refused.match(r"no run identity .*last\.json.*delete")
    ckpt.unlink()
    train(windows, splits, str(out), stage=1, config=_config(tmp_path, epochs=1))  # a genuine pair: last.pt + last.json
    torch.save({"identity": {}, "payload": _Hostile(marker)}, ckpt)
    with pytest.raises(TrainingError, match=r"another run .*stage: checkpoint 1, this run 2"):  # sidecar checked first
        train(windows, splits, str(out), stage=2, config=_config(tmp_path, epochs=2), resume=True)
    with pytest.raises(TrainingError, match=r"cannot be loaded safely"):  # right identity, hostile content
        train(windows, splits, str(out), stage=1, config=_config(tmp_path, epochs=2), resume=True)
    assert not marker.exists()
    ckpt.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(TrainingError, match=r"cannot be loaded safely"):
        train(windows, splits, str(out), stage=1, config=_config(tmp_path, epochs=2), resume=True)


def test_a_genuine_checkpoint_resumes(toy: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    windows, splits = toy
    out = str(tmp_path / "m")
    train(windows, splits, out, stage=1, config=_config(tmp_path, epochs=1))
    sidecar = json.loads((checkpoint_dir_for(out) / "last.json").read_text())
    assert sidecar["identity"]["stage"] == 1
    with caplog.at_level("INFO", logger="pe_triage"):
        meta = train(windows, splits, out, stage=1, config=_config(tmp_path, epochs=2), resume=True)
    assert "resuming after epoch 1" in caplog.text
    assert meta["epochs_run"] == 2 and len(json.loads((Path(out) / "history.json").read_text())) == 2
    assert torch.load(checkpoint_dir_for(out) / CHECKPOINT, weights_only=True)["epoch"] == 2


def test_a_spent_time_budget_ends_the_epoch_where_it_is_validated_checkpointed_and_kept(
        toy: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The budget is checked after every batch, not between epochs: on a clock that moves 10 s per
    reading, a 30 s budget ends the first epoch after 3 of its 6 batches, and that partial epoch is
    validated, checkpointed and selected like any other."""
    windows, splits = toy
    monkeypatch.setattr(train_module, "_clock", itertools.count(0.0, 10.0).__next__)
    out = tmp_path / "m"
    with caplog.at_level("INFO", logger="pe_triage"):
        meta = train(windows, splits, str(out), stage=1, config=_config(tmp_path, epochs=3, max_minutes=0.5))
    history = json.loads((out / "history.json").read_text())
    assert [(h["epoch"], h["samples"]) for h in history] == [(1, 24)]  # 3 batches of 8, of 48
    assert meta["epochs_run"] == 1 and meta["best_epoch"] == 1 and meta["out_of_time"] is True
    assert meta["val"]["auroc"] == history[0]["val_auroc"]  # the selected model is the validated one
    assert torch.load(checkpoint_dir_for(out) / CHECKPOINT, weights_only=True)["epoch"] == 1
    assert "time budget of 0.5 min spent after 24 of 48 samples of epoch 1" in caplog.text


def test_the_budget_keeps_back_the_time_of_the_closing_validation(
        toy: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A validation that takes 50 s of a 180 s budget (the clock moves 1 s per reading): training stops
    early enough for its last epoch's validation to end within the budget, and the threshold is
    set on that validation's probabilities rather than on a second pass."""
    windows, splits = toy
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    validate, validations = train_module._evaluate, []

    def slow_validation(*args: object, **kw: object) -> tuple[np.ndarray, float]:
        now[0] += 50.0
        validations.append(now[0])
        return validate(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "_clock", clock)
    monkeypatch.setattr(train_module, "_evaluate", slow_validation)
    meta = train(windows, splits, str(tmp_path / "m"), stage=1, config=_config(tmp_path, epochs=10, max_minutes=3))
    assert meta["out_of_time"] is True and 2 <= meta["epochs_run"] < 10
    assert len(validations) == meta["epochs_run"], "the best epoch was validated a second time"
    assert now[0] <= 180 + 1, f"the budget ended at {now[0]:.0f} s of 180"


def test_each_epoch_logs_one_summary_line_and_the_samples_show_progress(
        toy: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "log")
    windows, splits = toy
    with caplog.at_level("INFO", logger="pe_triage"):
        meta = train(windows, splits, str(tmp_path / "m"), stage=2, config=_config(tmp_path, epochs=2))
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 2 and meta["out_of_time"] is False
    for n, line in enumerate(epochs, 1):
        assert re.fullmatch(rf"epoch {n}/2: loss \d+\.\d{{3}}, val AUROC (\d\.\d{{3}}|n/a), \d+ img/s", line), line
    assert any(re.match(r"train stage 2: 96 img in [\d.]+ s", r.getMessage()) for r in caplog.records)


_CHILD = """
import sys
from pathlib import Path
from dataclasses import replace
sys.path[:0] = {paths!r}  # this file's folder and tests/ (factories), as pytest's pythonpath has them
from test_train import _config
from pe_triage.training.train import train
cfg = _config(Path({tmp!r}), epochs=4, samples_per_epoch=160)
train({windows!r}, {splits!r}, {out!r}, stage=1, config=cfg, resume=True)
"""


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(toy: tuple[str, str], tmp_path: Path) -> None:
    windows, splits = toy
    out = tmp_path / "killed"
    ckpt = checkpoint_dir_for(out) / CHECKPOINT
    here = Path(__file__).resolve().parent
    code = _CHILD.format(paths=[str(here), str(here.parent)], tmp=str(tmp_path), windows=windows, splits=splits, out=str(out))
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 600
    while not ckpt.exists():  # the end of epoch 1
        assert child.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)  # into epoch 2
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists(), "the artifact appeared although the run was killed"
    assert torch.load(ckpt, weights_only=True)["epoch"] in (1, 2)
    resumed = subprocess.run([sys.executable, "-c", code], check=True)
    assert resumed.returncode == 0
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-c", code.replace(repr(str(out)), repr(str(straight)))], check=True)
    a = torch.load(out / "model.pt", weights_only=True)
    b = torch.load(straight / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert json.loads((out / "history.json").read_text()) != [] and read_meta(out)["epochs_run"] == 4
    h_resumed = [h["val_auroc"] for h in json.loads((out / "history.json").read_text())]
    h_straight = [h["val_auroc"] for h in json.loads((straight / "history.json").read_text())]
    assert h_resumed == h_straight

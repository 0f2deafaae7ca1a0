"""Train one stage: stage 1 on every labelled slice (WNL vs disease), stage 2 on disease slices (PE vs other).

Preemption-safe and reproducible: every epoch ends with an atomic checkpoint (model, optimiser,
schedule, early-stopping state, best weights, history, MLflow run id), and every epoch's randomness
(sampling order, augmentation, loader workers) is seeded from ``(seed, epoch)`` alone, so a run
resumed after a kill ends with exactly the weights of an uninterrupted run (on CPU; GPU kernels are
not bitwise deterministic).

On GPU: bf16 autocast, channels_last, pinned memory with non-blocking copies, loader workers, and
DistributedDataParallel over every GPU of the node when launched with ``torchrun`` (NCCL; gloo
between CPU processes): each rank takes an equal share of the same seeded sample sequence, the
validation answer is rank 0's, the logged loss and throughput are over all ranks, and rank 0 alone
writes checkpoints, the artifact and MLflow. The same code runs unchanged on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from pe_triage import schema as S
from pe_triage.artifact import ArtifactError, load_tensors, save_model
from pe_triage.config import Config, TrainConfig, to_dict
from pe_triage.dataset import WindowsDataset, balanced_sampler
from pe_triage.models import build_model, parameter_count
from pe_triage.parallel import cpu_share
from pe_triage.progress import Progress as Bar
from pe_triage.progress import progress as progress_bar
from pe_triage.provenance import config_hash, dataset_digest, file_digest, git_commit, package_version
from pe_triage.stats import auroc, binary_rates, threshold_for_sensitivity
from pe_triage.storage import atomic_path, location
from pe_triage.tracking import NullTracker, start_run

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
#: beside ``CHECKPOINT``: the run it belongs to, read (as JSON) before the checkpoint is opened
CHECKPOINT_IDENTITY = "last.json"
CHECKPOINT_FORMAT = "pe-triage-checkpoint/2"
#: the clock of the time budget (a test's to replace: budgets are asserted on samples, not on wall time)
_clock = time.monotonic


class TrainingError(ValueError):
    """The inputs or the configuration cannot give a meaningful training run; raised before any long work."""


# ------------------------------------------------------------------------------------ pure helpers
def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class _RankShare(Sampler[int]):
    """Every rank draws the same seeded sequence and takes every ``world``-th index from ``rank``; the
    sequence is topped up from its start to a multiple of ``world``, so every rank takes as many
    batches (one rank's extra batch would leave it waiting in an all-reduce the others never join)."""

    def __init__(self, base: Sampler[int], rank: int, world: int) -> None:
        self.base, self.rank, self.world = base, rank, world

    def __iter__(self) -> Iterator[int]:
        drawn, needed = list(self.base), len(self) * self.world
        drawn = (drawn * -(-needed // max(1, len(drawn))))[:needed]
        return iter(drawn[self.rank :: self.world])

    def __len__(self) -> int:
        return -(-len(self.base) // self.world)  # type: ignore[arg-type]


class _Shuffle(Sampler[int]):
    """A seeded permutation of ``n`` (``num_samples`` drawn, cycling when it exceeds ``n``)."""

    def __init__(self, n: int, num_samples: int, seed: int) -> None:
        self.n, self.num_samples, self.seed = n, num_samples, seed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        reps = -(-self.num_samples // self.n)
        return iter(torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


# ------------------------------------------------------------------------------------ setup and checks
def check_train_config(cfg: TrainConfig) -> None:
    if not 0 < cfg.target_sensitivity <= 1:
        raise TrainingError(f"train.target_sensitivity {cfg.target_sensitivity}: expected a value in (0, 1]")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise TrainingError("train.epochs, train.batch_size and train.lr must be positive")
    if not cfg.windows:
        raise TrainingError("train.windows is empty: name the windows the model takes (e.g. [vascular, lung])")
    if cfg.threads < 0 or cfg.side_by_side < 1:
        raise TrainingError(f"train.threads must be >= 0 (0: derived) and train.side_by_side >= 1, got {cfg.threads} "
                            f"and {cfg.side_by_side}")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise TrainingError(f"train.max_minutes {cfg.max_minutes}: expected a positive budget (or null for none)")


def training_threads(cfg: TrainConfig, cpus: int | None = None) -> int:
    """Intra-op threads of one training process: ``train.threads``, else its share of ``cpus`` (default:
    the CPUs it may use) among the steps side by side and the ranks ``torchrun`` started on this node,
    at most ``OMP_NUM_THREADS`` when the environment sets it (an operator's explicit cap)."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return cfg.threads or cpu_share(cfg.side_by_side * ranks, cpus)


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """torch's intra-op threads set to ``n`` for a block, and restored after it (a library call must
    not leave its caller's process changed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def _check_classes(ds: WindowsDataset, what: str) -> None:
    counts = ds.class_counts()
    if min(counts.values()) == 0:
        raise TrainingError(f"{what} split of stage {ds.stage} has a single class {_named_counts(ds)}: cannot train or validate")


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("train.device is cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun, its process group joined: NCCL between GPUs, gloo
    between CPU processes (also on a GPU node told ``train.device: cpu``); (0, 1, device) otherwise."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1:
        log.info("rank %d of %d on %s (%s)", rank, world, device, dist.get_backend())
    return rank, world, device


def checkpoint_dir_for(out: str | Path) -> Path:
    """Checkpoints live beside the artifact, so a retried step (same output path) finds them."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def _identity(stage: int, config: Config, windows_digest: str, splits_digest: str, fold: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: same stage, model, windows and data (as JSON
    reads it back, so the sidecar compares equal)."""
    return dict(json.loads(json.dumps({
        "stage": stage,
        "model": to_dict(config.model),
        "windows": list(config.train.windows),
        "windows_digest": windows_digest,
        "splits_digest": splits_digest,
        "fold": fold,
        "seed": config.train.seed,
    })))


def _check_identity(path: Path, theirs: Any, identity: dict[str, Any]) -> None:
    theirs = theirs if isinstance(theirs, dict) else {}
    diffs = [k for k in identity if theirs.get(k) != identity[k]]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, this run {identity[k]!r}" for k in diffs)
        raise TrainingError(f"checkpoint {path} is from another run and cannot be resumed ({detail})")


def _load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """This run's checkpoint at ``path``, or a refusal. Whoever can write the checkpoint folder must
    not run code here: the run identity is read from the JSON sidecar before ``path`` is opened, and
    ``path`` is loaded with ``weights_only=True``. Refused rather than started afresh: a silent
    restart would hide a wrong ``--out`` or a tampered folder (deleting the folder starts afresh)."""
    sidecar, fix = path.with_name(CHECKPOINT_IDENTITY), f"delete {path.parent} to start afresh"
    try:
        recorded = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {path} has no run identity ({CHECKPOINT_IDENTITY} beside it): not resumed; "
                            f"{fix}") from None
    except ValueError:
        raise TrainingError(f"checkpoint identity {sidecar} is not valid JSON: not resumed; {fix}") from None
    if not isinstance(recorded, dict) or recorded.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"checkpoint identity {sidecar} is not of format {CHECKPOINT_FORMAT!r}: not resumed; {fix}")
    _check_identity(path, recorded.get("identity"), identity)
    try:
        ckpt = load_tensors(path)
    except ArtifactError as e:
        raise TrainingError(f"checkpoint cannot be loaded safely: {e}; {fix}") from None
    if not isinstance(ckpt, dict):
        raise TrainingError(f"checkpoint {path} is not a pe-triage checkpoint: not resumed; {fix}")
    _check_identity(path, ckpt.get("identity"), identity)  # a kill between the two writes can pair two runs
    return ckpt


# ------------------------------------------------------------------------------------ the loop
def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> tuple[np.ndarray, float]:
    """Validation probabilities in dataset order and the mean loss. On CPU on one thread: with the
    cache-sized batches of ``_Run.val_batch`` one thread outruns two at the training batch, and never
    waits on a thread that another job's process has displaced (benchmarks/evaluate.py)."""
    model.eval()
    probs, total, n = [], 0.0, 0
    one_thread = torch_threads(1) if device.type == "cpu" else nullcontext(0)
    with one_thread, torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)[:, 0].float()
            total += F.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum").item()
            n += len(y)
            probs.append(torch.sigmoid(logits).cpu().numpy())
    return np.concatenate(probs), total / max(1, n)


def train(
    windows: str,
    splits: str,
    out: str,
    *,
    stage: int,
    config: Config = Config(),
    fold: str = S.DEFAULT_FOLD,
    resume: bool = False,
    tracking_uri: str | None = None,
    checkpoint_dir: str | None = None,
) -> dict[str, Any]:
    """Train stage ``stage`` on the ``train`` split, select on ``val``; write the model artifact to ``out``.

    ``resume`` continues from the last checkpoint when one exists (an absent one starts afresh; a
    checkpoint of another stage, architecture, window set or dataset, one without its identity
    sidecar, or one holding more than tensors and plain values is an error). Returns the summary also
    stored in the artifact's metadata; under ``torchrun``, on rank 0 only (the others return ``{}``).
    """
    cfg = config.train
    check_train_config(cfg)
    if stage not in S.STAGES:
        raise TrainingError(f"stage must be 1 or 2, got {stage!r}")
    rank, world, device = _distributed(cfg)
    # Activations of mostly-air CT inputs decay into denormal floats, which x86 CPUs process ~5x slower
    torch.set_flush_denormal(True)
    cuda = device.type == "cuda"
    amp = cuda and cfg.amp
    windows_digest, splits_digest = dataset_digest(windows), file_digest(splits)
    identity = _identity(stage, config, windows_digest, splits_digest, fold)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else checkpoint_dir_for(out)
    ckpt_path = ckpt_dir / CHECKPOINT
    state = _load_checkpoint(ckpt_path, identity) if resume and ckpt_path.exists() else None

    loader_cfg = config.loader
    try:
        context = config.model.context
        train_ds = WindowsDataset(windows, splits, split="train", stage=stage, windows_used=cfg.windows, fold=fold,
                                  config=loader_cfg, train=True, context=context)
        val_ds = WindowsDataset(windows, splits, split="val", stage=stage, windows_used=cfg.windows, fold=fold, config=loader_cfg,
                                context=context)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    with train_ds, val_ds:
        _check_classes(train_ds, "train")
        _check_classes(val_ds, "val")
        run = _Run(stage=stage, config=config, fold=fold, train_ds=train_ds, val_ds=val_ds, device=device, amp=amp,
                   rank=rank, world=world, identity=identity, ckpt_path=ckpt_path, out=out)
        data = {"windows_digest": windows_digest, "splits_digest": splits_digest, "fold": fold,
                "slices_digest": _slices_digest(windows),
                "sites": sorted(set(train_ds.index[S.SITE]) | set(val_ds.index[S.SITE])),
                "train_slices": _named_counts(train_ds), "val_slices": _named_counts(val_ds),
                "excluded_indeterminate": {"train": train_ds.excluded_indeterminate, "val": val_ds.excluded_indeterminate},
                "preprocess": _preprocess_meta(windows)}
        with torch_threads(training_threads(cfg)) as threads:
            log.info("stage %d: %d torch threads (train.threads %d, side by side %d)", stage, threads, cfg.threads,
                     cfg.side_by_side)
            return _fit(run, state, tracking_uri, data)


def _named_counts(ds: WindowsDataset) -> dict[str, int]:
    counts, stage = ds.class_counts(), S.STAGES[ds.stage]
    return {stage.negative_name: counts[0], stage.positive_name: counts[1]}


def _slices_digest(windows: str) -> str | None:
    """The digest of the slices store the windows were made from (preprocess's report; None for windows
    made otherwise): the lineage the retraining trigger compares the store with."""
    loc = location(windows)
    path = loc.join("_reports", "preprocess_report.json")
    return json.loads(loc.read(path)).get("slices_digest") if loc.exists(path) else None


def _preprocess_meta(windows: str) -> dict[str, Any]:
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    first = min(pads.dataset(windows, format="parquet", partitioning="hive").files)
    raw = (pq.ParquetFile(first).schema_arrow.metadata or {}).get(S.META_PREPROCESS.encode(), b"{}")
    return dict(json.loads(raw))


# ------------------------------------------------------------------------------------ one run
@dataclass(frozen=True)
class _Run:
    """What a training run is given: the data, the configuration, where it runs and what it writes."""

    stage: int
    config: Config
    fold: str
    train_ds: WindowsDataset
    val_ds: WindowsDataset
    device: torch.device
    amp: bool
    rank: int
    world: int
    #: what the checkpoint must match to be resumed
    identity: dict[str, Any]
    ckpt_path: Path
    out: str

    @property
    def cfg(self) -> TrainConfig:
        return self.config.train

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda" and self.cfg.channels_last

    @property
    def samples(self) -> int:
        """Samples drawn per epoch over all ranks: each rank takes ``ceil(samples / world)`` of one
        seeded sequence (``_RankShare``), so under ``torchrun`` an epoch is as long as on one process."""
        return self.cfg.samples_per_epoch or len(self.train_ds)

    def loader_kw(self, batch_size: int | None = None) -> dict[str, Any]:
        workers = self.cfg.num_workers
        return {"batch_size": batch_size or self.cfg.batch_size, "num_workers": workers,
                "pin_memory": self.device.type == "cuda", "persistent_workers": False,
                **({"prefetch_factor": 4} if workers else {})}

    @property
    def val_batch(self) -> int:
        """Validation images per batch: ``evaluate.batch_pixels`` worth on CPU (cache-sized), the
        training batch on CUDA."""
        if self.device.type == "cuda":
            return self.cfg.batch_size
        height, width = self.val_ds.shape[-2:]
        return max(1, self.config.evaluate.batch_pixels // (height * width))


@dataclass(frozen=True)
class _Net:
    """The model and what steps it: ``net`` is ``model`` itself, or its DDP wrapper over several ranks."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    pos_weight: torch.Tensor | None


@dataclass
class _Progress:
    """The early-stopping state and history; with the model, optimiser and schedule, what a checkpoint holds."""

    epoch: int = 0
    best: float = -math.inf
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None
    #: this process spent ``train.max_minutes`` (not checkpointed: a resumed run has a budget of its own)
    out_of_time: bool = False
    #: the best epoch's validation probabilities: the threshold is set on them without validating again
    best_probs: np.ndarray | None = None
    #: how long the last validation took (``_clock`` seconds): what the time budget keeps for the next
    val_seconds: float | None = None

    def record(self, val_auroc: float | None, model: nn.Module, probs: np.ndarray) -> bool:
        """Count an epoch's validation AUROC; keep a copy of the weights (and their validation
        probabilities) when it is the best so far."""
        score = -math.inf if val_auroc is None else val_auroc
        if score > self.best:
            self.best, self.stale = score, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self.best_probs = probs.copy()
            return True
        self.stale += 1
        return False


def _build(run: _Run) -> _Net:
    """The model at the run's seed, its optimiser and its warm-up + cosine schedule."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed)
    model = build_model(run.config.model, len(cfg.windows)).to(device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's overloads omit it
    cuda = device.type == "cuda"
    net: nn.Module = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if run.world > 1
                      else model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-run.samples // (cfg.batch_size * run.world))
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, max(1, int(cfg.warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    counts = run.train_ds.class_counts()
    pos_weight = torch.tensor(counts[0] / counts[1], device=device) if cfg.imbalance == "weight" else None
    return _Net(model, net, optimizer, schedule, pos_weight)


def _resume(run: _Run, net: _Net, state: dict[str, Any] | None) -> _Progress:
    """A fresh start, or the checkpoint's weights, optimiser, schedule and progress restored."""
    if state is None:
        return _Progress()
    net.model.load_state_dict(state["model"])
    net.optimizer.load_state_dict(state["optimizer"])
    net.schedule.load_state_dict(state["schedule"])
    best_probs = state.get("best_probs")
    progress = _Progress(state["epoch"], state["best"], state["best_state"], state["stale"], state["history"], state["run_id"],
                         best_probs=None if best_probs is None else best_probs.numpy())
    log.info("stage %d: resuming after epoch %d (best val AUROC %.4f)", run.stage, progress.epoch, progress.best)
    return progress


def _check_same_start(run: _Run, progress: _Progress) -> None:
    """Refuse ranks that start from different epochs (a checkpoint folder not shared by every rank)."""
    if run.world == 1:
        return
    epochs = torch.tensor([progress.epoch, -progress.epoch], device=run.device)
    dist.all_reduce(epochs, op=dist.ReduceOp.MAX)
    if int(epochs[0]) != -int(epochs[1]):
        raise TrainingError(f"ranks start after different epochs ({-int(epochs[1])} to {int(epochs[0])}): every rank must "
                            f"see the checkpoint folder {run.ckpt_path.parent}")


def _save_checkpoint(run: _Run, net: _Net, progress: _Progress, run_id: str | None) -> None:
    """The identity sidecar, then the checkpoint (each atomic). In this order a kill between the two
    leaves this run's identity beside an older checkpoint of the same run (resumed from there), no
    checkpoint (a fresh start), or another run's checkpoint (refused by its own identity). Everything
    is tensors or plain values, as ``weights_only=True`` loads (history through JSON: numpy scalars
    are refused)."""
    run.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.ckpt_path.with_name(CHECKPOINT_IDENTITY)) as tmp:
        tmp.write_text(json.dumps({"format": CHECKPOINT_FORMAT, "identity": run.identity}, indent=2))
    with atomic_path(run.ckpt_path) as tmp:
        torch.save({"identity": run.identity, "model": net.model.state_dict(), "optimizer": net.optimizer.state_dict(),
                    "schedule": net.schedule.state_dict(), "epoch": progress.epoch, "best": float(progress.best),
                    "best_state": progress.best_state, "stale": progress.stale,
                    "best_probs": None if progress.best_probs is None else torch.from_numpy(progress.best_probs),
                    "history": json.loads(json.dumps(progress.history)), "run_id": run_id}, tmp)


def _fit(run: _Run, state: dict[str, Any] | None, tracking_uri: str | None, data: dict[str, Any]) -> dict[str, Any]:
    """Train epoch by epoch, checkpointing after each, then select the best epoch's weights (rank 0 only)."""
    stage = run.stage
    net = _build(run)
    progress = _resume(run, net, state)
    _check_same_start(run, progress)
    val_loader = DataLoader(run.val_ds, shuffle=False, **run.loader_kw(run.val_batch))
    deadline = None if run.cfg.max_minutes is None else _clock() + 60 * run.cfg.max_minutes
    tags = {"stage": stage, "fold": run.fold, "windows_digest": data["windows_digest"], "splits_digest": data["splits_digest"],
            "git_commit": git_commit(), "package_version": package_version(), "step": f"train-stage{stage}"}
    tracking = start_run(experiment=run.config.registry.experiment, run_name=f"train-stage{stage}", tags=tags,
                         uri=tracking_uri, run_id=progress.run_id) if run.rank == 0 else nullcontext(NullTracker())
    remaining = max(0, run.cfg.epochs - progress.epoch) * run.samples
    shown = progress_bar(remaining, f"train stage {stage}", unit="img", logger=log) if run.rank == 0 else nullcontext(None)
    with tracking as tracker:
        if state is None:
            tracker.log_params({"config": to_dict(run.config), "stage": stage, "fold": run.fold,
                                "parameters": parameter_count(net.model), "train_slices": json.dumps(data["train_slices"]),
                                "val_slices": json.dumps(data["val_slices"])})
        log.info("stage %d: %d train / %d val slices (indeterminate left out: %d / %d), %s on %s, %d parameters", stage,
                 len(run.train_ds), len(run.val_ds), run.train_ds.excluded_indeterminate, run.val_ds.excluded_indeterminate,
                 run.config.model.arch, run.device, parameter_count(net.model))
        with shown as bar:
            while _keep_going(run, progress, deadline):
                row = _epoch(run, net, progress, val_loader, _Steps(deadline, bar, progress.val_seconds))
                if run.rank == 0:
                    tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=progress.epoch)
                    _save_checkpoint(run, net, progress, tracker.run_id)
        if run.rank != 0:
            return {}
        return _finish(run, net, progress, val_loader, tracker, data)


def _keep_going(run: _Run, progress: _Progress, deadline: float | None) -> bool:
    """Another epoch, unless every epoch ran, patience ran out, or the time budget is spent (what is
    left of it would not cover the new epoch's validation)."""
    cfg = run.cfg
    if progress.out_of_time or progress.epoch >= cfg.epochs or (cfg.patience and progress.stale >= cfg.patience):
        return False
    if progress.val_seconds is not None and _out_of_time(run, deadline, progress.val_seconds):
        log.info("stage %d: time budget of %g min spent after epoch %d", run.stage, cfg.max_minutes, progress.epoch)
        progress.out_of_time = True
        return False
    return True


def _epoch_loader(run: _Run, epoch: int) -> DataLoader:
    """The epoch's samples in an order seeded from ``(seed, epoch)`` alone, so a resumed run draws the
    same; every rank shares the order and augments its own share from a seed of its own (ranks alike
    would augment in step)."""
    seed = _epoch_seed(run.cfg.seed, epoch)
    rank_seed = seed + (run.rank << 32)  # rank 0: the single-process seed
    torch.manual_seed(rank_seed)
    base: Sampler[int] = (balanced_sampler(run.train_ds, run.samples, seed=seed) if run.cfg.imbalance == "sampler"
                          else _Shuffle(len(run.train_ds), run.samples, seed))
    sampler = _RankShare(base, run.rank, run.world) if run.world > 1 else base
    return DataLoader(run.train_ds, sampler=sampler, drop_last=False, generator=torch.Generator().manual_seed(rank_seed),
                      **run.loader_kw())


@dataclass(frozen=True)
class _Steps:
    """What the steps of an epoch answer to besides the data: the time budget's end (``_clock`` time,
    None: no budget), the progress bar (None on ranks other than 0) and how long the last validation
    took (None before the first)."""

    deadline: float | None
    bar: Bar | None
    val_seconds: float | None


def _out_of_time(run: _Run, deadline: float | None, reserve: float = 0.0) -> bool:
    """Whether the budget is spent, ``reserve`` seconds (the closing validation) kept back; over several
    ranks, whether any rank's is (they stop at the same step)."""
    spent = deadline is not None and _clock() + reserve >= deadline
    if deadline is not None and run.world > 1:
        flag = torch.tensor([float(spent)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        spent = bool(flag.item())
    return spent


def _train_steps(run: _Run, net: _Net, loader: DataLoader, steps: _Steps) -> tuple[float, int, bool]:
    """One pass over ``loader``, cut short when the time budget is spent: the summed loss, the samples
    this rank saw and whether the budget ended the pass."""
    device = run.device
    memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
    net.net.train()
    loss_sum, seen, t0 = 0.0, 0, time.monotonic()
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.amp):
            logits = net.net(x)[:, 0].float()
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=net.pos_weight)
        net.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        net.optimizer.step()
        net.schedule.step()
        loss_sum += loss.item() * len(y)
        seen += len(y)
        if steps.bar is not None:
            steps.bar.update(len(y) * run.world, loss=loss_sum / seen)
        # before the first validation its time is estimated from training's: a validation image costs
        # about half a training image on CPU (benchmarks/evaluate.py and train.py: 80-180 against 60 img/s)
        reserve = steps.val_seconds if steps.val_seconds is not None else (
            len(run.val_ds) * (time.monotonic() - t0) / (2 * seen))
        if _out_of_time(run, steps.deadline, reserve):
            return loss_sum, seen, True
    return loss_sum, seen, False


def _summed(run: _Run, loss_sum: float, seen: int) -> tuple[float, int]:
    """The epoch's summed training loss and samples over every rank (this rank's alone on one process)."""
    if run.world == 1:
        return loss_sum, seen
    totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=run.device)
    dist.all_reduce(totals)
    return float(totals[0]), int(totals[1])


def _validate(run: _Run, model: nn.Module, loader: DataLoader) -> tuple[np.ndarray, float]:
    """Validation probabilities and loss: rank 0's, which every other rank receives rather than computes.
    DDP keeps the BatchNorm statistics of rank 0 only, so the ranks' own answers would differ and they
    would disagree on the best epoch and on early stopping (one rank stopping while others train on)."""
    if run.world == 1:
        return _evaluate(model, loader, run.device, run.amp)
    packed = torch.empty(len(run.val_ds) + 1, dtype=torch.float64, device=run.device)
    if run.rank == 0:
        probs, loss = _evaluate(model, loader, run.device, run.amp)
        packed.copy_(torch.from_numpy(np.append(probs.astype(np.float64), loss)))
    dist.broadcast(packed, 0)
    answer = packed.cpu().numpy()
    return answer[:-1].astype(np.float32), float(answer[-1])


def _epoch(run: _Run, net: _Net, progress: _Progress, val_loader: DataLoader, steps: _Steps) -> dict[str, Any]:
    """Train one epoch (or until the budget is spent), validate, count it towards early stopping;
    returns its history row."""
    loader = _epoch_loader(run, progress.epoch)
    t0 = time.monotonic()
    loss_sum, seen, progress.out_of_time = _train_steps(run, net, loader, steps)
    loss_sum, seen = _summed(run, loss_sum, seen)
    train_s = time.monotonic() - t0
    progress.epoch += 1
    if progress.out_of_time:
        log.info("stage %d: time budget of %g min spent after %d of %d samples of epoch %d: validating it and stopping",
                 run.stage, run.cfg.max_minutes, seen, run.samples, progress.epoch)
    started = _clock()
    probs, val_loss = _validate(run, net.model, val_loader)
    progress.val_seconds = _clock() - started
    val_auroc = auroc(run.val_ds.targets, probs)
    improved = progress.record(val_auroc, net.model, probs)
    row = {"epoch": progress.epoch, "train_loss": loss_sum / max(1, seen), "val_loss": val_loss, "val_auroc": val_auroc,
           "lr": net.schedule.get_last_lr()[0], "train_images_per_s": seen / train_s, "samples": seen,
           "epoch_s": time.monotonic() - t0}
    progress.history.append(row)
    # the form the demo console relays (lines starting "epoch "), once per run; the rest of the row is in MLflow and history.json
    if run.rank == 0:
        log.info("epoch %d/%d: loss %.3f, val AUROC %s, %.0f img/s", progress.epoch, run.cfg.epochs, row["train_loss"],
                 "n/a" if val_auroc is None else f"{val_auroc:.3f}", row["train_images_per_s"])
    log.debug("stage %d epoch %d: val loss %.4f%s", run.stage, progress.epoch, val_loss, " (best so far)" if improved else "")
    return row


def _finish(run: _Run, net: _Net, progress: _Progress, val_loader: DataLoader, tracker: NullTracker,
            data: dict[str, Any]) -> dict[str, Any]:
    """Restore the best epoch's weights, set the threshold on validation, write and log the artifact."""
    stage, cfg, val_ds, model = run.stage, run.cfg, run.val_ds, net.model
    if progress.best_state is None:
        raise TrainingError(f"stage {stage}: validation AUROC was never defined; no model selected")
    model.load_state_dict(progress.best_state)
    # validated when it was the best epoch (a checkpoint of an older version did not keep them)
    probs = progress.best_probs if progress.best_probs is not None else _evaluate(model, val_loader, run.device, run.amp)[0]
    threshold = threshold_for_sensitivity(probs, val_ds.targets, cfg.target_sensitivity)
    val = {"auroc": auroc(val_ds.targets, probs), **binary_rates(probs, val_ds.targets, threshold),
           "slices": len(val_ds), "positives": int(val_ds.targets.sum())}
    meta = {
        "stage": stage,
        "positive_class": S.STAGES[stage].positive_name,
        "model": to_dict(run.config.model),
        "parameters": parameter_count(model),
        "windows": run.train_ds.window_defs,
        "preprocess": data.pop("preprocess"),
        "threshold": threshold,
        "target_sensitivity": cfg.target_sensitivity,
        "val": val,
        "best_epoch": int(np.argmax([h["val_auroc"] if h["val_auroc"] is not None else -1 for h in progress.history])) + 1,
        "epochs_run": progress.epoch,
        # the time budget ended training (the last epoch may be partial: its "samples" in the history)
        "out_of_time": progress.out_of_time,
        "threads": torch.get_num_threads(),  # what the img/s in the history ran on
        "train": to_dict(cfg),
        "data": data,
        "package_version": package_version(),
        "git_commit": git_commit(),
        "config_hash": config_hash(to_dict(run.config)),
        "mlflow_run_id": tracker.run_id,
    }
    save_model(run.out, model.cpu(), meta, progress.history)
    tracker.log_metrics({f"val_{k}": v for k, v in val.items() if isinstance(v, float)} | {"threshold": threshold})
    tracker.set_tags({"threshold": f"{threshold:.6f}", "best_epoch": meta["best_epoch"]})
    tracker.log_artifacts(run.out, "model")
    tracker.log_artifact(run.ckpt_path, "checkpoint")
    tracker.log_artifact(run.ckpt_path.with_name(CHECKPOINT_IDENTITY), "checkpoint")
    log.info("stage %d: best epoch %d, val AUROC %.4f; threshold %.4f for sensitivity %.2f (specificity %.3f) -> %s",
             stage, meta["best_epoch"], val["auroc"], threshold, val["sensitivity"], val["specificity"], run.out)
    return meta

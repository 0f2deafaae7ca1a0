"""Training the exam-level model (``models.exam``) on the frozen slice models' features.

Every slice of the train and validation patients is embedded once by both calibrated stage models
(frozen: fine-tuning them end to end is out of scope), on one torch thread per worker as the
evaluation scores (``evaluation.scoring.score_slices``). An exam is a patient's slices in z order (series,
then slice index; a patient's series follow each other). Its labels are the project's patient
truth (``schema.patient_class``): disease when the patient is ``other`` or ``pe``, PE when ``pe``;
patients whose truth is indeterminate train no exam label (their slices still train slice labels).
Early stopping on the validation loss. The thresholds written here keep
``operating_point.patient_*_sensitivity`` of the validation exams per output;
``evaluation.exam.calibrate_exam`` then sets the pair jointly, as ``calibrate`` does for the rules.
"""

from __future__ import annotations

import copy
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pe_triage import schema as S
from pe_triage.artifact import StageModel, load_model
from pe_triage.config import Config, ExamConfig, ExamFeatures, to_dict
from pe_triage.dataset import WindowsDataset
from pe_triage.models import parameter_count
from pe_triage.models.exam import OUTPUTS, ExamNet, pad_sequences, save_exam_model, slice_features
from pe_triage.parallel import cpu_share
from pe_triage.provenance import file_digest, git_commit, package_version
from pe_triage.stats import auroc, threshold_for_sensitivity
from pe_triage.tracking import start_run
from pe_triage.training.train import TrainingError, torch_threads
from pe_triage.windows import uint8_to_centred, window_channels

log = logging.getLogger(__name__)

#: slices a worker embeds at a time (as ``evaluation.scoring.SCORE_CHUNK``)
EMBED_CHUNK = 32
#: batch of one forward pass: 64 images of 128 px stay within a core's cache-friendly size
EMBED_BATCH = 64


@dataclass
class Exams:
    """The exams of one split: ``keys`` (site, patient_id), per-exam feature ``sequences`` ``[T, D]``,
    ``truth`` (patient class), ``targets`` ``[N, 2]`` (NaN: no exam label) and per-slice
    ``slice_targets`` ``[T, 2]`` (NaN: indeterminate slice)."""

    keys: list[tuple[str, str]]
    sequences: list[np.ndarray]
    truth: np.ndarray
    targets: np.ndarray
    slice_targets: list[np.ndarray]

    def select(self, columns: np.ndarray) -> Exams:
        """The same exams reading only feature ``columns`` (an ablation)."""
        return Exams(self.keys, [s[:, columns] for s in self.sequences], self.truth, self.targets, self.slice_targets)


def _embed_rows(models: dict[int, StageModel], ds: WindowsDataset, channels: dict[int, list[int]], features: ExamFeatures,
                rows: tuple[int, int]) -> np.ndarray:
    with torch_threads(1), torch.inference_mode():
        out = []
        for start in range(rows[0], rows[1], EMBED_BATCH):
            part = slice(start, min(start + EMBED_BATCH, rows[1]))
            inputs = [torch.from_numpy(uint8_to_centred(ds.inputs(part, channels[n], m.meta.model.context)))
                      for n, m in models.items()]
            out.append(slice_features([m.model for m in models.values()], inputs, features).numpy())
        return np.concatenate(out)


def embed_split(models: dict[int, StageModel], windows: str, splits: str, *, split: str, fold: str = S.DEFAULT_FOLD,
                features: ExamFeatures = "all", config: Config = Config()) -> tuple[pd.DataFrame, np.ndarray]:
    """Every slice of ``split`` (indeterminate ones included): its keys and both stages' probabilities
    (``schema.PREDICTION_COLUMNS``, what the patient rules read) and its exam features ``[N, D]``."""
    for n, m in models.items():
        m.model.eval()
        if m.meta.stage != n:
            raise TrainingError(f"stage {n} model is a stage {m.meta.stage} model")
    names = list(dict.fromkeys(w for m in models.values() for w in m.meta.window_names))
    context = max(m.meta.model.context for m in models.values())
    with WindowsDataset(windows, splits, split=split, stage=1, windows_used=names, fold=fold, config=config.loader,
                        keep_indeterminate=True, context=context) as ds:
        channels = {n: window_channels(ds.windows, m.meta.windows) for n, m in models.items()}
        chunks = [(a, min(a + EMBED_CHUNK, len(ds))) for a in range(0, len(ds), EMBED_CHUNK)]
        embed = functools.partial(_embed_rows, models, ds, channels, "all")
        with ThreadPoolExecutor(cpu_share()) as pool:
            x = np.concatenate(list(pool.map(embed, chunks))) if chunks else np.zeros((0, 0), np.float32)
        pred = ds.index[S.PREDICTION_KEYS].copy().reset_index(drop=True)
    dims = [int(m.model.head.in_features) for m in models.values()]
    logits = np.cumsum([d + 1 for d in dims]) - 1
    for n, column in zip(models, logits, strict=True):
        pred[S.STAGES[n].column] = 1 / (1 + np.exp(-x[:, column].astype(np.float64)))
    return pred, x[:, feature_columns(dims, features)]


def feature_columns(dims: list[int], features: ExamFeatures) -> np.ndarray:
    """Columns of the ``"all"`` layout (per stage: its ``dims[i]`` pooled features, then its logit)
    that ``features`` keeps."""
    out: list[int] = []
    start = 0
    for d in dims:
        if features in ("all", "embeddings"):
            out.extend(range(start, start + d))
        if features in ("all", "logits"):
            out.append(start + d)
        start += d + 1
    return np.array(out, int)


def exams(pred: pd.DataFrame, x: np.ndarray) -> Exams:
    """One exam per patient of an :func:`embed_split` result, slices in z order."""
    order = pred.sort_values([S.SITE, S.PATIENT_ID, S.SERIES_UID, S.SLICE_INDEX], kind="stable").index.to_numpy()
    s = pred.loc[order]
    label = s[S.LABEL].to_numpy(object)
    known = label != S.Label.INDETERMINATE.value
    slice_y = np.stack([np.isin(label, S.STAGES[n].positive_labels) for n in (1, 2)], 1).astype(np.float32)
    slice_y[~known] = np.nan
    keys, seqs, truth, slice_targets = [], [], [], []
    for key, rows in s.groupby([S.SITE, S.PATIENT_ID], sort=False).indices.items():
        keys.append((str(key[0]), str(key[1])))
        seqs.append(x[order[rows]])
        truth.append(S.patient_class(label[rows]))
        slice_targets.append(slice_y[rows])
    t = np.array(truth, object)
    targets = np.stack([np.isin(t, S.STAGES[n].positive_labels) for n in (1, 2)], 1).astype(np.float32)
    targets[t == S.Label.INDETERMINATE.value] = np.nan
    return Exams(keys, seqs, t, targets, slice_targets)


def _loss(net: ExamNet, data: Exams, idx: np.ndarray, slice_weight: float) -> torch.Tensor:
    x, mask = pad_sequences([data.sequences[i] for i in idx])
    exam_logits, slice_logits = net(x, mask)
    y = torch.from_numpy(data.targets[idx])
    ok = ~torch.isnan(y)
    loss = F.binary_cross_entropy_with_logits(exam_logits[ok], y[ok]) if ok.any() else exam_logits.sum() * 0
    if slice_weight > 0:
        sy = pad_sequences([np.nan_to_num(data.slice_targets[i]) for i in idx])[0]
        sok = pad_sequences([(~np.isnan(data.slice_targets[i])).astype(np.float32) for i in idx])[0] > 0  # False at padding
        if sok.any():
            loss = loss + slice_weight * F.binary_cross_entropy_with_logits(slice_logits[sok], sy[sok])
    return loss


def fit_exam(train: Exams, val: Exams, config: ExamConfig) -> tuple[ExamNet, list[dict[str, float]]]:
    """The exam model with the lowest validation loss, and the per-epoch history."""
    if not train.sequences or not val.sequences:
        raise TrainingError("the exam model needs train and validation exams")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = ExamNet(train.sequences[0].shape[1], arch=config.arch, hidden=config.hidden)
    stacked = np.concatenate(train.sequences)
    net.mean.copy_(torch.from_numpy(stacked.mean(0)))
    net.std.copy_(torch.from_numpy(stacked.std(0) + 1e-6))
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    all_val = np.arange(len(val.sequences))
    best, best_epoch, best_state, history = float("inf"), 0, copy.deepcopy(net.state_dict()), []
    for epoch in range(config.epochs):
        net.train()
        order = rng.permutation(len(train.sequences))
        for start in range(0, len(order), config.batch_size):
            opt.zero_grad()
            _loss(net, train, order[start : start + config.batch_size], config.slice_loss_weight).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val_loss = float(_loss(net, val, all_val, config.slice_loss_weight))
        history.append({"epoch": epoch + 1, "val_loss": val_loss})
        if val_loss < best:
            best, best_epoch, best_state = val_loss, epoch + 1, copy.deepcopy(net.state_dict())
        elif epoch + 1 - best_epoch >= config.patience:
            break
    net.load_state_dict(best_state)
    return net.eval(), history


def exam_probabilities(net: ExamNet, data: Exams) -> np.ndarray:
    """``[N, 2]`` exam probabilities (disease, PE)."""
    net.eval()
    with torch.inference_mode():
        x, mask = pad_sequences(data.sequences)
        return torch.sigmoid(net(x, mask)[0]).numpy()


def _val_figures(probs: np.ndarray, data: Exams, config: Config) -> tuple[dict[str, float], dict[str, float | None]]:
    """Per-output thresholds for the operating point's sensitivities, and the validation AUROCs."""
    op = config.operating_point
    wanted = {"disease": op.patient_disease_sensitivity, "pe": op.patient_pe_sensitivity}
    thresholds, aurocs = {}, {}
    for j, name in enumerate(OUTPUTS):
        ok = ~np.isnan(data.targets[:, j])
        y = data.targets[ok, j].astype(int)
        if not y.any():
            raise TrainingError(f"the validation exams have no {name} patient: no exam threshold can be set")
        thresholds[name] = threshold_for_sensitivity(probs[ok, j], y, wanted[name])
        aurocs[f"val_{name}_auroc"] = auroc(y.astype(bool), probs[ok, j])
    return thresholds, aurocs


def train_exam(windows: str, splits: str, stage1: str, stage2: str, out: str, *, config: Config = Config(),
               fold: str = S.DEFAULT_FOLD, tracking_uri: str | None = None) -> dict[str, Any]:
    """Embed the train and val patients, fit the exam model, write its folder to ``out``; returns its metadata."""
    cfg = config.exam
    models = {1: load_model(stage1), 2: load_model(stage2)}
    data = {split: exams(*embed_split(models, windows, splits, split=split, fold=fold, features=cfg.features, config=config))
            for split in ("train", "val")}
    tags = {"step": "train-exam", "fold": fold, "git_commit": git_commit(), "package_version": package_version()}
    with start_run(experiment=config.registry.experiment, run_name="train-exam", tags=tags, uri=tracking_uri) as tracker:
        tracker.log_params({"exam": to_dict(cfg), "train_exams": len(data["train"].keys), "val_exams": len(data["val"].keys)})
        net, history = fit_exam(data["train"], data["val"], cfg)
        for row in history:
            tracker.log_metrics({"val_loss": row["val_loss"]}, step=int(row["epoch"]))
        thresholds, figures = _val_figures(exam_probabilities(net, data["val"]), data["val"], config)
        tracker.log_metrics(figures)
        meta = {"thresholds": thresholds, "features": cfg.features, "config": to_dict(cfg), "fold": fold,
                "stages": {str(n): {"model_json": file_digest(f"{p}/model.json"), "weights": file_digest(f"{p}/model.pt")}
                           for n, p in ((1, stage1), (2, stage2))},
                "window_names": {str(n): m.meta.window_names for n, m in models.items()},
                "parameters": parameter_count(net), "history": history, "validation": figures,
                "exams": {s: len(d.keys) for s, d in data.items()}, "git_commit": git_commit()}
        save_exam_model(out, net, meta)
        tracker.log_artifacts(out, "exam_model")
    log.info("exam model: %d train / %d val exams, %s", len(data["train"].keys), len(data["val"].keys), figures)
    return meta

"""Scoring a split: both stage models applied to every slice of it, on worker threads.

Apart from ``evaluate`` so that the operating point and the exam model's evaluation, which score
splits too, sit below the evaluation step that reports them (``evaluate`` imports them, not the
other way round).
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from pe_triage import schema as S
from pe_triage.artifact import StageModel
from pe_triage.config import Config
from pe_triage.dataset import WindowsDataset
from pe_triage.parallel import cpu_share
from pe_triage.progress import progress
from pe_triage.training.train import torch_threads
from pe_triage.windows import window_channels

log = logging.getLogger(__name__)

#: slices a worker scores at a time: enough batches to amortise the hand-over, few enough for a bar
#: that moves and for every worker to get a share of a small split
SCORE_CHUNK = 32


class EvaluationError(ValueError):
    """The models and the data do not fit together; the message says how."""


def open_split(models: dict[int, StageModel], windows: str, splits: str, split: str, fold: str,
                config: Config) -> WindowsDataset:
    """Every slice of ``split`` (indeterminate ones included) with the windows both models read."""
    for stage, model in models.items():
        if model.meta.stage != stage:
            raise EvaluationError(f"--stage{stage} model is a stage {model.meta.stage} model")
    names = list(dict.fromkeys(models[1].meta.window_names + models[2].meta.window_names))
    context = max(model.meta.model.context for model in models.values())
    try:
        return WindowsDataset(windows, splits, split=split, stage=1, windows_used=names, fold=fold, config=config.loader,
                              keep_indeterminate=True, context=context)
    except ValueError as e:
        raise EvaluationError(str(e)) from None


def batch_images(config: Config, shape: tuple[int, ...]) -> int:
    """Images per CPU forward pass for inputs of ``shape`` [..., H, W]: ``evaluate.batch_pixels`` worth."""
    return max(1, config.evaluate.batch_pixels // (shape[-2] * shape[-1]))


def _score_rows(models: dict[int, StageModel], ds: WindowsDataset, channels: dict[int, list[int]], batch: int,
                rows: tuple[int, int]) -> dict[int, np.ndarray]:
    """Both stages' probabilities for items ``[start, stop)`` of ``ds``, on the calling thread alone."""
    with torch_threads(1):
        return {n: model.predict_proba(ds.inputs(slice(*rows), channels[n], model.meta.model.context), batch_size=batch)
                for n, model in models.items()}


def score_slices(models: dict[int, StageModel], ds: WindowsDataset, desc: str,
           config: Config) -> tuple[pd.DataFrame, dict[int, list[int]]]:
    """Both stages' probabilities for every slice (``schema.PREDICTION_COLUMNS``) and each model's channels.

    Chunks of slices go to one worker thread per CPU (``parallel.cpu_share``), each running torch on
    that thread alone (torch releases the GIL in its ops) in cache-sized batches (``batch_images``).
    Several intra-op threads would split each small op and meet at a barrier after it, and when
    another job holds a core every barrier waits for a descheduled thread: on 2 shared cores two
    threads scored 4-26 img/s where one scored 89-185 (benchmarks/evaluate.py). The time is the
    models' and grows with the slices alone."""
    pred = ds.index[S.PREDICTION_KEYS].copy()
    channels = {}
    for stage in S.STAGES.values():
        try:
            channels[stage.number] = window_channels(ds.windows, models[stage.number].meta.windows)
        except ValueError as e:
            raise EvaluationError(f"stage {stage.number} model and the windows dataset: {e}") from None
    batch = batch_images(config, ds.shape)
    chunks = [(start, min(start + SCORE_CHUNK, len(ds))) for start in range(0, len(ds), SCORE_CHUNK)]
    probs = {n: np.empty(len(ds), np.float32) for n in channels}
    score = functools.partial(_score_rows, models, ds, channels, batch)
    with progress(len(ds), desc, unit="slice", logger=log) as bar, ThreadPoolExecutor(cpu_share()) as pool:
        for (start, stop), part in zip(chunks, pool.map(score, chunks), strict=True):
            for n, p in part.items():
                probs[n][start:stop] = p
            bar.update(stop - start)
    for stage in S.STAGES.values():
        pred[stage.column] = probs[stage.number]
    return pred, channels


def predict_split(models: dict[int, StageModel], windows: str, splits: str, *, split: str, fold: str = S.DEFAULT_FOLD,
                  config: Config = Config()) -> pd.DataFrame:
    """Both stages applied to every slice of ``split``: the labelled prediction frame the metrics read."""
    with open_split(models, windows, splits, split, fold, config) as ds:
        return score_slices(models, ds, f"score {split}", config)[0]

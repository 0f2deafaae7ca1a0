"""Binary-classifier statistics shared by training (validation AUROC, the operating threshold) and
evaluation (the metric tables): a module of its own so that neither imports the other.

AUROC is Mann-Whitney (ties count half), AUPRC step-wise average precision; the bootstrap resamples
groups (patients), not slices.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import sparse

#: resamples are evaluated in chunks of about this many (tie group x resample) values: bounded memory, still vectorised
_CHUNK_ELEMENTS = 4_000_000


# ----------------------------------------------------------------------------- thresholds

def threshold_for_sensitivity(probs: np.ndarray, targets: np.ndarray, sensitivity: float) -> float:
    """The highest threshold (``p >= t`` is positive) that keeps at least ``sensitivity`` of the positives.

    The highest such threshold gives the fewest false alarms at the required sensitivity.
    """
    if not 0 < sensitivity <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {sensitivity}")
    positives = np.sort(np.asarray(probs)[np.asarray(targets) == 1])[::-1]
    if positives.size == 0:
        raise ValueError("no positive samples to set a threshold on")
    needed = math.ceil(sensitivity * positives.size - 1e-9)
    return float(positives[needed - 1])


def binary_rates(probs: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = np.asarray(probs) >= threshold
    targets = np.asarray(targets) == 1
    tp, tn = int((predicted & targets).sum()), int((~predicted & ~targets).sum())
    return {
        "sensitivity": tp / max(1, int(targets.sum())),
        "specificity": tn / max(1, int((~targets).sum())),
        "accuracy": (tp + tn) / max(1, targets.size),
    }


# ----------------------------------------------------------------------------- ranking metrics

def _group_matrices(y: np.ndarray, score: np.ndarray, groups: np.ndarray) -> tuple[sparse.csr_array, sparse.csr_array]:
    """Positive and negative slice counts [tie group, patient], tie groups in descending score order.

    A bootstrap resample is a vector of patient multiplicities; multiplying these sparse matrices by
    it gives every tie group's weighted class counts, so all resamples are one matrix product.
    """
    _, patient = np.unique(np.asarray(groups), return_inverse=True)
    _, tie = np.unique(-score, return_inverse=True)
    patient, tie = patient.ravel(), tie.ravel()
    shape = (int(tie.max()) + 1 if tie.size else 0, int(patient.max()) + 1 if patient.size else 0)

    def count(rows: np.ndarray) -> sparse.csr_array:
        return sparse.csr_array((np.ones(int(rows.sum()), np.float32), (tie[rows], patient[rows])), shape=shape)

    return count(y), count(~y)


def _ranking(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision from class weights per tie group [tie groups, B] (descending score),
    one column per resample; NaN where a class has no weight."""
    cpos, cneg = np.cumsum(pos, 0), np.cumsum(neg, 0)
    n_pos, n_neg = cpos[-1], cneg[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        # a positive beats every negative in a lower group and ties with half of its own group
        auc = (pos * (n_neg - cneg + 0.5 * neg)).sum(0, dtype=float) / (n_pos.astype(float) * n_neg)
        called = cpos + cneg
        ap = (pos * np.divide(cpos, called, out=np.zeros_like(cpos), where=called > 0)).sum(0, dtype=float) / n_pos
    bad = (n_pos <= 0) | (n_neg <= 0)
    auc[bad] = np.nan
    ap[bad] = np.nan
    return auc, ap


def _point(y: np.ndarray, score: np.ndarray) -> tuple[float | None, float | None]:
    y, score = np.asarray(y, bool), np.asarray(score, float)
    if y.size == 0:
        return None, None
    a_pos, a_neg = _group_matrices(y, score, np.zeros(y.size, int))
    auc, ap = _ranking((a_pos @ np.ones((1, 1))).astype(float), (a_neg @ np.ones((1, 1))).astype(float))
    return (None if np.isnan(auc[0]) else float(auc[0])), (None if np.isnan(ap[0]) else float(ap[0]))


def auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count half."""
    return _point(y, score)[0]


def average_precision(y: np.ndarray, score: np.ndarray) -> float | None:
    """AUPRC as step-wise average precision: sum over thresholds of (recall gain) x precision."""
    return _point(y, score)[1]


def bootstrap_ranking(y: np.ndarray, score: np.ndarray, groups: np.ndarray, *, resamples: int, confidence: float,
                      seed: int) -> dict[str, dict[str, Any]]:
    """AUROC and AUPRC with percentile CIs from resampling ``groups`` (patients) with replacement:
    slices of one patient are correlated, so they enter and leave a resample together."""
    y, score = np.asarray(y, bool), np.asarray(score, float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    point = _point(y, score)
    out: dict[str, dict[str, Any]] = {name: {"value": v, "ci": None, "n_pos": n_pos, "n_neg": n_neg, "resamples": 0}
           for name, v in zip(("auroc", "auprc"), point, strict=True)}
    if n_pos == 0 or n_neg == 0 or resamples <= 0:
        return out
    a_pos, a_neg = _group_matrices(y, score, groups)
    n_groups = a_pos.shape[1]
    counts = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=resamples)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, a_pos.shape[0]))
    # float32 halves the memory traffic; counts stay exact and sums accumulate in float64
    parts = [_ranking(a_pos @ c.T.astype(np.float32), a_neg @ c.T.astype(np.float32))
             for c in (counts[i:i + chunk] for i in range(0, resamples, chunk))]
    alpha = (1 - confidence) / 2
    for i, name in enumerate(("auroc", "auprc")):
        values = np.concatenate([p[i] for p in parts])
        values = values[~np.isnan(values)]
        out[name]["resamples"] = int(values.size)
        if values.size:
            lo, hi = np.quantile(values, [alpha, 1 - alpha])
            out[name]["ci"] = [float(lo), float(hi)]
    return out

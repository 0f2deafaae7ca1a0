"""The exam-level model: one decision per exam from the sequence of its slices' features in z order.

The study calls an exam positive when any slice is, so every slice is another chance of a false
alarm; a clot, though, persists over neighbouring slices and a false alarm often does not. A small
sequence model over the frozen slice models' embeddings (``MultiWindowNet.embed``) and logits sees
the whole exam: a bidirectional GRU (``arch="gru"``) or, as its ablation without z order, a per-slice
layer (``"attention"``); both pool with attention over the valid slices, one pooling per output.

The artifact is a folder like the stage models' (``pe_triage.artifact``): ``exam.pt`` a state dict
read with ``weights_only=True`` (nothing pickled is run) and ``exam.json`` (format, architecture,
thresholds, the stage models it reads), written atomically.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pe_triage.config import ExamArch, ExamFeatures
from pe_triage.models.multiwindow import MultiWindowNet
from pe_triage.storage import atomic_dir

FORMAT = "pe-triage-exam/1"
WEIGHTS = "exam.pt"
META = "exam.json"
#: the exam model's outputs, in order
OUTPUTS = ("disease", "pe")


class ExamArtifactError(ValueError):
    """An exam model folder is missing, of another format or inconsistent; the message says which."""


class ExamNet(nn.Module):
    """``[B, T, D]`` slice features (z order, valid slices first) + ``mask [B, T]`` ->
    (exam logits ``[B, 2]``, slice logits ``[B, T, 2]``), outputs as :data:`OUTPUTS`.

    Features are standardised with the training set's ``mean``/``std`` (buffers: they travel with the
    weights). Padding never reaches a valid slice: the GRU runs on packed sequences and the attention
    gives padded positions no weight."""

    mean: Tensor
    std: Tensor

    def __init__(self, in_features: int, *, arch: ExamArch = "gru", hidden: int = 32) -> None:
        super().__init__()
        self.in_features, self.arch, self.hidden = in_features, arch, hidden
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        width = 2 * hidden
        if arch == "gru":
            self.encoder: nn.Module = nn.GRU(in_features, hidden, batch_first=True, bidirectional=True)
        else:
            self.encoder = nn.Sequential(nn.Linear(in_features, width), nn.GELU())
        n = len(OUTPUTS)
        self.slice_head = nn.Linear(width, n)
        self.attention = nn.Linear(width, n)
        self.exam_weight = nn.Parameter(torch.randn(n, width) / width**0.5)
        self.exam_bias = nn.Parameter(torch.zeros(n))

    def _encode(self, x: Tensor, lengths: Tensor) -> Tensor:
        if self.arch != "gru":
            return self.encoder(x)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.encoder(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        lengths = mask.sum(1)
        if x.ndim != 3 or x.shape[2] != self.in_features or mask.shape != x.shape[:2]:
            raise ValueError(f"expected features [B, T, {self.in_features}] and mask [B, T], got {list(x.shape)} "
                             f"and {list(mask.shape)}")
        prefix = torch.arange(x.shape[1], device=mask.device)[None] < lengths[:, None]
        if bool((lengths < 1).any()) or not torch.equal(mask, prefix):
            raise ValueError("every exam needs at least one slice, its valid slices first (mask a prefix)")
        h = self._encode((x - self.mean) / self.std, lengths)
        scores = self.attention(h).masked_fill(~mask[..., None], float("-inf"))
        weights = torch.softmax(scores, 1)  # [B, T, n]
        pooled = torch.einsum("btn,btw->bnw", weights, h)
        return (pooled * self.exam_weight).sum(-1) + self.exam_bias, self.slice_head(h)


def pad_sequences(sequences: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Per-exam ``[T_i, D]`` arrays -> zero-padded ``[B, max T, D]`` float32 and the prefix mask ``[B, max T]``."""
    if not sequences:
        raise ValueError("no exam to pad")
    longest = max(len(s) for s in sequences)
    x = torch.zeros(len(sequences), longest, sequences[0].shape[1])
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for i, s in enumerate(sequences):
        x[i, : len(s)] = torch.from_numpy(np.asarray(s, np.float32))
        mask[i, : len(s)] = True
    return x, mask


def slice_features(nets: Sequence[MultiWindowNet], inputs: Sequence[Tensor], features: ExamFeatures) -> Tensor:
    """What the exam model reads per slice: each stage model's pooled features and/or its logit, in
    stage order (``nets[i]`` applied to ``inputs[i]``, its own windows and context)."""
    parts = []
    for net, x in zip(nets, inputs, strict=True):
        embedding = net.embed(x)
        if features in ("all", "embeddings"):
            parts.append(embedding)
        if features in ("all", "logits"):
            parts.append(net.head(embedding)[:, :1])
    return torch.cat(parts, 1)


@dataclass
class ExamModel:
    """A loaded exam model (eval mode) and its ``exam.json``: ``thresholds`` maps :data:`OUTPUTS` to
    the operating thresholds on the exam probabilities."""

    net: ExamNet
    meta: dict[str, Any]

    @property
    def thresholds(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.meta["thresholds"].items()}

    def predict_proba(self, sequences: Sequence[np.ndarray], *, batch_size: int = 64) -> np.ndarray:
        """Per-exam feature sequences -> ``[N, 2]`` probabilities (disease, PE)."""
        self.net.eval()
        out = np.empty((len(sequences), len(OUTPUTS)), np.float32)
        with torch.inference_mode():
            for start in range(0, len(sequences), batch_size):
                x, mask = pad_sequences(sequences[start : start + batch_size])
                out[start : start + len(x)] = torch.sigmoid(self.net(x, mask)[0]).numpy()
        return out


def save_exam_model(out: str | Path, net: ExamNet, meta: dict[str, Any]) -> Path:
    """Write the folder atomically; ``meta`` must name ``thresholds`` for every output."""
    if set(meta.get("thresholds", {})) != set(OUTPUTS):
        raise ExamArtifactError(f"exam model metadata needs thresholds for {list(OUTPUTS)}")
    arch = {"in_features": net.in_features, "arch": net.arch, "hidden": net.hidden}
    with atomic_dir(out) as tmp:
        tmp.mkdir()
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps({**meta, "format": FORMAT, "net": arch}, indent=2, sort_keys=True, default=str))
    return Path(out)


def _load_state(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ExamArtifactError(f"{path}: holds objects other than tensors and plain values; refused, none of it run") from None
    except (RuntimeError, EOFError, OSError):
        raise ExamArtifactError(f"{path}: missing, corrupt or cut short") from None


def load_exam_model(path: str | Path) -> ExamModel:
    """Rebuild the exam model from ``exam.json`` and load its weights (eval mode)."""
    path = Path(path)
    if not (path / META).is_file():
        raise ExamArtifactError(f"{path}: not an exam model folder (no {META})")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise ExamArtifactError(f"{path}: exam model format {meta.get('format')!r}, this version reads {FORMAT!r}")
    arch = meta.get("net", {})
    if arch.get("arch") not in ("gru", "attention") or not isinstance(arch.get("in_features"), int) \
            or not isinstance(arch.get("hidden"), int):
        raise ExamArtifactError(f"{path}: {META} does not describe an exam model architecture")
    net = ExamNet(arch["in_features"], arch=arch["arch"], hidden=arch["hidden"])
    state = _load_state(path / WEIGHTS)
    if not isinstance(state, dict):
        raise ExamArtifactError(f"{path}: {WEIGHTS} is not a state dict")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ExamArtifactError(f"{path}: weights do not match the architecture in {META}: {str(e).splitlines()[0]}") from None
    return ExamModel(net.eval(), meta)

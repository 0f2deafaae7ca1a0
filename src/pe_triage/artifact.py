"""The model artifact: everything needed to rebuild and apply one stage's model.

A folder with ``model.pt`` (the state dict, loaded with ``weights_only=True``: no pickled code),
``model.json`` (format, stage, architecture, the window definitions in branch order, the
preprocessing that produced the inputs, the operating threshold and where it came from, provenance)
and ``history.json`` (per-epoch metrics). Written to a temporary sibling and renamed, so a reader
never sees half a model.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pe_triage.config import ModelConfig, from_dict
from pe_triage.models import MultiWindowNet, build_model
from pe_triage.storage import atomic_dir
from pe_triage.windows import Window, uint8_to_centred

FORMAT = "pe-triage-model/2"
#: format 1 predates ``min_channels`` (levels floored at 4) and ``fusion`` (``shared_branches``)
FORMAT_1 = "pe-triage-model/1"
WEIGHTS = "model.pt"
META = "model.json"
HISTORY = "history.json"
#: what every ``model.json`` holds (the rest is provenance and records, read through ``ModelMeta.raw``)
_REQUIRED = ("stage", "model", "windows", "threshold")


class ArtifactError(ValueError):
    """A model folder is missing, of another format, or inconsistent; the message says which."""


@dataclass(frozen=True)
class ModelMeta:
    """A stage model's ``model.json``: what code acts on, typed and checked once when read, and
    ``raw``, the whole JSON (format 1 upgraded) for what only travels on (registry tags, the
    evaluation's record of its models, the model card)."""

    stage: int
    model: ModelConfig
    #: in branch order
    windows: tuple[Window, ...]
    #: the operating threshold on P(positive)
    threshold: float
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> ModelMeta:
        for key in _REQUIRED:
            if key not in meta:
                raise ArtifactError(f"model metadata lacks {key!r}")
        return cls(stage=int(meta["stage"]), model=from_dict(ModelConfig, meta["model"]),
                   windows=tuple(Window.from_dict(w) for w in meta["windows"]), threshold=float(meta["threshold"]),
                   raw=dict(meta))

    @property
    def window_names(self) -> list[str]:
        return [w.name for w in self.windows]


@dataclass
class StageModel:
    """A loaded stage model (eval mode) and its metadata."""

    model: MultiWindowNet
    meta: ModelMeta

    def predict_proba(self, windows: np.ndarray, *, batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
        """uint8 window stacks ``[N, C, H, W]`` (this model's windows, in its order) -> P(positive) ``[N]``."""
        return predict_proba(self.model, windows, batch_size=batch_size, device=device)


def predict_proba(model: torch.nn.Module, windows: np.ndarray, *, batch_size: int = 64,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Sigmoid of the single logit, batched, in eval mode without gradients (denormals flushed: see
    ``train``)."""
    torch.set_flush_denormal(True)
    model.eval()
    out = np.empty(len(windows), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            x = torch.from_numpy(uint8_to_centred(np.asarray(windows[start : start + batch_size]))).to(device)
            out[start : start + len(x)] = torch.sigmoid(model(x)[:, 0].float()).cpu().numpy()
    return out


def save_model(out: str | Path, model: torch.nn.Module, meta: dict[str, Any], history: list[dict[str, Any]]) -> Path:
    """Write the artifact folder atomically (replacing an older one at ``out``); ``meta`` must read back
    as a :class:`ModelMeta`."""
    ModelMeta.from_dict(meta)
    with atomic_dir(out) as tmp:
        tmp.mkdir()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True, default=str))
        (tmp / HISTORY).write_text(json.dumps(history, indent=2))
    return Path(out)


def rethreshold(src: str | Path, out: str | Path, threshold: float, operating_point: dict[str, Any]) -> Path:
    """Copy the artifact at ``src`` to ``out`` with a new operating ``threshold`` and the record of how
    it was chosen; the stage's own threshold stays as ``slice_threshold`` (atomic, like ``save_model``)."""
    meta = read_meta(src)
    meta = {**meta, "format": FORMAT, "slice_threshold": meta.get("slice_threshold", meta["threshold"]),
            "threshold": float(threshold), "operating_point": operating_point}
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return Path(out)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The whole ``model.json`` of the artifact at ``path``, a format 1 one upgraded to the current layout."""
    path = Path(path)
    if not (path / META).is_file():
        raise ArtifactError(f"{path}: not a pe-triage model folder (no {META})")
    meta = json.loads((path / META).read_text())
    if meta.get("format") == FORMAT_1:
        model = dict(meta["model"])
        model["fusion"] = "shared" if model.pop("shared_branches", False) else "branches"
        model.setdefault("min_channels", 4)
        meta = {**meta, "model": model}
    elif meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: model format {meta.get('format')!r}, this version reads {FORMAT!r} and {FORMAT_1!r}")
    return meta


def load_tensors(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain values only, so a crafted file is
    refused without running anything; either refusal is one :class:`ArtifactError` line (torch's own
    messages span lines and suggest ``weights_only=False``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ArtifactError(f"{path}: holds objects other than tensors and plain values; refused, none of it run") from None
    except (RuntimeError, EOFError):
        raise ArtifactError(f"{path}: not a readable torch file (corrupt or cut short)") from None


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> StageModel:
    """Rebuild the architecture from ``model.json`` and load the weights (eval mode)."""
    path = Path(path)
    meta = ModelMeta.from_dict(read_meta(path))
    model = build_model(meta.model, len(meta.windows))
    state = load_tensors(path / WEIGHTS)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not match the architecture in {META}: {str(e).splitlines()[0]}") from None
    return StageModel(model.to(device).eval(), meta)

"""Model builders, torchvision-style: one-line public builders, keyword configuration, no pretrained
weights (nothing can be downloaded; every model starts from random initialisation)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from pe_triage.config import ModelConfig
from pe_triage.models.drn import DRN, drn_d_22, drn_d_38, drn_d_54
from pe_triage.models.multiwindow import MultiWindowNet
from pe_triage.models.resnet import ResNet, resnet50

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "drn_d_22": drn_d_22,
    "drn_d_38": drn_d_38,
    "drn_d_54": drn_d_54,
    "resnet50": resnet50,
    "cbam_drn_d_22": partial(drn_d_22, cbam=True),
    "cbam_drn_d_38": partial(drn_d_38, cbam=True),
    "cbam_drn_d_54": partial(drn_d_54, cbam=True),  # the study's CBAMDRN
    "cbam_resnet50": partial(resnet50, cbam=True),
}


def build_model(config: ModelConfig, n_windows: int) -> MultiWindowNet:
    """The configured architecture with one single-channel branch per window."""
    if config.arch not in BACKBONES:
        raise ValueError(f"unknown architecture {config.arch!r}; known: {sorted(BACKBONES)}")
    backbone = partial(BACKBONES[config.arch], in_channels=1, width=config.width)
    return MultiWindowNet(backbone, n_windows, num_outputs=config.num_outputs, shared=config.shared_branches,
                          pooling=config.pooling)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["BACKBONES", "DRN", "MultiWindowNet", "ResNet", "build_model", "drn_d_22", "drn_d_38", "drn_d_54",
           "parameter_count", "resnet50"]

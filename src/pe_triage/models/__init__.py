"""Model builders, torchvision-style: one-line public builders, keyword configuration, no pretrained
weights (nothing can be downloaded; every model starts from random initialisation)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from pe_triage.config import ModelConfig
from pe_triage.models.drn import DRN, drn_d_22, drn_d_38, drn_d_54
from pe_triage.models.multiwindow import MultiWindowNet
from pe_triage.models.plain import PlainCNN, plain_cnn
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
    "plain_cnn": plain_cnn,  # the CPU-scale yardstick, not the study's model
}


def build_model(config: ModelConfig, n_windows: int) -> MultiWindowNet:
    """The configured architecture over ``n_windows`` windows (branches per ``config.fusion``)."""
    if config.arch not in BACKBONES:
        raise ValueError(f"unknown architecture {config.arch!r}; known: {sorted(BACKBONES)}")
    builder = BACKBONES[config.arch]

    def backbone(in_channels: int) -> nn.Module:
        return builder(in_channels=in_channels, width=config.width, min_channels=config.min_channels)

    return MultiWindowNet(backbone, n_windows, num_outputs=config.num_outputs, fusion=config.fusion, pooling=config.pooling,
                          slices_per_window=config.slices_per_window)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["BACKBONES", "DRN", "MultiWindowNet", "PlainCNN", "ResNet", "build_model", "drn_d_22", "drn_d_38", "drn_d_54",
           "parameter_count", "plain_cnn", "resnet50"]

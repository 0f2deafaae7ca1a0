"""One backbone branch per HU window, features concatenated, one linear head (the study's TWL/DWL)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class MultiWindowNet(nn.Module):
    """[B, n_windows, H, W] -> [B, num_outputs] logits.

    Each window gets its own branch by default (the study: the windows show different tissue, so
    the filters differ); ``shared=True`` applies one branch to every window (fewer parameters).
    """

    def __init__(self, backbone: Callable[[], nn.Module], n_windows: int, *, num_outputs: int = 1, shared: bool = False) -> None:
        super().__init__()
        if n_windows < 1:
            raise ValueError("a model needs at least one window")
        self.n_windows = n_windows
        self.shared = shared
        self.branches = nn.ModuleList([backbone() for _ in range(1 if shared else n_windows)])
        features = self.branches[0].out_channels * n_windows  # type: ignore[operator]
        self.head = nn.Linear(features, num_outputs)

    def features(self, x: Tensor) -> list[Tensor]:
        """Per-window feature maps (what Grad-CAM looks at)."""
        if x.shape[1] != self.n_windows:
            raise ValueError(f"input has {x.shape[1]} windows, the model was built for {self.n_windows}")
        return [self.branches[0 if self.shared else i](x[:, i : i + 1]) for i in range(self.n_windows)]

    def forward(self, x: Tensor) -> Tensor:
        pooled = [f.mean((2, 3)) for f in self.features(x)]
        return self.head(torch.cat(pooled, 1))

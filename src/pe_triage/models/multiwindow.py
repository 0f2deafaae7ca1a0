"""One backbone branch per HU window, features concatenated, one linear head (the study's TWL/DWL)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

#: global pooling of each branch's feature map before the head
POOLINGS = ("avg", "max", "avgmax")


class MultiWindowNet(nn.Module):
    """[B, n_windows, H, W] -> [B, num_outputs] logits.

    Each window gets its own branch by default (the study: the windows show different tissue, so
    the filters differ); ``shared=True`` applies one branch to every window (fewer parameters).
    """

    def __init__(self, backbone: Callable[[], nn.Module], n_windows: int, *, num_outputs: int = 1, shared: bool = False,
                 pooling: str = "avg") -> None:
        super().__init__()
        if n_windows < 1:
            raise ValueError("a model needs at least one window")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.n_windows = n_windows
        self.shared = shared
        self.pooling = pooling
        self.branches = nn.ModuleList([backbone() for _ in range(1 if shared else n_windows)])
        features = self.branches[0].out_channels * n_windows * (2 if pooling == "avgmax" else 1)  # type: ignore[operator]
        self.head = nn.Linear(features, num_outputs)

    def features(self, x: Tensor) -> list[Tensor]:
        """Per-window feature maps (what Grad-CAM looks at)."""
        if x.shape[1] != self.n_windows:
            raise ValueError(f"input has {x.shape[1]} windows, the model was built for {self.n_windows}")
        return [self.branches[0 if self.shared else i](x[:, i : i + 1]) for i in range(self.n_windows)]

    def forward(self, x: Tensor) -> Tensor:
        pooled = [p for f in self.features(x) for p in global_pool(f, self.pooling)]
        return self.head(torch.cat(pooled, 1))


def global_pool(f: Tensor, pooling: str) -> list[Tensor]:
    """Global pooling of one branch's feature map.

    Average pooling (the study's DRN head) spreads a lesion that fills one cell of the 1/8-scale map
    over all of them (1/256 of the signal at 128 px); max pooling keeps it whole; ``avgmax`` feeds
    both to the head: the context of the whole slice and the strongest local finding.
    """
    out = []
    if pooling in ("avg", "avgmax"):
        out.append(f.mean((2, 3)))
    if pooling in ("max", "avgmax"):
        out.append(f.amax((2, 3)))
    return out

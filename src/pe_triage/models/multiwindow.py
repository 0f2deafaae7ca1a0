"""HU windows into one model: a backbone branch per window (the study's TWL/DWL), one branch shared by
every window, or one branch over the windows stacked as channels; branch features concatenated, one
linear head."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from pe_triage.config import Fusion, Pooling


class MultiWindowNet(nn.Module):
    """[B, n_windows * slices_per_window, H, W] -> [B, num_outputs] logits.

    ``fusion="branches"`` (the study): each window gets its own branch, since the windows show
    different tissue. ``"shared"`` applies one branch to every window (fewer parameters).
    ``"stacked"`` feeds the windows to one branch as input channels: its first filters see a pixel
    in every window at once (clot: dark in the vascular window, grey in the PE window) at the cost of
    one branch instead of ``n_windows``. ``backbone(in_channels)`` builds one branch.

    ``slices_per_window`` > 1 is 2.5-D input (``windows.context_stack``): each window brings the slice
    and its neighbours, window-major, and a window's branch takes all of its slices as channels.
    """

    def __init__(self, backbone: Callable[[int], nn.Module], n_windows: int, *, num_outputs: int = 1,
                 fusion: Fusion = "branches", pooling: Pooling = "avg", slices_per_window: int = 1) -> None:
        super().__init__()
        if n_windows < 1 or slices_per_window < 1:
            raise ValueError(f"a model needs at least one window and one slice, got {n_windows} and {slices_per_window}")
        self.n_windows = n_windows
        self.slices_per_window = slices_per_window
        self.fusion = fusion
        self.pooling = pooling
        stacked = fusion == "stacked"
        count = n_windows if fusion == "branches" else 1
        self.branches = nn.ModuleList([backbone(slices_per_window * (n_windows if stacked else 1)) for _ in range(count)])
        outputs = 1 if stacked else n_windows
        # every backbone has a plain int ``out_channels``; nn.Module types its attributes as Tensor | Module
        width = cast(int, self.branches[0].out_channels)
        features = width * outputs * (2 if pooling == "avgmax" else 1)
        self.head = nn.Linear(features, num_outputs)

    def features(self, x: Tensor) -> list[Tensor]:
        """Feature maps, one per branch application (what Grad-CAM looks at)."""
        d = self.slices_per_window
        if x.shape[1] != self.n_windows * d:
            raise ValueError(f"input has {x.shape[1]} channels, the model was built for {self.n_windows} window(s) "
                             f"x {d} slice(s)")
        if self.fusion == "stacked":
            return [self.branches[0](x)]
        return [self.branches[0 if self.fusion == "shared" else i](x[:, i * d : (i + 1) * d]) for i in range(self.n_windows)]

    def embed(self, x: Tensor) -> Tensor:
        """[B, features] pooled branch features, what the head reads: a slice's embedding for a
        model over the slices of an exam (``models.exam``)."""
        return torch.cat([p for f in self.features(x) for p in global_pool(f, self.pooling)], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def global_pool(f: Tensor, pooling: Pooling) -> list[Tensor]:
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

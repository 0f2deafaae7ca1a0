"""Evidence maps: where in a slice the model found what made it answer positive.

Two methods (``EvalConfig.attribution``). Grad-CAM per window branch is what the study used to check
that the model looks at the lesion. Integrated gradients (Sundararajan et al., ICML 2017) is the
default: on this project's dilated, globally pooled backbone Grad-CAM draws the evidence where the
network's late features hold it, which is often not where the lesion is, while occluding the lesion
shows that the score does come from it (the measurement is at ``EvalConfig.attribution``).

``inside_fraction`` turns the check into a number: the share of the map's mass that falls inside the
lesion mask of the synthetic cohort (or of a radiologist's outline). Read it against the lesion's
share of the image (what a map spread evenly would score). ``peak_on_lesion`` is the pointing game
(Zhang et al., ECCV 2016): is the map's maximum on the lesion, within a tolerance of about one
feature-map cell? ``pointing_game`` plays it over many slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pe_triage.config import AttributionMethod, EvalConfig
from pe_triage.models.plain import PlainCNN
from pe_triage.schema import LABEL, STAGES
from pe_triage.windows import uint8_to_centred

CATEGORIES = ("tp", "fp", "fn")
#: level names every backbone answers to: its output, and the level that feeds the output
GENERIC_LEVELS = ("output", "penultimate")


def branch_levels(branch: nn.Module) -> dict[str, nn.Module]:
    """A backbone's levels by name, in the order they run: a ``PlainCNN``'s conv-BN-ReLU layers
    (conv1..conv7), any other backbone's child modules (DRN: layer0..layer8; ResNet: stem,
    layer1..layer4). A level's output is what Grad-CAM can weigh."""
    if isinstance(branch, PlainCNN):
        return {f"conv{i + 1}": m for i, m in enumerate(m for m in branch.body if isinstance(m, nn.ReLU))}
    return dict(branch.named_children())


def cam_level(branch: nn.Module, layer: str) -> nn.Module:
    """The module of ``branch`` whose output is level ``layer``: ``"output"`` (the branch itself),
    ``"penultimate"`` (the level before the last) or a level of :func:`branch_levels`."""
    if layer == "output":
        return branch
    levels = branch_levels(branch)
    if layer == "penultimate" and len(levels) >= 2:
        return list(levels.values())[-2]
    if layer not in levels:
        raise ValueError(f"Grad-CAM layer {layer!r}: a {type(branch).__name__} branch has levels {list(levels)} "
                         f"(or {', '.join(GENERIC_LEVELS[:1 if len(levels) < 2 else 2])})")
    return levels[layer]


def grad_cam(model: nn.Module, x: Tensor, *, output: int = 0, layer: str = "output") -> np.ndarray:
    """Heat maps [N, n_windows, H, W] (float32, each map scaled to [0, 1]) for model input ``x`` [N, C, H, W].

    One map per window of a ``MultiWindowNet``, whatever slices each window brings (a ``stacked``
    model's single branch sees every window, so its one map is repeated for each): level ``layer``
    of each branch (:func:`cam_level`) weighted by the spatial mean of the logit's gradient, ReLU,
    bilinear upsampling to the input size. The model runs in eval mode (batch statistics would mix
    the samples); its training flag, parameters, ``requires_grad`` flags and ``.grad`` are left as
    they were. A map with no positive evidence is 0.
    """
    captured: list[Tensor] = []
    levels = {id(m): m for m in (cam_level(b, layer) for b in model.branches)}  # type: ignore[union-attr]
    handles = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in levels.values()]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # gradients flow through the input, so a frozen model (requires_grad False) still works
            inp = x.detach().clone().requires_grad_(True)
            logit = model(inp)[:, output]
            grads = torch.autograd.grad(logit.sum(), captured)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    maps = []
    for feat, grad in zip(captured, grads, strict=True):
        weights = grad.mean((2, 3), keepdim=True)
        cam = F.relu((weights * feat).sum(1, keepdim=True)).detach()
        maps.append(F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False))
    n_windows = int(model.n_windows)  # type: ignore[arg-type]
    cams = torch.cat(maps, 1).float().expand(-1, n_windows, -1, -1)  # a stacked branch's one map, on every window
    peak = cams.amax((2, 3), keepdim=True)
    cams = torch.where(peak > 0, cams / peak.clamp_min(torch.finfo(cams.dtype).tiny), torch.zeros_like(cams))
    return cams.clamp_(0, 1).cpu().numpy().astype(np.float32)


def integrated_gradients(model: nn.Module, x: Tensor, *, steps: int = 16, smooth_px: float = 2.0) -> np.ndarray:
    """Evidence maps [N, n_windows, H, W] (float32, each scaled to [0, 1]) for model input ``x`` [N, C, H, W].

    The input times the logit's gradient averaged along the straight path from a window-centre grey
    image (zero after centring: no contrast anywhere) to ``x`` (``steps`` midpoints). Its positive
    part (evidence for the positive class, as Grad-CAM's ReLU) is summed over the channels of each
    window (its 2k+1 slices: channels are window-major) and blurred with a Gaussian of ``smooth_px``,
    so a map is a region, not single pixels. Eval mode; the model's training flag, parameters and
    ``.grad`` are left as they were. A map with no positive evidence is 0.
    """
    n_windows = int(model.n_windows)  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    total = torch.zeros_like(x)
    try:
        with torch.enable_grad():
            for alpha in (torch.arange(steps, dtype=x.dtype) + 0.5) / steps:
                point = (alpha * x.detach()).requires_grad_(True)
                total += torch.autograd.grad(model(point)[:, 0].sum(), point)[0]
    finally:
        model.train(was_training)
    evidence = (total / steps * x.detach()).clamp_min(0)
    maps = evidence.reshape(len(x), n_windows, -1, *x.shape[-2:]).sum(2).float().cpu().numpy()
    out = np.zeros_like(maps)
    for i, j in np.ndindex(maps.shape[:2]):
        m = cv2.GaussianBlur(maps[i, j], (0, 0), smooth_px) if smooth_px > 0 else maps[i, j]
        if m.max() > 0:
            out[i, j] = np.clip(m / m.max(), 0, 1)
    return out


@dataclass(frozen=True)
class Attribution:
    """How an evidence map is drawn: ``method`` "integrated_gradients" (``steps``, ``smooth_px``) or
    "gradcam" (at branch level ``layer``). See ``EvalConfig.attribution`` for the choice."""

    method: AttributionMethod = "integrated_gradients"
    layer: str = "penultimate"
    steps: int = 16
    smooth_px: float = 2.0

    @classmethod
    def of(cls, config: EvalConfig) -> Attribution:
        return cls(config.attribution, config.gradcam_layer, config.attribution_steps, config.attribution_smooth_px)

    @property
    def label(self) -> str:
        """What a report says drew the maps."""
        if self.method == "gradcam":
            return f"Grad-CAM (branch level {self.layer})"
        return f"integrated gradients ({self.steps} steps, {self.smooth_px:g} px smoothing)"

    def maps(self, model: nn.Module, x: Tensor) -> np.ndarray:
        """Maps [N, n_windows, H, W] in [0, 1] for model input ``x`` [N, C, H, W]."""
        if self.method == "gradcam":
            return grad_cam(model, x, layer=self.layer)
        if self.method == "integrated_gradients":
            return integrated_gradients(model, x, steps=self.steps, smooth_px=self.smooth_px)
        raise ValueError(f"unknown attribution method {self.method!r}: integrated_gradients or gradcam")


@dataclass(frozen=True)
class PointingGame:
    """The pointing game over slices with a lesion: ``hits`` of ``slices`` had a map's peak on the
    lesion; ``blank`` maps (no positive evidence anywhere) count as misses."""

    hits: int
    slices: int
    blank: int
    #: mean share of the map's mass inside the lesion (the best window's), None without slices
    mean_inside_fraction: float | None

    @property
    def rate(self) -> float | None:
        return self.hits / self.slices if self.slices else None


def pointing_game(model: nn.Module, images: np.ndarray, masks: Sequence[np.ndarray], *, tolerance: float,
                  attribution: Attribution = Attribution(), batch: int = 4) -> PointingGame:
    """Evidence maps (``attribution``) of uint8 model inputs ``images`` [N, C, H, W] against their
    lesion masks [H, W]: a hit when any window's map peaks within ``tolerance`` pixels of the lesion.
    ``batch`` images a pass bounds the memory. Slices with an empty mask cannot be judged: an error."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images and {len(masks)} masks")
    if any(not np.any(m) for m in masks):
        raise ValueError("an empty lesion mask: the pointing game needs a lesion on every slice")
    hits, blank, inside = 0, 0, []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(uint8_to_centred(np.asarray(images[start : start + batch])))
        for cam, mask in zip(attribution.maps(model, x), masks[start : start + batch], strict=True):
            blank += int(not cam.any())
            hits += any(peak_on_lesion(c, mask, tolerance) for c in cam)
            inside.append(max(inside_fraction(c, mask) or 0.0 for c in cam))
    return PointingGame(hits, len(masks), blank, float(np.mean(inside)) if inside else None)


def _checked(cam: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cam`` as float and ``mask`` as bool, of the same shape."""
    cam, mask = np.asarray(cam, float), np.asarray(mask, bool)
    if cam.shape != mask.shape:
        raise ValueError(f"cam {cam.shape} and mask {mask.shape} differ in shape")
    return cam, mask


def inside_fraction(cam: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of the heat map's mass inside ``mask``; None when the mask is empty or the map is zero."""
    cam, mask = _checked(cam, mask)
    total = cam.sum()
    if not mask.any() or total <= 0:
        return None
    return float(cam[mask].sum() / total)


def peak_on_lesion(cam: np.ndarray, mask: np.ndarray, tolerance: float) -> bool | None:
    """Whether the heat map's maximum lies within ``tolerance`` pixels of ``mask``; None when the
    mask is empty or the map is zero."""
    cam, mask = _checked(cam, mask)
    if not mask.any() or cam.max() <= 0:
        return None
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    ys, xs = np.nonzero(mask)
    return bool(((ys - y) ** 2 + (xs - x) ** 2).min() <= tolerance**2)


def gradcam_samples(pred: pd.DataFrame, *, stage: int, threshold: float, per_category: int,
                    seed: int = 0) -> pd.DataFrame:
    """A seeded random sample of up to ``per_category`` true positives, false positives and false
    negatives of one stage (stage 2 on true disease slices, as its metrics), with a ``category`` column.
    Indeterminate slices are never sampled: they are neither positive nor negative.

    Random rather than the most confident: the overlays should show what is typical, not the extremes.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    spec = STAGES[stage]
    rows = pred[pred[LABEL].isin(spec.labels)]
    truth, score = rows[LABEL].isin(spec.positive_labels), rows[spec.column]
    positive = score >= threshold
    masks = {"tp": truth & positive, "fp": ~truth & positive, "fn": truth & ~positive}
    rng = np.random.default_rng(seed)
    parts = []
    for category in CATEGORIES:
        candidates = rows[masks[category].to_numpy(bool)]
        take = rng.choice(len(candidates), size=min(per_category, len(candidates)), replace=False)
        parts.append(candidates.iloc[np.sort(take)].assign(category=category))
    return pd.concat(parts).reset_index(drop=True)


def gradcam_summary(items: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per stage and category: overlays, how many had a lesion mask, mean/min/max inside fraction, the
    lesions' mean share of the image (the inside fraction of an even map) and the pointing-game hit rate."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for stage in sorted({int(i["stage"]) for i in items}):
        out[f"stage{stage}"] = {}
        for category in CATEGORIES:
            chosen = [i for i in items if int(i["stage"]) == stage and i["category"] == category]
            fractions = [float(i["inside_fraction"]) for i in chosen if i.get("inside_fraction") is not None]
            areas = [float(i["lesion_area_fraction"]) for i in chosen if i.get("lesion_area_fraction") is not None]
            hits = [bool(i["peak_on_lesion"]) for i in chosen if i.get("peak_on_lesion") is not None]
            out[f"stage{stage}"][category] = {
                "overlays": len(chosen), "with_mask": len(fractions),
                "mean_inside_fraction": float(np.mean(fractions)) if fractions else None,
                "min_inside_fraction": min(fractions) if fractions else None,
                "max_inside_fraction": max(fractions) if fractions else None,
                "mean_lesion_area_fraction": float(np.mean(areas)) if areas else None,
                "peak_on_lesion_rate": float(np.mean(hits)) if hits else None,
            }
    return out


def overlay_png(image: np.ndarray, cam: np.ndarray, path: str | Path, *, mask: np.ndarray | None = None,
                titles: Sequence[str] | None = None, caption: str | None = None) -> None:
    """One panel per window: the window image in grey, the heat map in jet on top, the lesion outline
    (when given) in white. Written with a matplotlib ``Figure`` (no pyplot state)."""
    from matplotlib.figure import Figure

    image, cam = np.asarray(image), np.asarray(cam)
    if image.ndim != 3 or image.shape != cam.shape:
        raise ValueError(f"image {image.shape} and cam {cam.shape} must both be [C, H, W]")
    n = image.shape[0]
    titles = list(titles) if titles is not None else [f"window {i}" for i in range(n)]
    if len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} windows")
    fig = Figure(figsize=(3.2 * n, 3.4 if caption else 3.2), layout="constrained")
    for i, ax in enumerate(fig.subplots(1, n, squeeze=False)[0]):
        ax.imshow(image[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        # opacity follows the heat: cold regions leave the image as it is
        ax.imshow(cam[i], cmap="jet", vmin=0, vmax=1, alpha=0.6 * np.clip(cam[i], 0, 1), interpolation="bilinear")
        if mask is not None and np.any(mask):
            ax.contour(np.asarray(mask, float), levels=[0.5], colors="white", linewidths=1.0)
        ax.set_title(titles[i], fontsize=9)
        ax.set_axis_off()
    if caption:
        fig.suptitle(caption, fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)

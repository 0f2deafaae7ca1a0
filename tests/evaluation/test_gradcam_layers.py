"""Grad-CAM at a chosen level of each branch, and the pointing game over many slices: maps whose
answer is known by construction, every backbone's levels, and the evaluation's use of the setting."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import train_toy_pair
from torch import Tensor, nn

from pe_triage.config import Config, EvalConfig, LoaderConfig, ModelConfig, TrainConfig
from pe_triage.evaluation.evaluate import EvaluationError, evaluate
from pe_triage.evaluation.gradcam import (
    Attribution,
    PointingGame,
    branch_levels,
    cam_level,
    grad_cam,
    pointing_game,
)
from pe_triage.models import BACKBONES, MultiWindowNet, build_model

SIZE = 32


class Bright(nn.Module):
    """Brightness at output stride 4 (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(F.relu(x), 4)


class Mirror(nn.Module):
    """Left-right mirror: the feature stays, its position is lost (as a level that scrambles position)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.flip(x, (3,))


class TwoLevels(nn.Module):
    """Level ``bright`` keeps the bright spot where it is; the output level mirrors it."""

    out_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.bright = Bright()
        self.mirror = Mirror()

    def forward(self, x: Tensor) -> Tensor:
        return self.mirror(self.bright(x))


def mirrored_model() -> MultiWindowNet:
    """One window; the logit rises with mean brightness (avg pooling: the mirror does not change it)."""
    model = MultiWindowNet(lambda _in: TwoLevels(), 1)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.head.bias.zero_()
    return model


def spots(corners: list[tuple[int, int]], *, value: int = 255) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 inputs [N, 1, SIZE, SIZE] just below the window's centre (no brightness after centring)
    with one 8 px spot of ``value`` at each corner, and a mask of each spot."""
    images = np.full((len(corners), 1, SIZE, SIZE), 127, np.uint8)
    masks = []
    for i, (y, x) in enumerate(corners):
        images[i, 0, y : y + 8, x : x + 8] = value
        mask = np.zeros((SIZE, SIZE), bool)
        mask[y : y + 8, x : x + 8] = True
        masks.append(mask)
    return images, masks


def test_the_level_decides_where_the_map_points() -> None:
    """Known answer: the spot is on the left; the output level has it on the right."""
    images, masks = spots([(4, 0), (20, 0)])
    model = mirrored_model()
    at_output = pointing_game(model, images, masks, tolerance=4, attribution=Attribution("gradcam", layer="output"))
    before = pointing_game(model, images, masks, tolerance=4, attribution=Attribution("gradcam", layer="penultimate"))
    assert (at_output.hits, at_output.slices, at_output.blank) == (0, 2, 0)
    assert at_output.mean_inside_fraction is not None and at_output.mean_inside_fraction < 0.05  # bilinear bleed only
    assert before.hits == 2 and before.rate == 1.0
    assert before.mean_inside_fraction is not None and before.mean_inside_fraction > 0.5 > 5 * masks[0].mean()
    by_name = pointing_game(model, images, masks, tolerance=4, attribution=Attribution("gradcam", layer="bright"))
    assert by_name == before


def test_pointing_game_counts_hits_misses_and_blank_maps() -> None:
    images, masks = spots([(0, 0), (12, 12), (24, 0)])
    masks[2] = np.roll(masks[2], 16, axis=1)  # the third lesion lies 16 px right of where the evidence is
    dark, dark_mask = spots([(0, 0)], value=0)  # no brightness anywhere: a blank map, a miss
    game = pointing_game(mirrored_model(), np.concatenate([images, dark]), [*masks, *dark_mask], tolerance=4,
                         attribution=Attribution("gradcam", layer="penultimate"), batch=2)
    assert (game.hits, game.slices, game.blank) == (2, 4, 1)
    assert game.rate == 0.5
    assert pointing_game(mirrored_model(), images[:0], [], tolerance=4) == PointingGame(0, 0, 0, None)
    assert PointingGame(0, 0, 0, None).rate is None


def test_pointing_game_refuses_what_it_cannot_judge() -> None:
    images, masks = spots([(0, 0), (8, 8)])
    with pytest.raises(ValueError, match="2 images and 1 masks"):
        pointing_game(mirrored_model(), images, masks[:1], tolerance=4)
    with pytest.raises(ValueError, match="empty lesion mask"):
        pointing_game(mirrored_model(), images, [masks[0], np.zeros_like(masks[1])], tolerance=4)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_backbone_names_its_levels(arch: str) -> None:
    branch = build_model(ModelConfig(arch=arch, width=0.125, min_channels=4), n_windows=1).branches[0]
    levels = branch_levels(branch)
    expected = {"drn": ("layer7", 9), "res": ("layer3", 5), "pla": ("conv6", 7)}
    name, count = expected[arch.removeprefix("cbam_")[:3]]
    assert len(levels) == count and cam_level(branch, "penultimate") is levels[name]
    assert cam_level(branch, "output") is branch
    with pytest.raises(ValueError, match=rf"'nope'.*{name}"):
        cam_level(branch, "nope")


def test_a_branch_without_levels_has_only_its_output() -> None:
    with pytest.raises(ValueError, match="'penultimate'.* levels \\[\\] \\(or output\\)"):
        cam_level(Bright(), "penultimate")


@pytest.mark.parametrize("fusion", ["branches", "shared", "stacked"])
@pytest.mark.parametrize("arch", ["cbam_drn_d_22", "resnet50", "plain_cnn"])
def test_one_map_per_window_at_any_level_and_slices_per_window(arch: str, fusion: str) -> None:
    torch.manual_seed(0)
    model = MultiWindowNet(lambda c: BACKBONES[arch](in_channels=c, width=0.125, min_channels=4), 2, fusion=fusion,
                           slices_per_window=3)  # type: ignore[arg-type]
    x = torch.randn(2, 6, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for layer in ("output", "penultimate"):
        cam = grad_cam(model, x, layer=layer)
        assert cam.shape == (2, 2, SIZE, SIZE) and cam.min() >= 0 and cam.max() <= 1
        if fusion == "stacked":
            np.testing.assert_array_equal(cam[:, 0], cam[:, 1])


def test_evaluate_names_an_unknown_level_before_scoring(tmp_path: Path) -> None:
    config = Config(model=ModelConfig(arch="plain_cnn", width=0.25), loader=LoaderConfig(augment=False),
                    train=TrainConfig(windows=("vascular", "lung"), epochs=1, batch_size=8, num_workers=0,
                                      samples_per_epoch=16, patience=0),
                    evaluate=EvalConfig(bootstrap=0, gradcam_per_category=1, attribution="gradcam", gradcam_layer="layer7"))
    windows, splits, stage1, stage2 = train_toy_pair(tmp_path, config)
    out = tmp_path / "eval"
    with pytest.raises(EvaluationError, match=r"stage 1 model, evaluate.gradcam_layer: .*'layer7'.*conv1"):
        evaluate(stage1, stage2, windows, splits, str(out), config=config)
    assert not out.exists()
    ok = replace(config, evaluate=replace(config.evaluate, gradcam_layer="conv7"))
    evaluate(stage1, stage2, windows, splits, str(out), config=ok)
    assert list((out / "gradcam").glob("stage*.png"))

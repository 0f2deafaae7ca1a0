"""Integrated gradients, the default evidence map: it finds the evidence where a late level has moved
it (Grad-CAM does not), keeps one map per window, leaves the model as it was, and is what the
evaluation and its report use unless Grad-CAM is configured."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import train_toy_pair
from test_gradcam import controlled_model, squares
from test_gradcam_layers import mirrored_model, spots

from pe_triage.config import (
    Config,
    ConfigError,
    EvalConfig,
    LoaderConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from pe_triage.evaluation.evaluate import evaluate
from pe_triage.evaluation.gradcam import Attribution, inside_fraction, integrated_gradients, pointing_game
from pe_triage.models import build_model


def test_integrated_gradients_point_where_grad_cam_at_a_scrambling_level_cannot() -> None:
    """Known answer: the output level mirrors the spot; the input's own attribution does not move."""
    images, masks = spots([(4, 0), (20, 0), (12, 24)])
    model = mirrored_model()
    assert pointing_game(model, images, masks, tolerance=4, attribution=Attribution("gradcam", layer="output")).hits == 0
    game = pointing_game(model, images, masks, tolerance=4)
    assert (game.hits, game.slices, game.blank) == (3, 3, 0)
    assert game.mean_inside_fraction is not None and game.mean_inside_fraction > 0.5


def test_one_map_per_window_on_its_own_evidence() -> None:
    x, bright, dark = squares()
    maps = integrated_gradients(controlled_model([1.0, -1.0, -1.0, 1.0]), x, steps=8)
    assert maps.shape == (1, 2, *bright.shape) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() == pytest.approx(1.0)
    # the faint noise of the other pixels carries a little evidence too: most of the mass, not all
    assert inside_fraction(maps[0, 0], bright) > 0.7 > 10 * bright.mean()
    assert inside_fraction(maps[0, 1], dark) > 0.7
    # evidence against the positive class draws nothing: a model that any contrast makes less positive
    assert not integrated_gradients(controlled_model([-1.0, -1.0, -1.0, -1.0]), x).any()


def test_neighbouring_slices_add_into_their_window_and_the_model_is_left_as_it_was() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cbam_drn_d_22", width=0.125, min_channels=4, context=1), n_windows=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 6, 32, 32, generator=torch.Generator().manual_seed(1))
    maps = integrated_gradients(model, x, steps=4, smooth_px=0)
    assert maps.shape == (3, 2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_method_is_a_validated_setting(tmp_path: Path) -> None:
    assert EvalConfig().attribution == "integrated_gradients"
    assert Attribution.of(EvalConfig(attribution="gradcam", gradcam_layer="layer6")) == Attribution("gradcam", "layer6")
    with pytest.raises(ConfigError, match="attribution"):
        EvalConfig(attribution="occlusion")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="attribution_steps"):
        EvalConfig(attribution_steps=0)
    path = tmp_path / "c.yaml"
    path.write_text("evaluate:\n  attribution: gradcam\n  attribution_smooth_px: 4\n")
    assert Attribution.of(load_config(path).evaluate) == Attribution("gradcam", smooth_px=4.0)


@pytest.mark.slow
def test_evaluate_draws_and_names_the_configured_maps(tmp_path: Path) -> None:
    config = Config(model=ModelConfig(arch="plain_cnn", width=0.25), loader=LoaderConfig(augment=False),
                    train=TrainConfig(windows=("vascular", "lung"), epochs=1, batch_size=8, num_workers=0,
                                      samples_per_epoch=16, patience=0),
                    evaluate=EvalConfig(bootstrap=0, gradcam_per_category=1, attribution_steps=2))
    windows, splits, stage1, stage2 = train_toy_pair(tmp_path, config)
    for method in ("integrated_gradients", "gradcam"):
        out = tmp_path / method
        chosen = replace(config, evaluate=replace(config.evaluate, attribution=method))
        evaluate(stage1, stage2, windows, splits, str(out), config=chosen)
        assert list((out / "gradcam").glob("stage*.png"))
        summary = json.loads((out / "metrics.json").read_text())["gradcam"]
        assert summary["stage1"]["tp"]["overlays"] + summary["stage1"]["fn"]["overlays"] >= 1
        label = "integrated gradients (2 steps" if method == "integrated_gradients" else "Grad-CAM (branch level penultimate)"
        assert label in (out / "report.md").read_text()

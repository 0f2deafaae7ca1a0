"""Grad-CAM: a model with a known response puts the heat on the lesion; the real model keeps its state."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pe_triage.config import ModelConfig
from pe_triage.evaluation import (
    grad_cam,
    gradcam_samples,
    gradcam_summary,
    inside_fraction,
    overlay_png,
    peak_on_lesion,
)
from pe_triage.models import MultiWindowNet, build_model

SIZE = 64


class BrightDark(nn.Module):
    """Two feature maps at output stride 4: brightness and darkness (no parameters: a frozen branch)."""

    out_channels = 2

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(torch.cat([F.relu(x), F.relu(-x)], 1), 4)


def controlled_model(head: list[float]) -> MultiWindowNet:
    """Head over [bright0, dark0, bright1, dark1]: the logit's evidence is known per window."""
    model = MultiWindowNet(lambda _in_channels: BrightDark(), 2, pooling="avg")
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([head]))
        model.head.bias.zero_()
    return model


def squares() -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Window 0: a bright square at (8, 8); window 1: a dark square at (40, 36); faint noise."""
    x = torch.randn(1, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 0.01
    bright, dark = np.zeros((SIZE, SIZE), bool), np.zeros((SIZE, SIZE), bool)
    bright[8:24, 8:24] = True
    dark[40:56, 36:52] = True
    x[0, 0][torch.from_numpy(bright)] += 1.0
    x[0, 1][torch.from_numpy(dark)] -= 1.0
    return x, bright, dark


def test_heat_sits_on_the_evidence_of_each_window() -> None:
    x, bright, dark = squares()
    cam = grad_cam(controlled_model([1.0, -1.0, -1.0, 1.0]), x)  # window 0 looks for bright, window 1 for dark
    area = bright.mean()
    assert inside_fraction(cam[0, 0], bright) > 0.8 > 10 * area
    assert inside_fraction(cam[0, 1], dark) > 0.8
    assert inside_fraction(cam[0, 0], dark) < 0.05  # the other window's lesion gets nothing
    assert cam[0, 0][bright].mean() > 20 * cam[0, 0][~bright].mean()


def test_negative_evidence_gives_an_empty_map() -> None:
    x, bright, _ = squares()
    cam = grad_cam(controlled_model([-1.0, 0.0, 0.0, 0.0]), x)
    assert not cam[0, 0].any()
    assert inside_fraction(cam[0, 0], bright) is None


@pytest.fixture(scope="module")
def drn() -> MultiWindowNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="cbam_drn_d_22", width=0.125), n_windows=2)


def test_real_model_shape_range_and_no_state_change(drn: MultiWindowNet) -> None:
    drn.train()
    drn.head.weight.requires_grad_(False)  # a partly frozen model stays partly frozen
    before = {k: v.clone() for k, v in drn.state_dict().items()}
    flags = [p.requires_grad for p in drn.parameters()]
    x = torch.randn(2, 2, 40, 48)
    cam = grad_cam(drn, x)
    assert cam.shape == (2, 2, 40, 48) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1
    assert all(m.max() in (0.0, 1.0) for m in cam.reshape(4, -1))  # each map scaled on its own
    assert drn.training
    assert [p.requires_grad for p in drn.parameters()] == flags
    assert all(p.grad is None for p in drn.parameters())
    assert not x.requires_grad
    after = drn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # eval mode: no BatchNorm statistics update
    drn.head.weight.requires_grad_(True)


def test_real_model_maps_are_per_sample_and_per_branch(drn: MultiWindowNet) -> None:
    x = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    cam = grad_cam(drn, x)
    other = x[:1].clone()
    other[:, 1] = torch.randn(32, 32)
    alone = grad_cam(drn, other)
    # the batch does not mix samples, and (a linear head) window 0's map ignores window 1's input
    assert cam[0, 0].max() == 1.0
    np.testing.assert_allclose(alone[:, 0], cam[:1, 0], atol=1e-5)


def test_a_stacked_model_shows_its_one_map_on_every_window() -> None:
    torch.manual_seed(0)
    stacked = build_model(ModelConfig(arch="cbam_drn_d_22", width=0.125, fusion="stacked"), n_windows=2)
    cam = grad_cam(stacked, torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert cam.shape == (3, 2, 32, 32)
    np.testing.assert_array_equal(cam[:, 0], cam[:, 1])


def test_inside_fraction() -> None:
    cam = np.zeros((4, 4))
    cam[0, 0], cam[3, 3] = 3.0, 1.0
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    assert inside_fraction(cam, mask) == pytest.approx(0.75)
    assert inside_fraction(cam, np.zeros((4, 4), bool)) is None
    assert inside_fraction(np.zeros((4, 4)), mask) is None
    with pytest.raises(ValueError, match="shape"):
        inside_fraction(cam, mask[:2])


def test_peak_on_lesion_is_the_pointing_game_with_a_tolerance() -> None:
    mask = np.zeros((16, 16), bool)
    mask[4:6, 4:6] = True
    cam = np.zeros((16, 16))
    cam[5, 5] = 1.0
    assert peak_on_lesion(cam, mask, 0) is True
    cam[5, 5], cam[5, 9] = 0.0, 1.0  # 4 px right of the lesion's edge (column 5)
    assert peak_on_lesion(cam, mask, 3) is False
    assert peak_on_lesion(cam, mask, 4) is True
    cam[12, 12] = 2.0  # only the maximum counts, not where other heat is
    assert peak_on_lesion(cam, mask, 4) is False
    assert peak_on_lesion(cam, np.zeros((16, 16), bool), 4) is None
    assert peak_on_lesion(np.zeros((16, 16)), mask, 4) is None
    with pytest.raises(ValueError, match="shape"):
        peak_on_lesion(cam, mask[:8], 4)


def test_overlay_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, bright, _ = squares()
    cam = grad_cam(controlled_model([1.0, -1.0, -1.0, 1.0]), x)[0]
    image = (np.clip(x[0].numpy() + 0.5, 0, 1) * 255).astype(np.uint8)
    path = tmp_path / "sub" / "cam.png"
    overlay_png(image, cam, path, mask=bright, titles=["vascular", "lung"], caption="stage 1, tp")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="titles"):
        overlay_png(image, cam, tmp_path / "x.png", titles=["one"])


def test_gradcam_samples_pick_each_category_of_each_stage() -> None:
    pred = pd.DataFrame({
        "label": ["wnl", "wnl", "pe", "pe", "other", "other", "pe"],
        "p_disease": [.9, .1, .8, .2, .7, .6, .9],
        "p_pe": [.9, .9, .9, .1, .8, .1, .2],
    })
    s1 = gradcam_samples(pred, stage=1, threshold=.5, per_category=5)
    assert sorted(s1.groupby("category").size().items()) == [("fn", 1), ("fp", 1), ("tp", 4)]
    assert (s1.loc[s1["category"] == "fp", "label"] == "wnl").all()
    s2 = gradcam_samples(pred, stage=2, threshold=.5, per_category=1, seed=1)
    assert list(s2["category"]) == ["tp", "fp", "fn"]
    assert (s2["label"] != "wnl").all() and s2.loc[s2["category"] == "fp", "label"].item() == "other"
    pd.testing.assert_frame_equal(s2, gradcam_samples(pred, stage=2, threshold=.5, per_category=1, seed=1))


def test_gradcam_samples_never_pick_indeterminate_slices() -> None:
    pred = pd.DataFrame({"label": ["wnl", "pe", "indeterminate", "indeterminate"], "p_disease": [.9, .8, .9, .1],
                         "p_pe": [.9, .2, .9, .1]})
    for stage in (1, 2):
        assert "indeterminate" not in set(gradcam_samples(pred, stage=stage, threshold=.5, per_category=5)["label"])


def test_gradcam_summary() -> None:
    items = [{"stage": 1, "category": "tp", "inside_fraction": 0.6, "lesion_area_fraction": 0.01, "peak_on_lesion": True},
             {"stage": 1, "category": "tp", "inside_fraction": 0.8, "lesion_area_fraction": 0.03, "peak_on_lesion": False},
             {"stage": 1, "category": "tp", "inside_fraction": 0.7, "lesion_area_fraction": 0.02, "peak_on_lesion": True},
             {"stage": 1, "category": "fp", "inside_fraction": None}]
    s = gradcam_summary(items)
    assert list(s) == ["stage1"]
    assert s["stage1"]["tp"] == {"overlays": 3, "with_mask": 3, "mean_inside_fraction": pytest.approx(0.7),
                                 "min_inside_fraction": 0.6, "max_inside_fraction": 0.8,
                                 "mean_lesion_area_fraction": pytest.approx(0.02), "peak_on_lesion_rate": pytest.approx(2 / 3)}
    assert s["stage1"]["fp"]["mean_inside_fraction"] is None and s["stage1"]["fp"]["peak_on_lesion_rate"] is None
    assert s["stage1"]["fn"]["overlays"] == 0

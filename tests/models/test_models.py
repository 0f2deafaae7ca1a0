"""Model builders: shapes, output stride, CBAM gating, branches, parameter counts of the reference designs."""

from __future__ import annotations

import pytest
import torch

from pe_triage.config import ConfigError, ModelConfig
from pe_triage.models import BACKBONES, build_model, drn_d_22, drn_d_54, parameter_count, plain_cnn, resnet50
from pe_triage.models.blocks import CBAM, ChannelAttention, SpatialAttention
from pe_triage.models.multiwindow import global_pool


@pytest.mark.parametrize(("builder", "cbam", "millions"), [
    (drn_d_54, False, 35.29),  # the reference DRN-D-54 with one input channel (PERF-NOTES: 35.3 M)
    (drn_d_54, True, 37.81),  # CBAMDRN (PERF-NOTES: 37.8 M)
    (resnet50, False, 23.50),  # the study's baseline (PERF-NOTES: 23.5 M)
])
def test_full_width_parameter_counts_match_the_reference_designs(builder, cbam: bool, millions: float) -> None:  # type: ignore[no-untyped-def]
    assert parameter_count(builder(cbam=cbam)) / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_architecture_builds_small_and_classifies(arch: str) -> None:
    model = build_model(ModelConfig(arch=arch, width=0.125), n_windows=2).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 2, 64, 64)).shape == (3, 1)


def test_drn_output_stride_is_8_and_resnet_32() -> None:
    x = torch.randn(1, 1, 96, 128)
    assert drn_d_22(width=0.25)(x).shape[2:] == (12, 16)
    assert drn_d_54(width=0.125, cbam=True)(x).shape[2:] == (12, 16)
    assert resnet50(width=0.125)(x).shape[2:] == (3, 4)


def test_any_number_of_input_channels() -> None:
    assert drn_d_22(in_channels=3, width=0.25)(torch.randn(1, 3, 32, 32)).shape[1] == 128


def test_cbam_gates_are_in_0_1_and_change_the_features() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    channel, spatial = ChannelAttention(32)(x), SpatialAttention()(x)
    assert channel.shape == (2, 32, 1, 1) and spatial.shape == (2, 1, 8, 8)
    for gate in (channel, spatial):
        assert gate.min() > 0 and gate.max() < 1
    out = CBAM(32)(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert torch.all(out.abs() <= x.abs() + 1e-6)  # a gate only attenuates


@pytest.mark.parametrize(("fusion", "branches"), [("branches", 3), ("shared", 1), ("stacked", 1)])
def test_gradients_reach_every_branch(fusion: str, branches: int) -> None:
    model = build_model(ModelConfig(arch="cbam_drn_d_22", width=0.125, fusion=fusion), n_windows=3)
    assert len(model.branches) == branches
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for branch in model.branches:
        first = next(branch.parameters())
        assert first.grad is not None and first.grad.abs().sum() > 0


def test_stacked_fusion_sees_every_window_in_its_first_filters() -> None:
    model = build_model(ModelConfig(arch="cbam_drn_d_22", width=0.125, fusion="stacked"), n_windows=3)
    assert model.branches[0].layer0[0].in_channels == 3
    assert len(model.features(torch.randn(1, 3, 32, 32))) == 1 and model.head.in_features == 64


def test_the_channel_floor_widens_small_models_and_leaves_the_reference_alone() -> None:
    thin, floored = drn_d_22(width=0.125, min_channels=4), drn_d_22(width=0.125)
    assert [thin.layer0[0].out_channels, thin.layer2[0].out_channels, thin.layer3[0].conv1.out_channels] == [4, 4, 8]
    assert [floored.layer0[0].out_channels, floored.layer2[0].out_channels, floored.layer3[0].conv1.out_channels] == [16, 16, 16]
    assert floored.out_channels == thin.out_channels == 64
    assert parameter_count(drn_d_54(min_channels=16)) == parameter_count(drn_d_54(min_channels=1))


def test_plain_baseline_has_output_stride_8_and_no_cbam() -> None:
    assert plain_cnn(in_channels=2)(torch.randn(1, 2, 64, 96)).shape == (1, 128, 8, 12)
    with pytest.raises(ValueError, match="no residual blocks"):
        plain_cnn(cbam=True)


def test_separate_branches_give_each_window_its_own_filters() -> None:
    model = build_model(ModelConfig(arch="drn_d_22", width=0.125), n_windows=2)
    a, b = (next(branch.parameters()) for branch in model.branches)
    assert a.data_ptr() != b.data_ptr()


@pytest.mark.parametrize(("pooling", "features"), [("avg", 128), ("max", 128), ("avgmax", 256)])
def test_pooling_sets_the_head_width(pooling: str, features: int) -> None:
    model = build_model(ModelConfig(arch="drn_d_22", width=0.125, pooling=pooling), n_windows=2)
    assert model.head.in_features == features


def test_max_pooling_keeps_a_one_cell_finding_that_average_pooling_dilutes() -> None:
    """Why max pooling is offered: a lesion lighting one cell of a 16x16 map moves the max fully."""
    f = torch.zeros(1, 4, 16, 16)
    f[0, :, 5, 7] = 1.0
    avg, mx = (t.flatten() for t in global_pool(f, "avgmax"))
    assert torch.allclose(mx, torch.ones(4)) and torch.allclose(avg, torch.full((4,), 1 / 256))


def test_mistakes_are_named() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'drn_d_105'"):
        build_model(ModelConfig(arch="drn_d_105"), n_windows=2)
    with pytest.raises(ConfigError, match="ModelConfig.fusion: 'early' is not one of"):
        ModelConfig(arch="drn_d_22", width=0.125, fusion="early")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ModelConfig.pooling: 'sum' is not one of"):
        ModelConfig(arch="drn_d_22", width=0.125, pooling="sum")  # type: ignore[arg-type]
    model = build_model(ModelConfig(arch="drn_d_22", width=0.125), n_windows=2)
    with pytest.raises(ValueError, match="input has 3 channels, the model was built for 2 window"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(("fusion", "first_filters"), [("branches", 3), ("shared", 3), ("stacked", 6)])
def test_context_gives_each_window_branch_its_slices(fusion: str, first_filters: int) -> None:
    model = build_model(ModelConfig(arch="cbam_drn_d_22", width=0.125, fusion=fusion, context=1), n_windows=2)
    assert model.slices_per_window == 3 and model.n_windows == 2
    assert model.branches[0].layer0[0].in_channels == first_filters
    x = torch.randn(2, 6, 32, 32)
    assert model(x).shape == (2, 1)
    if fusion == "branches":  # window 1's branch reads channels 3..5 (window-major), not 1..3
        seen = []
        hook = model.branches[1].register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
        model(x)
        hook.remove()
        assert torch.equal(seen[0], x[:, 3:6])
    with pytest.raises(ValueError, match="input has 2 channels, the model was built for 2 window"):
        model(torch.randn(1, 2, 32, 32))


def test_context_is_bounded() -> None:
    with pytest.raises(ConfigError, match="model.context -1"):
        ModelConfig(context=-1)
    assert ModelConfig(context=2).slices_per_window == 5

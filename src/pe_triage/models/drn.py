"""Dilated residual networks, DRN-D (Yu, Koltun, Funkhouser, CVPR 2017), any number of input channels.

No max-pool: the stride stops at 8 and the last two residual levels are dilated (2 and 4) instead,
keeping the spatial detail a small filling defect needs; two plain convolution levels (dilation 2
then 1) remove the gridding that dilation leaves.
"""

from __future__ import annotations

from torch import Tensor, nn

from pe_triage.models.blocks import BasicBlock, Bottleneck, init_weights, residual_level, scaled_channels

#: channels of levels 1-8 (the reference DRN-D)
CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)


def _convs(cin: int, cout: int, n: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, stride=stride if i == 0 else 1, padding=dilation,
                             dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DRN(nn.Module):
    """Feature extractor: [B, in_channels, H, W] -> [B, out_channels, H/8, W/8].

    ``width`` scales every level's channels, never below ``min_channels``: the reference's smallest
    level has 16, so the floor leaves the full-width model as designed, while at width 0.125 it keeps
    the full-resolution levels at 16 filters instead of 2-4, too few to learn the edges every later
    level builds on (measured: see ``benchmarks/learning.py``).
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], *, in_channels: int = 1,
                 width: float = 1.0, min_channels: int = 16, cbam: bool = False) -> None:
        super().__init__()
        ch = [scaled_channels(c, width, min_channels) for c in CHANNELS]
        e = block.expansion
        self.layer0 = nn.Sequential(nn.Conv2d(in_channels, ch[0], 7, padding=3, bias=False), nn.BatchNorm2d(ch[0]),
                                    nn.ReLU(inplace=True))
        self.layer1 = _convs(ch[0], ch[0], layers[0])
        self.layer2 = _convs(ch[0], ch[1], layers[1], stride=2)
        self.layer3 = residual_level(block, ch[1], ch[2], layers[2], stride=2, cbam=cbam)
        self.layer4 = residual_level(block, ch[2] * e, ch[3], layers[3], stride=2, cbam=cbam)
        self.layer5 = residual_level(block, ch[3] * e, ch[4], layers[4], dilation=2, cbam=cbam)
        self.layer6 = residual_level(block, ch[4] * e, ch[5], layers[5], dilation=4, cbam=cbam)
        self.layer7 = _convs(ch[5] * e, ch[6], layers[6], dilation=2)
        self.layer8 = _convs(ch[6], ch[7], layers[7])
        self.out_channels = ch[7]
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        for layer in (self.layer0, self.layer1, self.layer2, self.layer3, self.layer4, self.layer5, self.layer6, self.layer7,
                      self.layer8):
            x = layer(x)
        return x


def drn_d_22(*, in_channels: int = 1, width: float = 1.0, min_channels: int = 16, cbam: bool = False) -> DRN:
    """DRN-D-22 from `Dilated Residual Networks <https://arxiv.org/abs/1705.09914>`_: basic blocks.

    Args:
        in_channels: input channels (1 for a branch that sees one window).
        width: multiplier of every level's channels (1.0 is the reference design).
        min_channels: the fewest channels a level keeps after scaling.
        cbam: CBAM attention at the end of every residual block.
    """
    return DRN(BasicBlock, (1, 1, 2, 2, 2, 2, 1, 1), in_channels=in_channels, width=width, min_channels=min_channels, cbam=cbam)


def drn_d_38(*, in_channels: int = 1, width: float = 1.0, min_channels: int = 16, cbam: bool = False) -> DRN:
    """DRN-D-38 from `Dilated Residual Networks <https://arxiv.org/abs/1705.09914>`_: basic blocks.

    Args:
        in_channels: input channels (1 for a branch that sees one window).
        width: multiplier of every level's channels (1.0 is the reference design).
        min_channels: the fewest channels a level keeps after scaling.
        cbam: CBAM attention at the end of every residual block.
    """
    return DRN(BasicBlock, (1, 1, 3, 4, 6, 3, 1, 1), in_channels=in_channels, width=width, min_channels=min_channels, cbam=cbam)


def drn_d_54(*, in_channels: int = 1, width: float = 1.0, min_channels: int = 16, cbam: bool = False) -> DRN:
    """DRN-D-54 from `Dilated Residual Networks <https://arxiv.org/abs/1705.09914>`_: bottleneck blocks;
    with ``cbam=True`` the study's CBAMDRN.

    Args:
        in_channels: input channels (1 for a branch that sees one window).
        width: multiplier of every level's channels (1.0 is the reference design).
        min_channels: the fewest channels a level keeps after scaling.
        cbam: CBAM attention at the end of every residual block.
    """
    return DRN(Bottleneck, (1, 1, 3, 4, 6, 3, 1, 1), in_channels=in_channels, width=width, min_channels=min_channels, cbam=cbam)

"""A plain convolutional baseline: seven conv3x3-BN-ReLU layers, output stride 8, no residuals.

Not the study's model: the yardstick a small CBAMDRN is held to on CPU (if the study's design cannot
match a plain CNN of the same size at equal samples, the design has a fault at that scale).
"""

from __future__ import annotations

from torch import Tensor, nn

from pe_triage.models.blocks import init_weights, scaled_channels

#: channels of the seven layers; stride 2 at layers 2, 4 and 6
CHANNELS = (16, 32, 32, 64, 64, 128, 128)
STRIDES = (1, 2, 1, 2, 1, 2, 1)


class PlainCNN(nn.Module):
    """Feature extractor: [B, in_channels, H, W] -> [B, out_channels, H/8, W/8]."""

    def __init__(self, *, in_channels: int = 1, width: float = 1.0, min_channels: int = 16, cbam: bool = False) -> None:
        super().__init__()
        if cbam:
            raise ValueError("the plain baseline has no residual blocks to attach CBAM to")
        layers: list[nn.Module] = []
        cin = in_channels
        for c, stride in zip(CHANNELS, STRIDES, strict=True):
            cout = scaled_channels(c, width, min_channels)
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_channels = cin
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def plain_cnn(*, in_channels: int = 1, width: float = 1.0, min_channels: int = 16, cbam: bool = False) -> PlainCNN:
    """The plain baseline: seven conv3x3-BN-ReLU layers, output stride 8.

    Args:
        in_channels: input channels (1 for a branch that sees one window).
        width: multiplier of every layer's channels.
        min_channels: the fewest channels a layer keeps after scaling.
        cbam: must be False; accepted so every builder takes the same arguments.
    """
    return PlainCNN(in_channels=in_channels, width=width, min_channels=min_channels, cbam=cbam)

"""ResNet (He et al. 2016), the study's baseline, as a feature extractor with any input channels."""

from __future__ import annotations

from torch import Tensor, nn

from pe_triage.models.blocks import BasicBlock, Bottleneck, init_weights, residual_level, scaled_channels


class ResNet(nn.Module):
    """[B, in_channels, H, W] -> [B, out_channels, H/32, W/32]."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], *, in_channels: int = 1,
                 width: float = 1.0, min_channels: int = 16, cbam: bool = False) -> None:
        super().__init__()
        stem = scaled_channels(64, width, min_channels)
        planes = [scaled_channels(c, width, min_channels) for c in (64, 128, 256, 512)]
        e = block.expansion
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        self.layer1 = residual_level(block, stem, planes[0], layers[0], cbam=cbam)
        self.layer2 = residual_level(block, planes[0] * e, planes[1], layers[1], stride=2, cbam=cbam)
        self.layer3 = residual_level(block, planes[1] * e, planes[2], layers[2], stride=2, cbam=cbam)
        self.layer4 = residual_level(block, planes[2] * e, planes[3], layers[3], stride=2, cbam=cbam)
        self.out_channels = planes[3] * e
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def resnet50(*, in_channels: int = 1, width: float = 1.0, min_channels: int = 16, cbam: bool = False) -> ResNet:
    """ResNet-50 from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`_:
    the study's baseline.

    Args:
        in_channels: input channels (1 for a branch that sees one window).
        width: multiplier of every level's channels (1.0 is the reference design).
        min_channels: the fewest channels a level keeps after scaling.
        cbam: CBAM attention at the end of every residual block.
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels=in_channels, width=width, min_channels=min_channels, cbam=cbam)

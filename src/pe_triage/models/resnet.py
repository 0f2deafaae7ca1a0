"""ResNet (He et al. 2016), the study's baseline, as a feature extractor with any input channels."""

from __future__ import annotations

from torch import Tensor, nn

from pe_triage.models.blocks import BasicBlock, Bottleneck
from pe_triage.models.drn import _init, _scaled


class ResNet(nn.Module):
    """[B, in_channels, H, W] -> [B, out_channels, H/32, W/32]."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], *, in_channels: int = 1,
                 width: float = 1.0, min_channels: int = 16, cbam: bool = False) -> None:
        super().__init__()
        self.cbam = cbam
        self.inplanes = _scaled(64, width, min_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(self.inplanes), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        self.layer1 = self._level(block, _scaled(64, width, min_channels), layers[0])
        self.layer2 = self._level(block, _scaled(128, width, min_channels), layers[1], stride=2)
        self.layer3 = self._level(block, _scaled(256, width, min_channels), layers[2], stride=2)
        self.layer4 = self._level(block, _scaled(512, width, min_channels), layers[3], stride=2)
        self.out_channels = self.inplanes
        _init(self)

    def _level(self, block: type[BasicBlock | Bottleneck], planes: int, n: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, downsample, cbam=self.cbam)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes, cbam=self.cbam) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def resnet50(**kwargs: object) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)  # type: ignore[arg-type]

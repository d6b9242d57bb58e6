"""ResNet-18 at any width: the default backbone of fgdist.backbones (model.width).

A module of its own, at the top level beside fgdist.backbones, so that reading a config (which
checks backbone names through fgdist.backbones) imports no torch: fgdist.backbones imports this
only when it builds the network.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class NarrowResNet18(nn.Module):
    """ResNet-18 with `width` channels in its first stage (64 in torchvision's), so that CPU
    experiments can trade capacity for speed; d = 8 * width. Same blocks, same depth."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, inplanes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            down = (
                None
                if stride == 1 and inplanes == planes
                else nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            )
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

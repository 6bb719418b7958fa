"""ResNet-50 for 224x224 ImageNet-shaped images (He et al. 2016, table 1), written
here so the real-size benchmark needs no torchvision.

Bottleneck blocks [3, 4, 6, 3], widths 64..512 (outputs 256..2048), 25.6 M
parameters with 1000 classes. Of its 16 blocks, the 12 without a projection
shortcut are prunable residual units; the first block of each stage is not.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet_cifar import shortcut

STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3-BN-ReLU (the stride sits here), conv1x1-BN, plus
    the shortcut, then ReLU. The shortcut is a 1x1 conv + BN projection where
    the block changes shape, else the identity."""

    def __init__(self, in_channels: int, width: int, *, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 with random, deterministic weights (`seed`), for evaluation-mode use.

    Keyword arguments:
        num_classes: size of the linear head (default 1000).
        image_size: side of the square input used by `example_inputs` (default 224).
        residual_scale: initial scale of every block's last BN (default 0.2).
            BatchNorm keeps its default statistics (mean 0, variance 1), so
            in evaluation mode it only scales; convs are He-initialised for
            the forward pass (fan_in), so a branch keeps its input's scale,
            and a last-BN scale of 0.2 adds about 4% of the stream's
            variance per block: the activations neither explode nor vanish
            over the 16 blocks (Goyal et al. 2017 start it at zero).
        seed: seed of the weights' generator (default 0); the global torch
            random state is left alone.
    """

    def __init__(self, *, num_classes: int = 1000, image_size: int = 224, residual_scale: float = 0.2,
                 seed: int = 0) -> None:
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, channels = [], 64
        for index, (blocks, width) in enumerate(zip(STAGE_BLOCKS, STAGE_WIDTHS)):
            stride = 1 if index == 0 else 2
            stage = [Bottleneck(channels, width, stride=stride)]
            channels = width * EXPANSION
            stage += [Bottleneck(channels, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights(residual_scale, torch.Generator().manual_seed(seed))

    def _init_weights(self, residual_scale: float, generator: torch.Generator) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks():
            nn.init.constant_(block.bn3.weight, residual_scale)
        nn.init.normal_(self.fc.weight, std=self.fc.in_features ** -0.5, generator=generator)
        nn.init.zeros_(self.fc.bias)

    def blocks(self) -> list[Bottleneck]:
        """All bottleneck blocks in forward order."""
        return [block for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for block in stage]

    def example_inputs(self) -> tuple[torch.Tensor]:
        """One input of batch size 1, for export and shape checks."""
        return (torch.randn(1, 3, self.image_size, self.image_size),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(**kwargs) -> ResNet50:
    """ResNet-50 in evaluation mode, 1000 classes, random weights (seed 0 unless given)."""
    return ResNet50(**kwargs).eval()

"""CIFAR-style ResNets (He et al. 2016, section 4.2): 6n+2 layers in three stages.

Used as the CNN example for sglp-onnx: each identity BasicBlock is a prunable
residual unit; the two stage-transition blocks (projection shortcut) are not.
"""

from __future__ import annotations

import torch
from torch import nn

DEPTHS = (20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm, whose shift makes it redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """A residual block's skip path: the identity, or a 1x1 conv + BN projection
    where the block changes the shape ("option B" of the ResNet paper)."""
    if stride != 1 or in_channels != out_channels:
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                             nn.BatchNorm2d(out_channels))
    return nn.Identity()


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The shortcut is the identity unless the block changes shape; then it is a
    1x1 conv + BN projection ("option B" of the paper).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    @property
    def has_projection(self) -> bool:
        return not isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet-`depth` for small images: depth = 6n + 2, n BasicBlocks per stage.

    Keyword arguments:
        in_channels: image channels (default 3).
        num_classes: size of the linear head (default 10).
        image_size: side of the square input used by `example_inputs` (default 32).
        zero_init_residual: start each block's last BN scale at zero, so every
            block begins as the identity (Goyal et al. 2017) (default False).
    """

    def __init__(
        self,
        depth: int,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        self.depth = depth
        self.blocks_per_stage = (depth - 2) // 6
        self.in_channels = in_channels
        self.image_size = image_size

        first = STAGE_WIDTHS[0]
        self.conv1 = conv3x3(in_channels, first)
        self.bn1 = nn.BatchNorm2d(first)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        width = first
        for index, out_width in enumerate(STAGE_WIDTHS):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(width, out_width, stride=stride)]
            blocks += [BasicBlock(out_width, out_width) for _ in range(self.blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            width = out_width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for block in self.blocks():
                nn.init.zeros_(block.bn2.weight)

    def blocks(self) -> list[BasicBlock]:
        """All residual blocks in forward order."""
        return [block for stage in (self.layer1, self.layer2, self.layer3) for block in stage]

    def example_inputs(self) -> tuple[torch.Tensor]:
        """One input of batch size 1, for export and shape checks."""
        return (torch.randn(1, self.in_channels, self.image_size, self.image_size),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(**kwargs) -> ResNetCIFAR:
    return ResNetCIFAR(20, **kwargs)


def resnet32(**kwargs) -> ResNetCIFAR:
    return ResNetCIFAR(32, **kwargs)


def resnet44(**kwargs) -> ResNetCIFAR:
    return ResNetCIFAR(44, **kwargs)


def resnet56(**kwargs) -> ResNetCIFAR:
    return ResNetCIFAR(56, **kwargs)


def resnet110(**kwargs) -> ResNetCIFAR:
    return ResNetCIFAR(110, **kwargs)


def resnet56_digits() -> ResNetCIFAR:
    """ResNet-56 for the 8x8 grey scikit-learn digits (the committed example model)."""
    return ResNetCIFAR(56, in_channels=1, num_classes=10, image_size=8)


def resnet110_digits() -> ResNetCIFAR:
    """ResNet-110 for the 8x8 grey scikit-learn digits."""
    return ResNetCIFAR(110, in_channels=1, num_classes=10, image_size=8)

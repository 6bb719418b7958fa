"""Residual 1-D CNN for modulation recognition on I/Q frames (the SGLP paper's 1-D setting).

Stages of basic residual blocks over (batch, 2, 128) inputs. Every block
inside a stage is an identity block `relu(x + f(x))`, the unit that
sglp-onnx can remove; the first block of each later stage halves the length
and widens the channels through a 1x1 projection, so it is not removable.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock1d(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus a skip, then ReLU.

    With `stride == 1` and equal widths the skip is the identity; otherwise a
    strided 1x1 convolution with BN projects the input to the output shape.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm1d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    @property
    def is_identity(self) -> bool:
        """True when the block maps x to x + f(x) with an identity skip, so it can be removed."""
        return isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet1d(nn.Module):
    """Stem, `len(widths)` stages of `blocks_per_stage` residual blocks, global average pool, linear head."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 2,
        frame_len: int = 128,
        widths: tuple[int, ...] = (16, 32, 48),
        blocks_per_stage: int = 6,
        stem_kernel: int = 7,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.frame_len = frame_len
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, widths[0], stem_kernel, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm1d(widths[0]),
            nn.ReLU(),
        )
        stages = []
        prev = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [ResidualBlock1d(prev, width, stride=stride, kernel_size=kernel_size)]
            blocks += [ResidualBlock1d(width, width, kernel_size=kernel_size) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(prev, num_classes)

    def residual_blocks(self) -> list[ResidualBlock1d]:
        """All residual blocks in forward order, projection blocks included."""
        return [m for m in self.modules() if isinstance(m, ResidualBlock1d)]

    def identity_blocks(self) -> list[ResidualBlock1d]:
        """The removable blocks: identity skip, output shape equal to input shape."""
        return [b for b in self.residual_blocks() if b.is_identity]

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.zeros(1, self.in_channels, self.frame_len),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def cnn1d_radio(num_classes: int = 10) -> ResNet1d:
    """The committed model: widths 16/32/48, 6 blocks per stage: 16 identity blocks and 2 projections."""
    return ResNet1d(num_classes=num_classes)

"""ShiftResNet-20 / 56 / 110 for CIFAR (Wu et al., "Shift: A Zero FLOP, Zero Parameter Alternative
to Spatial Convolutions", CVPR 2018).

The structure and the ``state_dict`` keys follow the official code (github.com/alvinwan/
shiftresnet-cifar): Kuang Liu's CIFAR ResNet (3x3 stem of 16 channels, three stages of 16 / 32 / 64
channels with n blocks each, depth 6n + 2, global average pool, linear) whose blocks are
conv-shift-conv (CSC) blocks with ``expansion * out_channels`` middle channels. The parameter counts
reproduce the published ones (CIFAR-10, millions, expansion 1 / 3 / 6 / 9):

    ShiftResNet20   0.03 / 0.10 / 0.19 / 0.28
    ShiftResNet56   0.10 / 0.29 / 0.58 / 0.87
    ShiftResNet110  0.20 / 0.59 / 1.18 / 1.76

Two deliberate differences from the official code, neither visible in the parameters: the stride of
a downsampling block is taken by the shift instead of the following 1x1 convolution (identical
result, since a 1x1 convolution commutes with subsampling, and 4x less shift output), and shift taps
are assigned to contiguous channel groups instead of round-robin (see ``fastblocks.ops.shift``), so
official checkpoints load but need conv1 / bn1 / conv2 permuted to give the same outputs.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastblocks.nn.shift import Shift
from fastblocks.ops.conv1x1 import run_conv


class CSCBlock(nn.Module):
    """1x1 conv (expansion) -> BN -> ReLU -> shift -> 1x1 conv -> BN, + shortcut, -> ReLU.

    The shortcut is a 1x1 convolution + BN when the stride or the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expansion: float = 1,
                 kernel_size: int = 3, impl: str = "auto"):
        super().__init__()
        mid = int(out_channels * expansion)
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shift = Shift(mid, kernel_size, stride=stride, impl=impl)
        self.conv2 = nn.Conv2d(mid, out_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(run_conv(self.conv1, x)))
        out = self.bn2(run_conv(self.conv2, self.shift(out)))
        return F.relu(out + self.shortcut(x))


class ShiftResNet(nn.Module):
    """CIFAR ResNet of depth 6n + 2 built from CSC blocks."""

    def __init__(self, depth: int = 20, num_classes: int = 10, expansion: float = 1, impl: str = "auto"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_channels = [], 16
        for out_channels, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(n):
                blocks.append(CSCBlock(in_channels, out_channels, stride if b == 0 else 1, expansion, impl=impl))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def shiftresnet20(num_classes: int = 10, expansion: float = 1, impl: str = "auto") -> ShiftResNet:
    return ShiftResNet(20, num_classes, expansion, impl)


def shiftresnet56(num_classes: int = 10, expansion: float = 1, impl: str = "auto") -> ShiftResNet:
    return ShiftResNet(56, num_classes, expansion, impl)


def shiftresnet110(num_classes: int = 10, expansion: float = 1, impl: str = "auto") -> ShiftResNet:
    return ShiftResNet(110, num_classes, expansion, impl)

"""CIFAR ResNets of depth 6n+2 (He et al. 2016, section 4.2), as the ZNorm papers train them.

A 3x3 conv to 16 channels, three stages of n post-activation basic blocks at 16/32/64 channels (stages 2 and
3 start with stride 2), global average pooling and a linear classifier. The shortcut is He et al.'s option A:
identity, or stride-2 subsampling plus zero-padding of the new channels, with no parameters. Kaiming-normal
initialization of conv and linear weights. ``resnet152`` is the papers' n=25 CIFAR variant (2.41 M
parameters), not the ImageNet bottleneck network of the same name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEPTHS", "CifarResNet", "cifar_resnet", "is_cifar_depth"]

# Model name -> depth (6n+2).
DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110, "resnet152": 152}


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        # Option A: subsample spatially, zero-pad the new channels (half before, half after).
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def is_cifar_depth(depth: int) -> bool:
    """Whether a CIFAR ResNet of this depth exists: 6n+2 with n >= 1."""
    return depth >= 8 and (depth - 2) % 6 == 0


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if not is_cifar_depth(depth):
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110, 152, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def cifar_resnet(name_or_depth: str | int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """A CIFAR ResNet by name ("resnet56") or depth (56)."""
    if isinstance(name_or_depth, str):
        if name_or_depth not in DEPTHS:
            raise ValueError(f"unknown model {name_or_depth!r}; choose one of {', '.join(DEPTHS)}")
        name_or_depth = DEPTHS[name_or_depth]
    return CifarResNet(name_or_depth, num_classes, in_channels)

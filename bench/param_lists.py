"""The real parameter lists the benchmarks run on, as lists of shapes (no model weights are needed)."""

from __future__ import annotations

from znorm_kernels.cifar.models import cifar_resnet


def resnet_cifar_shapes(depth: int) -> list[tuple[int, ...]]:
    """Gradient shapes of a CIFAR ResNet of depth 6n+2 (ResNet-56: 167 tensors, 0.85 M elements)."""
    return [tuple(p.shape) for p in cifar_resnet(depth).parameters()]

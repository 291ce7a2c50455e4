"""The CIFAR ResNets: parameter counts of He et al.'s table and the papers' n=25 variant, shapes."""

from __future__ import annotations

import pytest
import torch

from znorm_kernels.cifar.models import cifar_resnet

# (depth, parameters in millions as published, tensors in the gradient list)
COUNTS = [(20, 0.27, 59), (32, 0.46, 95), (44, 0.66, 131), (56, 0.85, 167), (110, 1.7, 329), (152, 2.41, 455)]


@pytest.mark.parametrize(("depth", "millions", "tensors"), COUNTS)
def test_parameter_counts(depth, millions, tensors):
    params = list(cifar_resnet(depth).parameters())
    assert len(params) == tensors
    assert round(sum(p.numel() for p in params) / 1e6, 2 if millions < 1 or depth == 152 else 1) == millions


def test_forward_shapes_and_channels_last():
    model = cifar_resnet("resnet20", num_classes=7, in_channels=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 32).to(memory_format=torch.channels_last)
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize("bad", [18, 7, "resnet50"])
def test_bad_depth(bad):
    with pytest.raises(ValueError):
        cifar_resnet(bad)

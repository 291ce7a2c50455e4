"""Small tensors (a GradScaler scale, statistics, indices) copied to another device for a kernel to read.

``to_device`` copies without a needless host sync where the destination is a GPU, and waits where it is the
CPU: a non-blocking copy from a GPU to the host returns before its values are there, and a CPU kernel or op
reading them at once (gradients offloaded to the CPU, a grad scale on the GPU) would read what the buffer
held before."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_device"]


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` on ``device`` (in ``dtype``, default its own): ``t`` itself where nothing changes; a copy that
    does not block the host where ``device`` is not the CPU, else one whose values are there on return."""
    if not isinstance(device, torch.device):  # callers on the hook's steady path pass a device already
        device = torch.device(device)
    return t.to(device=device, dtype=dtype or t.dtype, non_blocking=device.type != "cpu")

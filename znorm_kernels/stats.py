"""Gradient statistics as a by-product of ZNorm: the mean and standard deviation of every treated gradient,
as the kernels computed them for the normalization, kept on the device for logging (TensorBoard, W&B).

``register(optimizer, track_stats=True)`` and the fused optimizers (``znorm_kernels.optim``) fill a
``StatsBuffer`` at every step, at the cost of copying two numbers per tensor (no pass over the gradients, no
host-device synchronization); ``.grad_stats()`` assembles the last step's figures into one ``GradStats``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .transfer import to_device

__all__ = ["GradStats", "StatsBuffer"]


class GradStats(NamedTuple):
    """Per treated parameter, in the order of ``names``: ``values[i] = (mean, std)`` of its raw gradient at
    the last step (float64, on the gradients' device; NaN where the parameter had no gradient or fewer than 2
    elements, which ZNorm leaves unchanged). Under a GradScaler that leaves gradients scaled, the figures are
    of the unscaled gradient."""

    names: list[str]
    values: Tensor

    @property
    def mean(self) -> Tensor:
        return self.values[:, 0]

    @property
    def std(self) -> Tensor:
        return self.values[:, 1]

    def as_dict(self, prefix: str = "grad") -> dict[str, Tensor]:
        """{"grad_mean/<name>": 0-d tensor, "grad_std/<name>": ...}, for loggers that take a flat dict (the
        values stay on the device: a logger's .item() is where a sync happens, if at all)."""
        out: dict[str, Tensor] = {}
        for i, name in enumerate(self.names):
            out[f"{prefix}_mean/{name}"] = self.values[i, 0]
            out[f"{prefix}_std/{name}"] = self.values[i, 1]
        return out


class StatsBuffer:
    """Where the groups of one step write their statistics: one float64 [T, 2] tensor per (device, dtype)
    group, with the positions of its tensors in the step's list."""

    def __init__(self) -> None:
        self.groups: list[tuple[list[int], Tensor]] = []
        self.length = 0

    def reset(self, length: int, groups: list[tuple[list[int], torch.device]]) -> list[Tensor]:
        """New buffers for a new grouping of ``length`` entries; returns them in group order."""
        self.length = length
        self.groups = [
            (positions, torch.full((len(positions), 2), float("nan"), dtype=torch.float64, device=device))
            for positions, device in groups
        ]
        return [t for _, t in self.groups]

    def unscale(self, grad_scale: Tensor | None) -> None:
        """Figures of s*g -> figures of g (on the device, before GradScaler updates s in place)."""
        if grad_scale is not None:
            for _, t in self.groups:
                t.div_(to_device(grad_scale, t.device, torch.float64))

    def assemble(self, names: list[str]) -> GradStats | None:
        """The last step's figures for the ``names`` of its entries, or None before any step."""
        if not self.groups:
            return None
        device = self.groups[0][1].device
        values = torch.full((self.length, 2), float("nan"), dtype=torch.float64, device=device)
        for positions, t in self.groups:
            index = to_device(torch.tensor(positions, dtype=torch.long), device)
            values.index_copy_(0, index, to_device(t, device))
        names = [name or f"#{i}" for i, name in enumerate(names)]
        return GradStats(names[: self.length], values)

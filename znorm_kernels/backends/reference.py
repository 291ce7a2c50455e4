"""The "reference" backend: the pure-PyTorch oracle every other backend is tested against.

For each tensor g, independently: g <- (g - mean(g)) / (std(g) + eps), statistics over all of g's elements,
written back into g itself (docs/contract.md). It is the simplest correct formula, not a fast path: the
values are taken to float64 and the statistics are a two-pass there (the mean, corrected by the mean of the
deviations from it, then the sum of squared deviations), so no element can cost another its precision,
whatever the magnitudes. A tensor whose minimum equals its maximum is constant: its centred values are taken
as exactly 0 (an exact test, rather than trusting that a rounded mean of equal values equals them).
Everything stays on the tensor's device: no host-device synchronization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..transfer import to_device
from .float64_range import scales_of

__all__ = [
    "accumulation_dtype", "group_fn", "serves", "unavailable", "write_z_", "znorm_group_",
    "znorm_tensor_",
]  # fmt: skip


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 for float64 tensors, float32 for all others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def znorm_tensor_(
    grad: Tensor,
    eps: float = 1e-10,
    correction: float = 0,
    grad_scale: Tensor | None = None,
    stats: Tensor | None = None,
) -> None:
    """Normalize one tensor in place (no validation; tensors of fewer than 2 elements are left alone).

    With ``grad_scale`` s (a fused optimizer's GradScaler scale, a 0-d tensor), ``grad`` holds s*g and
    becomes s * (s*g - mean(s*g)) / (std(s*g) + s*eps): the optimizer's own division by s then yields
    exactly the z-scores of g. ``stats``, when given (a float64 tensor of 2 elements), receives the mean and
    standard deviation of the values as given.
    """
    n = grad.numel()
    if n < 2:
        return
    x = grad.detach().reshape(-1).to(torch.float64)
    lo, hi = torch.aminmax(x)
    # Values far from 1 are brought near it by a power of two, so that no sum or square overflows or loses
    # its bits to underflow; the scaling is exact, eps is scaled with them, and the z-scores are the same.
    grow, shrink = scales_of(lo, hi)
    x = x * shrink
    mean = x.mean()
    centred = x - mean
    centred = centred - centred.mean()  # what rounding the mean cost (the corrected two-pass)
    var = centred.square().sum() / max(n - correction, 0.0)
    # Constant (an exact test; NaN never compares equal): centred values exactly 0, whatever eps is.
    constant = lo == hi
    centred = torch.where(constant, x - lo * shrink, centred)
    denom = var.sqrt()
    if stats is not None:
        stats[0] = torch.where(constant, lo, (mean + (x - mean).mean()) * grow)
        stats[1] = torch.where(constant, 0.0, denom * grow)
    write_z_(grad, centred, denom, eps * shrink, grad_scale)


def write_z_(
    grad: Tensor, centred: Tensor, std: Tensor, eps: float | Tensor, grad_scale: Tensor | None
) -> None:
    """grad <- centred / (std + eps), or centred * s / (std + s*eps) with a grad scale s; ``centred`` is the
    flat float64 x - mean (exact zeros for a constant tensor), ``std`` a float64 0-d tensor (``centred``,
    ``std`` and ``eps`` may all be scaled by one power of two)."""
    if grad_scale is None:
        s = None
        denom = std + eps
    else:
        s = to_device(grad_scale.detach(), centred.device, torch.float64)
        denom = std + s * eps
    # std + eps is 0 only for a constant tensor with eps=0: its exact-zero centred values stay 0 (0/0 would be
    # NaN). NaN and Inf still propagate, since only an exact 0 is replaced.
    denom = denom.masked_fill(denom == 0, float("inf"))
    z = centred / denom if s is None else centred * (s / denom)
    grad.copy_(z.view(grad.shape))


def znorm_group_(
    tensors: list[Tensor],
    eps: float,
    correction: float,
    grad_scale: Tensor | None = None,
    *,
    stats: Tensor | None = None,
) -> None:
    """Backend entry point used by the dispatcher: normalize already-validated tensors, one by one.
    ``stats`` (float64 [T, 2], optional) receives each tensor's mean and standard deviation."""
    with torch.no_grad():
        for i, t in enumerate(tensors):
            znorm_tensor_(t, eps, correction, grad_scale, None if stats is None else stats[i])


def unavailable(name: str) -> str | None:
    return None  # pure PyTorch: always there


def serves(name: str, device: torch.device) -> str | None:
    return None  # any device PyTorch runs on


def group_fn(name: str):
    return znorm_group_

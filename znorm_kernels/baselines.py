"""The gradient treatments the ZNorm papers compare against, usable the same way as ZNorm.

- Gradient Centralization (Yong et al. 2020): for every gradient with more than one dimension, subtract its
  mean over all dimensions but the first (one mean per output channel / row). ``gc_`` and ``register_gc``.
- Gradient-norm clipping: rescale all gradients together so their total norm is at most ``max_norm``,
  through ``torch.nn.utils.clip_grad_norm_``. ``clip_grad_norm_`` and ``register_clip``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .backends.reference import accumulation_dtype
from .step_hooks import register_grad_hook
from .validation import collect

__all__ = ["clip_grad_norm_", "gc_", "register_clip", "register_gc"]


def gc_(tensors: Tensor | Iterable[Tensor | None], *, names: Iterable[str] | None = None) -> None:
    """Gradient Centralization, in place: g <- g - mean(g over dims 1..), for every g with ndim > 1.

    The means are accumulated in float32 (float64 for float64); 1-D tensors are left unchanged. Input is
    checked as ``znorm_`` checks it (sparse/complex raise TypeError, nothing is modified).
    """
    groups = collect(tensors, names, op="gc_")
    with torch.no_grad():
        for ts in groups.values():
            for t in ts:
                if t.dim() > 1:
                    mean = t.mean(
                        dim=tuple(range(1, t.dim())), keepdim=True, dtype=accumulation_dtype(t.dtype)
                    )
                    t.copy_(t.to(mean.dtype).sub_(mean))


def register_gc(
    optimizer: torch.optim.Optimizer, *, min_ndim: int = 2, params: Iterable | None = None
) -> RemovableHandle:
    """Install Gradient Centralization as a step pre-hook (GC is linear, so scaled gradients need nothing
    special). Returns a handle with ``.remove()``."""

    def transform(params: list[Tensor], grads: list[Tensor | None], names: list[str], scale) -> None:
        gc_(grads, names=names)

    return register_grad_hook(optimizer, transform, min_ndim=min_ndim, params=params)


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """Clip the gradients of ``parameters`` to total norm ``max_norm``; returns the total norm (before).

    Without ``grad_scale`` this is exactly ``torch.nn.utils.clip_grad_norm_``. With a fused optimizer's scale
    s the gradients hold s*g, so the threshold is s*max_norm (computed on the device, no synchronization).
    """
    if grad_scale is None:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads, norm_type)
    s = grad_scale.to(total.device, torch.float32)
    # Same form as torch's: coefficient max_norm / (norm + 1e-6), in the scaled units, capped at 1.
    coef = (s * max_norm / (total + s * 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(coef.to(g.device))
    return total


def register_clip(
    optimizer: torch.optim.Optimizer,
    *,
    max_norm: float = 0.1,
    norm_type: float = 2.0,
    min_ndim: int = 1,
    params: Iterable | None = None,
) -> RemovableHandle:
    """Install gradient-norm clipping as a step pre-hook (the papers' threshold, 0.1, is the default).
    Returns a handle with ``.remove()``."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")

    def transform(params: list[Tensor], grads: list[Tensor | None], names: list[str], scale) -> None:
        clip_grad_norm_(params, max_norm, norm_type, grad_scale=scale)

    return register_grad_hook(optimizer, transform, min_ndim=min_ndim, params=params)

"""``ZNormAdam`` and ``ZNormAdamW``: torch.optim.Adam and AdamW whose step uses the z-scores of the
gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import ZNormOptimizer

__all__ = ["ZNormAdam", "ZNormAdamW"]

_ZNORM_DOC = """
    ZNorm options: ``znorm_eps`` (added to the std, default 1e-10), ``correction`` (0: population std),
    ``min_ndim`` (only parameters with at least this many dimensions; per group too), ``backend`` (as for
    ``znorm_``), ``normalize_grad`` (write the z-scores into ``.grad``; default: leave it raw),
    ``track_stats`` (keep each step's gradient mean and std for ``grad_stats()``). A param group with
    ``znorm=False`` gets the plain update.
"""


class ZNormAdam(ZNormOptimizer, torch.optim.Adam):
    __doc__ = (
        """``torch.optim.Adam`` (betas, eps, weight_decay, amsgrad, maximize, foreach, capturable,
    differentiable, fused) on the z-scores of the gradients: the update of
    ``register(torch.optim.Adam(...))``.
"""
        + _ZNORM_DOC
    )

    _torch_class = torch.optim.Adam
    _fused_kind = "adam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        znorm_eps: float = 1e-10,
        correction: float = 0,
        min_ndim: int = 1,
        backend: str = "auto",
        normalize_grad: bool = False,
        track_stats: bool = False,
    ) -> None:
        self._init_znorm(znorm_eps, correction, min_ndim, backend, normalize_grad, track_stats)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )


class ZNormAdamW(ZNormOptimizer, torch.optim.AdamW):
    __doc__ = (
        """``torch.optim.AdamW`` (decoupled weight decay; betas, eps, amsgrad, maximize, foreach, capturable,
    differentiable, fused) on the z-scores of the gradients: the update of
    ``register(torch.optim.AdamW(...))``.
"""
        + _ZNORM_DOC
    )

    _torch_class = torch.optim.AdamW
    _fused_kind = "adamw"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        znorm_eps: float = 1e-10,
        correction: float = 0,
        min_ndim: int = 1,
        backend: str = "auto",
        normalize_grad: bool = False,
        track_stats: bool = False,
    ) -> None:
        self._init_znorm(znorm_eps, correction, min_ndim, backend, normalize_grad, track_stats)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )

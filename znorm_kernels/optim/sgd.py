"""``ZNormSGD``: torch.optim.SGD whose step uses the z-scores of the gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import ZNORM_OPTIONS_DOC, ZNormOptimizer

__all__ = ["ZNormSGD"]


class ZNormSGD(ZNormOptimizer, torch.optim.SGD):
    __doc__ = (
        """``torch.optim.SGD`` (momentum, dampening, nesterov, weight_decay, maximize, foreach, fused) on the
    z-scores of the gradients: the update of ``register(torch.optim.SGD(...))``.
"""
        + ZNORM_OPTIONS_DOC
    )

    _torch_class = torch.optim.SGD
    _fused_kind = "sgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
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
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )

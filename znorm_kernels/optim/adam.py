"""``ZNormAdam`` and ``ZNormAdamW``: torch.optim.Adam and AdamW whose step uses the z-scores of the
gradients. One constructor serves both; they differ in the torch class whose update runs (AdamW's decoupled
weight decay) and in the default weight decay, as torch's do."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import ZNORM_OPTIONS_DOC, ZNormOptimizer

__all__ = ["ZNormAdam", "ZNormAdamW"]


def _adam_init(default_weight_decay: float):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = default_weight_decay,
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
        self._torch_class.__init__(
            self,
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

    return __init__


def _doc(name: str, decay: str) -> str:
    return (
        f"""``torch.optim.{name}`` ({decay}betas, eps, amsgrad, maximize, foreach, capturable, differentiable,
    fused) on the z-scores of the gradients: the update of ``register(torch.optim.{name}(...))``.
"""
        + ZNORM_OPTIONS_DOC
    )


class ZNormAdam(ZNormOptimizer, torch.optim.Adam):
    __doc__ = _doc("Adam", "weight_decay, ")

    _torch_class = torch.optim.Adam
    _fused_kind = "adam"
    _checks_capture = True
    __init__ = _adam_init(0)


class ZNormAdamW(ZNormOptimizer, torch.optim.AdamW):
    __doc__ = _doc("AdamW", "decoupled weight decay; ")

    _torch_class = torch.optim.AdamW
    _fused_kind = "adamw"
    _checks_capture = True
    __init__ = _adam_init(1e-2)

"""The public entry point ``znorm_``: options are checked, then eager calls go straight to the dispatcher
and calls inside torch.compile go through the custom op ``znorm_kernels::znorm_`` (no graph break)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .dispatch import run_znorm_
from .ops import znorm_op
from .options import as_scale
from .registry import available_backends

__all__ = ["available_backends", "znorm_"]


def znorm_(
    tensors: Tensor | Iterable[Tensor | None],
    *,
    eps: float = 1e-10,
    correction: float = 0,
    backend: str = "auto",
    grad_scale: Tensor | float | None = None,
    names: Iterable[str] | None = None,
) -> None:
    """Normalize every tensor in place: g <- (g - mean(g)) / (std(g) + eps), each tensor on its own.

    Args:
        tensors: an iterable of tensors (or one tensor); None entries are skipped, and tensors of fewer than
            2 elements are left unchanged.
        eps: added to the standard deviation.
        correction: 0 for the population standard deviation (the papers'), 1 for the sample one.
        backend: "auto", "triton", "cuda", "cpu" or "reference" (see ``available_backends()``).
        grad_scale: a fused optimizer's GradScaler scale s (0-d tensor): the tensors hold s*g and become
            s * z-scores of g, so the optimizer's own unscaling yields the z-scores.
        names: parameter names, parallel to ``tensors``, used in error messages.

    Under torch.compile this is the custom op ``znorm_kernels::znorm_`` (no graph break).
    """
    if torch.compiler.is_compiling():
        if isinstance(tensors, Tensor):
            tensors = [tensors]
        znorm_op(
            [t for t in tensors if t is not None],
            float(eps),
            float(correction),
            backend,
            as_scale(grad_scale),
        )
        return
    run_znorm_(tensors, eps, correction, backend, grad_scale, names)

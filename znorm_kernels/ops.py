"""ZNorm as a torch.library custom op, so torch.compile sees one opaque in-place op instead of a graph break.

``znorm_kernels::znorm_`` mutates its tensor list in place and returns nothing; its fake implementation does
nothing (there is no output to describe). The public ``znorm_`` routes through it only while torch.compile
traces, so eager calls keep the cheaper direct path; both end in the same dispatcher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import run_znorm_

__all__ = ["znorm_op"]


@torch.library.custom_op("znorm_kernels::znorm_", mutates_args=("tensors",))
def znorm_op(
    tensors: list[Tensor], eps: float, correction: float, backend: str, grad_scale: Tensor | None
) -> None:
    """Normalize every tensor in place (see ``znorm_kernels.znorm_``)."""
    run_znorm_(tensors, eps, correction, backend, grad_scale, None)


@znorm_op.register_fake
def _(tensors: list[Tensor], eps: float, correction: float, backend: str, grad_scale: Tensor | None) -> None:
    return None

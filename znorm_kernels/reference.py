"""The pure-PyTorch reference of ZNorm, as a public function: ``znorm_kernels.reference.znorm_`` has the
signature of ``znorm_kernels.znorm_`` and runs the same input checks, but computes with the "reference"
backend alone (``znorm_kernels/backends/reference.py``: no compiled code). It is the oracle the fused
backends are tested against; docs/contract.md says what it computes.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from .backends.reference import accumulation_dtype, znorm_tensor_
from .dispatch import run_znorm_

__all__ = ["accumulation_dtype", "znorm_", "znorm_tensor_"]


def znorm_(
    tensors: Tensor | Iterable[Tensor | None],
    *,
    eps: float = 1e-10,
    correction: float = 0,
    backend: str = "reference",
    grad_scale: Tensor | float | None = None,
    names: Iterable[str] | None = None,
) -> None:
    """ZNorm of every tensor, in place, computed by the reference alone (same checks as the public API).

    ``backend`` is accepted so this has the public ``znorm_``'s signature; only "reference" is valid here.
    """
    if backend != "reference":
        raise ValueError(f"znorm_kernels.reference.znorm_ only runs backend='reference', got {backend!r}")
    run_znorm_(tensors, eps, correction, "reference", grad_scale, names)

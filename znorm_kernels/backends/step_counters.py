"""Adam's step counters (torch's: one-element float32 or float64 CPU tensors, one per parameter), read and
advanced for the ZNorm optimizers' fused steps: one native call each where the extension is built
(csrc/step_counters.cpp), instead of one Python call per counter (``float()``) and a foreach add that
dispatches per tensor on the CPU. Counters the native ops refuse (checked before any is read or written) take
the Python path, which is also the path without the extension."""

from __future__ import annotations

import torch
from torch import Tensor

from .native import loaded

__all__ = ["add_one_", "counts"]

_ONE = torch.tensor(1.0)  # the increment, as torch's Adam adds it to CPU counters


def _ops():
    return torch.ops.znorm_kernels_C if loaded()[0] is not None else None


def counts(counters: list[Tensor]) -> list[float]:
    """The counters' values, as Python floats (no device sync: CPU tensors)."""
    ops = _ops()
    if ops is not None and counters:
        try:
            return ops.step_counts(counters)
        # Not one-element float CPU tensors (nothing was read), or an extension built before the op.
        except (RuntimeError, AttributeError):
            pass
    return [float(c) for c in counters]


def add_one_(counters: list[Tensor]) -> None:
    """Add one to every counter, in place."""
    if not counters:
        return
    ops = _ops()
    if ops is not None:
        try:
            ops.add_one_(counters)
            return
        # Not one-element float CPU tensors (nothing was written), or an extension built before the op.
        except (RuntimeError, AttributeError):
            pass
    torch._foreach_add_(counters, _ONE, alpha=1.0)

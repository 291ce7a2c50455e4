"""Where a tensor's elements lie in memory: whether they fill a range without gaps (``is_dense``) and how
far they reach (``extent``). The overlap analysis, the plans of the Triton kernel and the fused steps' checks
all ask these questions; this module imports nothing of the package."""

from __future__ import annotations

from torch import Tensor

__all__ = ["extent", "is_dense"]


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: its elements fill [data_ptr, data_ptr + numel) in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def extent(t: Tensor) -> int:
    """Elements from t's first to its last in memory (numel for a contiguous tensor)."""
    if t.is_contiguous():
        return t.numel()
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))

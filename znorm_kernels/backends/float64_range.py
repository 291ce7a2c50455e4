"""How float64 statistics keep values near the top (or bottom) of float64's range from overflowing.

A sum of float64 values near 1e308, or the square of one beyond 1e154, overflows, and the z-scores of such a
tensor would come out NaN although they are finite. Two conventions, both exact (a power of two changes only
exponents) and both leaving every other tensor's arithmetic untouched, bit for bit:

- The kernels and the merges on the host (``factor_of``): a run (a tile, a chunk, a shard, a tensor) whose
  largest finite magnitude is beyond HUGE has its sums taken on its values times SHRINK, one whose largest
  magnitude is below TINY (its squares would underflow) on its values times GROW, and its M2 is kept so
  scaled wherever it is stored or merged; its mean, minimum and maximum are not scaled, so whether an M2 is
  scaled follows from the bounds stored beside it. A normalize pass of a tensor beyond float32's comfortable
  range ("wide") divides x and the mean by 1 / factor and multiplies the multiplier by it
  (triton_tile_ops.wide_z).
- The reference (``scales_of``): the whole tensor scaled by a power of two chosen from its largest magnitude,
  where that lies outside [2**-500, 2**500], eps with it: the oracle is exact for tiny values too.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GROW", "HUGE", "SHRINK", "TINY", "factor_of", "scales_of"]

# The kernels' own (triton_moments.py, csrc/znorm.h).
HUGE, TINY, SHRINK, GROW = 2.0**400, 2.0**-400, 2.0**-600, 2.0**600
_FAR = 2.0**500


def factor_of(lo: Tensor, hi: Tensor) -> Tensor:
    """The factor a float64 run with these bounds has its values and its M2 scaled by, elementwise: SHRINK
    where its largest magnitude is finite and beyond HUGE, GROW where it is nonzero and below TINY, else 1."""
    big = torch.maximum(-lo, hi).to(torch.float64)
    # float64 tensors: a Python 2**-600 in torch.where would be float32
    shrink, grow = torch.full_like(big, SHRINK), torch.full_like(big, GROW)
    return torch.where(
        (big > HUGE) & (big < float("inf")), shrink, torch.where((big < TINY) & (big > 0), grow, 1.0)
    )


def _pow2(k: Tensor) -> Tensor:
    """2**k exactly, as float64, for an int64 tensor k in [-1022, 1023] (the exponent bits set directly)."""
    return ((k + 1023) << 52).view(torch.float64)


def scales_of(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """(2**e, 2**-e) for float64 bounds of a tensor: e the exponent of its largest magnitude where that lies
    beyond 2**500 or below 2**-500 (clamped to [-1000, 1000]), else 0 (no scaling at all); 0 too for
    non-finite bounds, which propagate as they are."""
    big = torch.maximum(lo.abs(), hi.abs())
    _, e = torch.frexp(big)
    far = ((big > _FAR) | (big < 1.0 / _FAR)) & (big > 0) & big.isfinite()
    e = torch.where(far, e.to(torch.int64).clamp(-1000, 1000), 0)
    return _pow2(e), _pow2(-e)

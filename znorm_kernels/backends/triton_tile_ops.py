"""The tile operations both Triton kernel families share (the ZNorm queue in triton_kernels.py, the fused
updates in triton_optim_kernels.py): loading and storing a tile with 16-byte accesses where the pointer
allows, and writing a z-score in the tensor's dtype exactly as the normalize pass does, so that a fused
update's z is bit for bit the value ZNorm would have written into the gradient."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load_tile", "normalized", "store_tile", "to_output", "wide_z"]


@triton.jit
def load_tile(ptr, rem, ACC: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """ptr[0 : min(rem, BLOCK)] in ACC (0 beyond) and its mask. ALIGNED (ptr 16-byte aligned): a full tile
    unmasked, a tail of a multiple of VEC values with a mask constant per vector: 16 bytes per load."""
    offs = tl.arange(0, BLOCK)
    mask = offs < rem
    if ALIGNED:
        if rem >= BLOCK:
            x = tl.load(ptr + offs)
        elif rem % VEC == 0:
            x = tl.load(ptr + offs, mask=offs < tl.multiple_of(rem, VEC), other=0.0)
        else:
            x = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return x.to(ACC), mask


@triton.jit
def store_tile(ptr, v, rem, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """ptr[0 : min(rem, BLOCK)] <- v, with the accesses of load_tile."""
    offs = tl.arange(0, BLOCK)
    if ALIGNED:
        if rem >= BLOCK:
            tl.store(ptr + offs, v)
        elif rem % VEC == 0:
            tl.store(ptr + offs, v, mask=offs < tl.multiple_of(rem, VEC))
        else:
            tl.store(ptr + offs, v, mask=offs < rem)
    else:
        tl.store(ptr + offs, v, mask=offs < rem)


@triton.jit
def to_output(v, DTYPE: tl.constexpr):
    """Round float32 to the tensor's dtype, to nearest even. bfloat16 is rounded by hand: Triton's interpreter
    truncates, and the same integer steps on the GPU give the hardware's rounding bit for bit."""
    if tl.bfloat16 == DTYPE:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        v = tl.where(v != v, v, rounded)  # NaN stays NaN whatever its payload
    return v.to(DTYPE)


@triton.jit
def normalized(x, mean, inv, DTYPE: tl.constexpr, ACC: tl.constexpr):
    """(x - mean) * inv in the tensor's dtype. In float32 the mean is subtracted as a float32 pair, hi then lo
    (x - hi is exact near the mean), which keeps its float64 precision at float32 cost."""
    if tl.float64 == ACC:
        z = (x - mean) * inv
    else:
        hi = mean.to(tl.float32)
        lo = (mean - hi.to(tl.float64)).to(tl.float32)
        z = ((x - hi) - lo) * inv.to(tl.float32)
    return to_output(z, DTYPE)


@triton.jit
def wide_z(x, mean, inv, wide, ACC: tl.constexpr):
    """(x - mean) * inv in float64, for a "wide" tensor (``wide`` nonzero). In a float64 tensor x and the
    mean are scaled by ``wide`` first (1, or the power of two a tensor of huge or tiny values has its
    statistics scaled by, whose inv is then stored divided by it), so that x - mean neither overflows nor
    underflows; the values of other dtypes never need it."""
    if tl.float64 == ACC:
        return (x.to(tl.float64) * wide - mean * wide) * inv
    return (x.to(tl.float64) - mean) * inv

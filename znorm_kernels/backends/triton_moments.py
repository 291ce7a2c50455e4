"""The statistics of the ZNorm queue kernel (triton_kernels.py), as Triton functions: a tile's moments from
its values in registers, tiles merged into a chunk's, and a tensor's from its chunks' partials.

Numerics (docs/contract.md): no value is shifted by another one. Each tile of at most BLOCK values gives its
count, sum, minimum and maximum, then the sums of d = x - m and d^2 around its rounded mean m: mean = m +
sum(d)/count and M2 = sum(d^2) - sum(d)^2/count, taken to float64. The correction term recovers what rounding
m cost, so the tile's statistics are accurate relative to its spread, not to its magnitude, and an outlier
only costs precision in its own square. A float32 tile whose magnitude or spread would overflow or underflow
float32 squares is computed in float64 instead (rare, decided per tile by its min and max); a float64 run of
huge values is computed on scaled values (float64_range.py). Tiles merge with Chan's formula and chunk
partials as sums over all partials, all in float64, in fixed order: bitwise deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import triton_interpret
from .triton_tile_ops import load_tile

__all__ = [
    "centred_sums",
    "chunk_moments",
    "corrected",
    "load_partials",
    "merge",
    "merge_full_tile",
    "merge_partials",
    "range_factor",
    "tile_moments",
    "wide_moments",
]  # fmt: skip

# Float32 tiles take the float32 path when every |x| <= FAST_MAX and their spread (max - min) is 0 or at least
# FAST_MIN_SPREAD: then sums and squares stay far from float32's overflow and subnormal ranges.
FAST_MAX = tl.constexpr(2.0**50)
FAST_MIN_SPREAD = tl.constexpr(2.0**-50)
# Whether a tile's reductions are fused (several operands each): on a GPU one pass through shared memory for
# all of them. Triton's interpreter computes such a reduction element by element in Python, the plain
# tl.min, tl.max and tl.sum with numpy: it takes those (read as the kernels are defined; a test may patch it).
FUSED = tl.constexpr(not triton_interpret())
# A float64 run whose largest finite magnitude exceeds HUGE could overflow a sum or a square, and one whose
# largest magnitude is below TINY lose its squares to underflow: its sums are taken on its values times SHRINK
# or GROW (powers of two: exact), and its M2 is kept so scaled wherever it is stored or merged (its mean,
# minimum and maximum are not). Whether a run is scaled follows from its bounds alone (float64_range.py).
HUGE = tl.constexpr(2.0**400)
TINY = tl.constexpr(2.0**-400)
SHRINK = tl.constexpr(2.0**-600)
GROW = tl.constexpr(2.0**600)


@triton.jit
def range_factor(lo, hi):
    """The factor a run's values and M2 are scaled by: SHRINK where its largest magnitude is finite and beyond
    HUGE, GROW where it is nonzero and below TINY, else 1 (the sums of every other run are exactly those of
    the unscaled values)."""
    big = tl.maximum(-lo, hi)
    return tl.where(
        (big > HUGE) & (big < float("inf")), SHRINK, tl.where((big < TINY) & (big > 0.0), GROW, 1.0)
    )


@triton.jit
def _add_pairs(s_a, q_a, s_b, q_b):
    return s_a + s_b, q_a + q_b


@triton.jit
def _bounds(lo_a, hi_a, lo_b, hi_b):
    return tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b)


@triton.jit
def _bounds_and_sum(lo_a, hi_a, s_a, lo_b, hi_b, s_b):
    return tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b), s_a + s_b


@triton.jit
def centred_sums(y, mask, m):
    """sum(d) and sum(d^2) over the unmasked values, d = y - m, as one reduction of two operands (one pass
    through shared memory and its barriers instead of two; each operand's tree is tl.sum's, so the bits are
    those of two tl.sum)."""
    d = tl.where(mask, y - m, 0.0)
    if FUSED:
        s1, q = tl.reduce((d, d * d), 0, _add_pairs)
    else:
        s1, q = tl.sum(d, axis=0), tl.sum(d * d, axis=0)
    return s1, q


@triton.jit
def corrected(m, s1, q, n, FULL: tl.constexpr = 0):
    """Mean and M2 (float64) from the sums s1 = sum(x - m) and q = sum((x - m)^2) around a rounded mean m;
    FULL: n is that power of two (s1 / n is then exactly s1 * (1 / FULL))."""
    s1 = s1.to(tl.float64)
    if FULL:
        mean_shift = s1 * (1.0 / FULL)
    else:
        mean_shift = s1 / n
    return m.to(tl.float64) + mean_shift, q.to(tl.float64) - s1 * mean_shift


@triton.jit
def wide_moments(ptr, count, n, ACC: tl.constexpr, SUB: tl.constexpr):
    """Mean and M2 of ptr[0:count] in float64, SUB values at a time, read again from memory (L1/L2): the
    rare tiles whose float32 squares could overflow or underflow, kept out of the common path's registers."""
    offs = tl.arange(0, SUB)
    acc = tl.zeros([SUB], dtype=tl.float64)
    for sub in range(0, count, SUB):
        y = tl.load(ptr + sub + offs, mask=offs < count - sub, other=0.0)
        acc += y.to(tl.float64)
    m = tl.sum(acc, axis=0) / n
    acc = tl.zeros([SUB], dtype=tl.float64)
    acc2 = tl.zeros([SUB], dtype=tl.float64)
    for sub in range(0, count, SUB):
        mask = offs < count - sub
        y = tl.load(ptr + sub + offs, mask=mask, other=0.0)
        d = tl.where(mask, y.to(tl.float64) - m, 0.0)
        acc += d
        acc2 += d * d
    return corrected(m, tl.sum(acc, axis=0), tl.sum(acc2, axis=0), n)


@triton.jit
def tile_moments(y, mask, ptr, count, ACC: tl.constexpr, SUB: tl.constexpr, FULL: tl.constexpr = 0):
    """Mean and M2 (float64; M2 scaled by range_factor(lo, hi)**2) and min and max (float64) of the unmasked
    values y = ptr[0:count] (in ACC). FULL: the tile is known to hold FULL values (a power of two), so its
    divisions by the count are multiplications by 1/FULL, exact: the same bits without a division. Fewer
    reductions, each of several operands (min, max and sum; then the centred sums): the tile's chain passes
    shared memory twice, not five times; each operand's tree is tl.min's, tl.max's or tl.sum's, and so are
    the bits."""
    if FULL:
        count = tl.full([], FULL, tl.int32)
    n = count.to(tl.float64)
    low, high = tl.where(mask, y, float("inf")), tl.where(mask, y, float("-inf"))
    if tl.float64 == ACC:
        if FUSED:
            lo, hi = tl.reduce((low, high), 0, _bounds)
        else:
            lo, hi = tl.min(low, axis=0), tl.max(high, axis=0)
        f = range_factor(lo, hi)
        ys = y * f
        if FULL:
            m = tl.sum(ys, axis=0) * (1.0 / FULL)
        else:
            m = tl.sum(ys, axis=0) / n
        s1, q = centred_sums(ys, mask, m)
        mean, m2 = corrected(m, s1, q, n, FULL)
        mean = mean / f
    else:
        if FUSED:
            lo32, hi32, s = tl.reduce((low, high, y), 0, _bounds_and_sum)
        else:
            lo32, hi32, s = tl.min(low, axis=0), tl.max(high, axis=0), tl.sum(y, axis=0)
        lo, hi = lo32.to(tl.float64), hi32.to(tl.float64)
        spread = hi - lo
        if (tl.maximum(-lo, hi) <= FAST_MAX) & ((spread >= FAST_MIN_SPREAD) | (spread == 0.0)):
            if FULL:
                m32 = s * (1.0 / FULL)
            else:
                m32 = tl.div_rn(s, count.to(tl.float32))
            s32, q32 = centred_sums(y, mask, m32)
            mean, m2 = corrected(m32, s32, q32, n, FULL)
        else:
            mean, m2 = wide_moments(ptr, count, n, ACC, SUB)
    # Exact for a constant tile; the correction above can only round M2 below 0, never above.
    constant = (lo == hi) & (mean == mean)
    mean = tl.where(constant, lo, mean)
    m2 = tl.where(constant, 0.0, tl.maximum(m2, 0.0))
    return mean, m2, lo, hi


@triton.jit
def merge(mean, m2, n, lo, hi, mean_b, m2_b, n_b, lo_b, hi_b, ACC: tl.constexpr):
    """Chan's merge of a tile's statistics (mean_b, m2_b over n_b values, float64) into the running ones. In
    float64 tensors each M2 is scaled by its own range_factor and the result by the merged bounds' (all 1
    unless a value is huge or all are tiny); the values of other dtypes never are."""
    lo_r, hi_r = tl.minimum(lo, lo_b), tl.maximum(hi, hi_b)
    total = n + n_b
    frac = n_b / total
    if tl.float64 == ACC:
        fr = range_factor(lo_r, hi_r)
        fa, fb = fr / range_factor(lo, hi), fr / range_factor(lo_b, hi_b)
        delta = mean_b * fr - mean * fr
        mean = (mean * fr + delta * frac) / fr
        m2 = m2 * fa * fa + m2_b * fb * fb + delta * delta * n * frac
    else:
        delta = mean_b - mean
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * n * frac
    return mean, m2, total, lo_r, hi_r


@triton.jit
def merge_full_tile(y, ptr, mean, m2, n, lo, hi, ACC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr):
    """Merge the loaded full tile y = ptr[0:BLOCK] (in the tensor's dtype) into the running statistics."""
    mask = tl.full([BLOCK], 1, tl.int1)
    size = tl.full([], BLOCK, tl.int32)
    mean_b, m2_b, lo_b, hi_b = tile_moments(y.to(ACC), mask, ptr, size, ACC, SUB, BLOCK)
    return merge(mean, m2, n, lo, hi, mean_b, m2_b, size.to(tl.float64), lo_b, hi_b, ACC)


@triton.jit
def _prefetched_moments(
    ptr, count, y, mask, ACC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """chunk_moments with PREFETCH, from its first tile y (loaded, mask): each full tile's loads are issued
    before the previous tile is reduced, so a program always has a tile in flight, not only between
    reductions (two tiles' registers, as UNROLL=2). The next tile's load is masked off past the full tiles
    (a mask constant per tile: nothing is read), and a partial last tile is read after the loop."""
    offs = tl.arange(0, BLOCK)
    first = tl.minimum(count, BLOCK)
    # Where the full tiles after the first end: a multiple of BLOCK, so each mask below is all or nothing.
    full_end = tl.multiple_of(BLOCK + (count - first) // BLOCK * BLOCK, BLOCK)
    after = tl.load(ptr + BLOCK + offs, mask=BLOCK + offs < full_end, other=0.0)
    mean, m2, lo, hi = tile_moments(y, mask, ptr, first, ACC, SUB)
    n = first.to(tl.float64)
    for tile in range(BLOCK, full_end, BLOCK):
        y_full = after
        after = tl.load(ptr + tile + BLOCK + offs, mask=tile + BLOCK + offs < full_end, other=0.0)
        mean, m2, n, lo, hi = merge_full_tile(y_full, ptr + tile, mean, m2, n, lo, hi, ACC, BLOCK, SUB)
    if full_end < count:
        rem = count - full_end
        y, mask = load_tile(ptr + full_end, rem, ACC, BLOCK, VEC, ALIGNED)
        mean_b, m2_b, lo_b, hi_b = tile_moments(y, mask, ptr + full_end, rem, ACC, SUB)
        mean, m2, n, lo, hi = merge(mean, m2, n, lo, hi, mean_b, m2_b, rem.to(tl.float64), lo_b, hi_b, ACC)
    return mean, m2, lo, hi


@triton.jit
def _grouped_moments(
    ptr, count, y, mask, ACC: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr, SUB: tl.constexpr,
    VEC: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """chunk_moments without PREFETCH, from its first tile y (loaded, mask): groups of UNROLL full tiles."""
    first = tl.minimum(count, BLOCK)
    mean, m2, lo, hi = tile_moments(y, mask, ptr, first, ACC, SUB)
    n = first.to(tl.float64)
    # The tiles after the first start at BLOCK, a multiple the compiler can see (so 16-byte aligned for the
    # vector loads); starting at `first` lost that. Where count <= BLOCK the loops below are empty either way.
    start = BLOCK + first * 0
    if UNROLL > 1:
        offs = tl.arange(0, BLOCK)
        # The grouped loop's bound is where the tail tiles start: a count of groups kept for after the loop
        # would be one more value live across it.
        start = BLOCK + (count - first) // (UNROLL * BLOCK) * (UNROLL * BLOCK)
        for group in range(BLOCK, start, UNROLL * BLOCK):
            at = ptr + group
            y0 = tl.load(at + offs)
            y1 = tl.load(at + BLOCK + offs)
            if UNROLL == 4:
                y2 = tl.load(at + 2 * BLOCK + offs)
                y3 = tl.load(at + 3 * BLOCK + offs)
            mean, m2, n, lo, hi = merge_full_tile(y0, at, mean, m2, n, lo, hi, ACC, BLOCK, SUB)
            mean, m2, n, lo, hi = merge_full_tile(y1, at + BLOCK, mean, m2, n, lo, hi, ACC, BLOCK, SUB)
            if UNROLL == 4:
                mean, m2, n, lo, hi = merge_full_tile(
                    y2, at + 2 * BLOCK, mean, m2, n, lo, hi, ACC, BLOCK, SUB
                )
                mean, m2, n, lo, hi = merge_full_tile(
                    y3, at + 3 * BLOCK, mean, m2, n, lo, hi, ACC, BLOCK, SUB
                )
    for tile in range(start, count, BLOCK):
        rem = count - tile
        y, mask = load_tile(ptr + tile, rem, ACC, BLOCK, VEC, ALIGNED)
        size = tl.minimum(rem, BLOCK)
        mean_b, m2_b, lo_b, hi_b = tile_moments(y, mask, ptr + tile, size, ACC, SUB)
        mean, m2, n, lo, hi = merge(mean, m2, n, lo, hi, mean_b, m2_b, size.to(tl.float64), lo_b, hi_b, ACC)
    return mean, m2, lo, hi


@triton.jit
def chunk_moments(
    ptr,
    count,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
    SUB: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):
    """Mean, M2, min and max of ptr[0:count], tile by tile, merged with Chan's formula in float64, in tile
    order. After the first tile, whole groups of UNROLL full tiles have all their loads issued before the
    first tile's arithmetic, so a program keeps UNROLL tiles in flight (bytes in flight per SM set the
    bandwidth); with PREFETCH (UNROLL 1) the next tile's loads are issued before each tile is reduced
    (_prefetched_moments). The tiles merge one by one either way, so the bits depend on neither."""
    tl.static_assert((UNROLL == 1) | (UNROLL == 2) | (UNROLL == 4))
    tl.static_assert((not PREFETCH) | (UNROLL == 1))
    y, mask = load_tile(ptr, count, ACC, BLOCK, VEC, ALIGNED)
    if PREFETCH:
        mean, m2, lo, hi = _prefetched_moments(ptr, count, y, mask, ACC, BLOCK, SUB, VEC, ALIGNED)
    else:
        mean, m2, lo, hi = _grouped_moments(ptr, count, y, mask, ACC, BLOCK, UNROLL, SUB, VEC, ALIGNED)
    return mean, m2, lo, hi


@triton.jit
def load_partials(partial_ptr, first, b, nchunks, chunk, n, PBLOCK: tl.constexpr):
    """Counts, means, M2s, minima and maxima of a tensor's partials b .. b+PBLOCK (neutral past the last)."""
    idx = b + tl.arange(0, PBLOCK)
    live = idx < nchunks
    count = tl.where(live, tl.minimum(chunk, n - idx * chunk).to(tl.float64), 0.0)
    slot = partial_ptr + 4 * (first + idx)
    mean = tl.load(slot, mask=live, other=0.0, cache_modifier=".cg")
    m2 = tl.load(slot + 1, mask=live, other=0.0, cache_modifier=".cg")
    lo = tl.load(slot + 2, mask=live, other=float("inf"), cache_modifier=".cg")
    hi = tl.load(slot + 3, mask=live, other=float("-inf"), cache_modifier=".cg")
    return count, mean, m2, lo, hi


@triton.jit
def merge_partials(partial_ptr, first, nchunks, chunk, n, ACC: tl.constexpr, PBLOCK: tl.constexpr):
    """Mean, M2, min and max of a whole tensor from its chunk partials, in chunk order, as vectorized float64
    sums: mean = sum(n_i mean_i) / n, then M2 = sum(M2_i + n_i (mean_i - mean)^2) (no cancellation). Where
    a float64 tensor is scaled (range_factor of its bounds), the sums are of the scaled means, and each
    partial's M2 is brought from its own scale to the tensor's."""
    acc = tl.zeros([PBLOCK], dtype=tl.float64)
    acc_shrunk = tl.zeros([PBLOCK], dtype=tl.float64)  # the same sums over scaled means, for scaled tensors
    acc_grown = tl.zeros([PBLOCK], dtype=tl.float64)
    lo = tl.full([PBLOCK], float("inf"), dtype=tl.float64)
    hi = tl.full([PBLOCK], float("-inf"), dtype=tl.float64)
    for b in range(0, nchunks, PBLOCK):
        count, mu, _, lo_b, hi_b = load_partials(partial_ptr, first, b, nchunks, chunk, n, PBLOCK)
        acc += count * mu
        if tl.float64 == ACC:
            acc_shrunk += count * (mu * SHRINK)
            acc_grown += count * (mu * GROW)
        lo = tl.minimum(lo, lo_b)
        hi = tl.maximum(hi, hi_b)
    lo, hi = tl.min(lo, axis=0), tl.max(hi, axis=0)
    mean = tl.sum(acc, axis=0) / n.to(tl.float64)
    if tl.float64 == ACC:
        f = range_factor(lo, hi)
        scaled = tl.where(f == SHRINK, tl.sum(acc_shrunk, axis=0), tl.sum(acc_grown, axis=0))
        mean = tl.where(f == 1.0, mean, scaled / n.to(tl.float64))  # scaled by f
    acc = tl.zeros([PBLOCK], dtype=tl.float64)
    for b in range(0, nchunks, PBLOCK):
        count, mu, q, lo_b, hi_b = load_partials(partial_ptr, first, b, nchunks, chunk, n, PBLOCK)
        if tl.float64 == ACC:
            d = tl.where(count > 0.0, mu * f - mean, 0.0)
            g = tl.where(count > 0.0, f / range_factor(lo_b, hi_b), 1.0)
            acc += q * g * g + count * d * d
        else:
            d = tl.where(count > 0.0, mu - mean, 0.0)
            acc += q + count * d * d
    if tl.float64 == ACC:
        mean = mean / f
    return mean, tl.sum(acc, axis=0), lo, hi

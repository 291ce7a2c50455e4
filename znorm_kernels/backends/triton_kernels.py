"""Triton kernels of ZNorm: one launch normalizes every tensor of a (device, dtype) group.

The launch is a work queue. Each program draws tickets from an integer counter until the queue is empty; the
tickets come in a fixed order:

1. statistics items, one per chunk of every large tensor (more than BLOCK elements): the chunk's count, mean
   and M2 (sum of squared deviations), in ACC precision, into its own slot. The program that finishes a
   tensor's last chunk (a per-tensor integer counter tells it) merges the tensor's partials in chunk order and
   publishes (shift, mean, 1/(std+eps)) with a release;
2. small items, one per tensor of at most BLOCK elements: read once into registers, statistics, written once;
3. normalize items, one per chunk of every large tensor: wait (acquire spin) until that tensor's statistics
   are published, then write ((x - shift) - mean) * inv.

Every statistics ticket is drawn before any normalize ticket, and a drawn ticket belongs to a running
program, so a waiting program never waits for work that has not started: no deadlock, whatever the number of
programs or their residency. Under TRITON_INTERPRET=1 programs run one after another, and the first simply
drains the queue in order. The last program to leave resets the counters for the next launch, so no memset
is needed.

Numerics (SPEC.md): values are shifted by the tensor's first element before any statistics (a constant tensor
becomes exactly 0; the shift is published with the statistics, since chunk 0 is overwritten in place later);
per-tile mean and M2 are two-pass in registers and tiles are merged with Chan's formula; the tensor's partials
are merged as sums over all partials (mean = sum(n_i mean_i) / n, M2 = sum(M2_i + n_i (mean_i - mean)^2)), in
vector accumulators reduced by a fixed tree. No float atomics: bitwise deterministic.

``stats`` keeps (shift, mean, inv) of every tensor after the launch, so a fused optimizer can reuse them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Layout of the int64 metadata table (offsets in units of T = tensors, S = statistics items, M = small items):
# [addr: T][numel: T][chunk length: T][first partial: T][tensor of item: S + M][chunk of item: S]


@triton.jit
def _tile_stats(x_ptr, start, stop, shift, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Count, mean and M2 of x[start:stop] - shift (at most BLOCK elements), two-pass in registers."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < stop
    y = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift, 0.0)
    count = tl.minimum(stop - start, BLOCK).to(ACC)
    mean = tl.sum(y, axis=0) / count
    d = tl.where(mask, y - mean, 0.0)
    return count, mean, tl.sum(d * d, axis=0)


@triton.jit
def _chunk_stats(x_ptr, start, stop, shift, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Count, mean and M2 of x[start:stop] - shift, tile by tile, merged with Chan's formula."""
    count, mean, m2 = _tile_stats(x_ptr, start, stop, shift, ACC, BLOCK)
    for tile in range(start + BLOCK, stop, BLOCK):
        c, m, q = _tile_stats(x_ptr, tile, stop, shift, ACC, BLOCK)
        total = count + c
        delta = m - mean
        frac = c / total
        mean = mean + delta * frac
        m2 = m2 + q + delta * delta * count * frac
        count = total
    return count, mean, m2


@triton.jit
def _to_output(v, DTYPE: tl.constexpr):
    """Round float32 to the tensor's dtype, to nearest even. bfloat16 is rounded by hand: Triton's interpreter
    truncates, and the same integer steps on the GPU give the hardware's rounding bit for bit."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        v = tl.where(v != v, v, rounded)  # NaN stays NaN whatever its payload
    return v.to(DTYPE)


@triton.jit
def _inv_std(m2, n, scale, eps, correction, ACC: tl.constexpr):
    """1 / (std + eps), or s / (std + s*eps) for gradients scaled by s (scale is 1 otherwise); 0 where that
    denominator is exactly 0 (a constant tensor with eps=0), so its exact-zero centred values stay 0."""
    var = m2 / tl.maximum(n.to(ACC) - correction, 0.0)
    denom = tl.sqrt(var) + scale * eps
    return tl.where(denom == 0.0, 0.0, scale / denom)


@triton.jit
def _load_partials(partial_ptr, first, b, nchunks, chunk, n, ACC: tl.constexpr, PBLOCK: tl.constexpr):
    """Counts, means and M2s of a tensor's partials b .. b+PBLOCK (zero past the last one)."""
    idx = b + tl.arange(0, PBLOCK)
    live = idx < nchunks
    count = tl.where(live, tl.minimum(chunk, n - idx * chunk).to(ACC), 0.0)
    slot = partial_ptr + 2 * (first + idx)
    mean = tl.load(slot, mask=live, other=0.0, cache_modifier=".cg")
    m2 = tl.load(slot + 1, mask=live, other=0.0, cache_modifier=".cg")
    return count, mean, m2


@triton.jit
def _merge_partials(partial_ptr, first, nchunks, chunk, n, ACC: tl.constexpr, PBLOCK: tl.constexpr):
    """Mean and M2 of a whole tensor from its chunk partials, in chunk order, as two vectorized sums:
    mean = sum(n_i mean_i) / n, then M2 = sum(M2_i + n_i (mean_i - mean)^2) (no cancellation)."""
    acc = tl.zeros([PBLOCK], dtype=ACC)
    for b in range(0, nchunks, PBLOCK):
        count, mu, _ = _load_partials(partial_ptr, first, b, nchunks, chunk, n, ACC, PBLOCK)
        acc += count * mu
    mean = tl.sum(acc, axis=0) / n.to(ACC)
    acc = tl.zeros([PBLOCK], dtype=ACC)
    for b in range(0, nchunks, PBLOCK):
        count, mu, q = _load_partials(partial_ptr, first, b, nchunks, chunk, n, ACC, PBLOCK)
        d = mu - mean
        acc += q + count * d * d
    return mean, tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["T", "S", "M", "NUM_PROGRAMS", "eps", "correction"])
def znorm_queue_kernel(
    meta_ptr,  # int64 table, layout above
    partial_ptr,  # ACC [2 * S]: (mean, M2) of every statistics chunk
    stats_ptr,  # ACC [3 * T]: (shift, mean, inv) of every tensor, kept after the launch
    counter_ptr,  # int32 [2 + T]: ticket, programs done, per-tensor chunk counters; zero between launches
    scale_ptr,  # a 0-d scale tensor (read only when HAS_SCALE)
    eps,
    correction,
    T,
    S,
    M,
    NUM_PROGRAMS,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    PBLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(ACC)
    item_tensor = meta_ptr + 4 * T
    item_chunk = item_tensor + S + M
    total = S + M
    if NORMALIZE:
        total += S

    ticket = tl.atomic_add(counter_ptr, 1, sem="relaxed")
    while ticket < total:
        if ticket < S + M:
            t = tl.load(item_tensor + ticket)
        else:
            t = tl.load(item_tensor + ticket - S - M)
        x_ptr = tl.load(meta_ptr + t).to(tl.pointer_type(DTYPE))
        n = tl.load(meta_ptr + T + t)
        if ticket < S:
            # A statistics chunk of a large tensor.
            c = tl.load(item_chunk + ticket)
            chunk = tl.load(meta_ptr + 2 * T + t)
            start = c * chunk
            shift = tl.load(x_ptr).to(ACC)
            _count, mean, m2 = _chunk_stats(x_ptr, start, tl.minimum(start + chunk, n), shift, ACC, BLOCK)
            part = tl.load(meta_ptr + 3 * T + t) + c
            tl.store(partial_ptr + 2 * part, mean)
            tl.store(partial_ptr + 2 * part + 1, m2)
            nchunks = tl.cdiv(n, chunk)
            done = tl.atomic_add(counter_ptr + 2 + t, 1, sem="acq_rel")
            if done == nchunks - 1:
                # Last chunk of this tensor: merge in chunk order, publish, release.
                mean, m2 = _merge_partials(partial_ptr, part - c, nchunks, chunk, n, ACC, PBLOCK)
                tl.store(stats_ptr + 3 * t, shift)
                tl.store(stats_ptr + 3 * t + 1, mean)
                tl.store(stats_ptr + 3 * t + 2, _inv_std(m2, n, scale, eps, correction, ACC))
                tl.atomic_add(counter_ptr + 2 + t, 1, sem="release")
        elif ticket < S + M:
            # A small tensor: read once, statistics in registers, written once.
            offs = tl.arange(0, BLOCK)
            mask = offs < n
            shift = tl.load(x_ptr).to(ACC)
            y = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift, 0.0)
            mean = tl.sum(y, axis=0) / n.to(ACC)
            d = tl.where(mask, y - mean, 0.0)
            inv = _inv_std(tl.sum(d * d, axis=0), n, scale, eps, correction, ACC)
            tl.store(stats_ptr + 3 * t, shift)
            tl.store(stats_ptr + 3 * t + 1, mean)
            tl.store(stats_ptr + 3 * t + 2, inv)
            if NORMALIZE:
                tl.store(x_ptr + offs, _to_output(d * inv, DTYPE), mask=mask)
        else:
            # A normalize chunk: wait for the tensor's statistics, then one pass over the chunk.
            i = ticket - S - M
            c = tl.load(item_chunk + i)
            chunk = tl.load(meta_ptr + 2 * T + t)
            published = tl.cdiv(n, chunk) + 1
            seen = tl.atomic_add(counter_ptr + 2 + t, 0, sem="acquire")
            while seen < published:
                seen = tl.atomic_add(counter_ptr + 2 + t, 0, sem="acquire")
            shift = tl.load(stats_ptr + 3 * t, volatile=True)
            mean = tl.load(stats_ptr + 3 * t + 1, volatile=True)
            inv = tl.load(stats_ptr + 3 * t + 2, volatile=True)
            start = c * chunk
            stop = tl.minimum(start + chunk, n)
            for tile in range(start, stop, BLOCK):
                offs = tile + tl.arange(0, BLOCK)
                mask = offs < stop
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
                tl.store(x_ptr + offs, _to_output(((x - shift) - mean) * inv, DTYPE), mask=mask)
        ticket = tl.atomic_add(counter_ptr, 1, sem="relaxed")

    # The last program out resets the counters: every other program has drawn its final ticket and finished.
    if tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel") == NUM_PROGRAMS - 1:
        tl.store(counter_ptr, 0)
        tl.store(counter_ptr + 1, 0)
        for b in range(0, T, PBLOCK):
            idx = b + tl.arange(0, PBLOCK)
            tl.store(counter_ptr + 2 + idx, tl.zeros([PBLOCK], dtype=tl.int32), mask=idx < T)

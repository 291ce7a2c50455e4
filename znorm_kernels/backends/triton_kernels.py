"""Triton kernels of ZNorm: one launch normalizes every tensor of a (device, dtype) group.

The launch is a work queue. Each program draws tickets from an integer counter until the queue is empty; the
tickets come in a fixed order:

1. statistics tickets, each a run of consecutive chunks of one large tensor (more than BLOCK elements): for
   each chunk of the run in order, its count, mean and M2 (sum of squared deviations), in ACC precision, into
   the chunk's own partial slot; then one add of the run's number of chunks to the tensor's integer counter.
   The program whose add completes the tensor's chunks merges its partials in chunk order and publishes
   (mean, std, 1/(std+eps)) with a release;
2. small items, one per tensor of at most BLOCK elements: read once into registers, statistics, written once;
3. normalize tickets, each a run of consecutive chunks of one large tensor: wait (acquire spin) until that
   tensor's statistics are published, then write (x - mean) * inv over the run.

A tensor's chunks have a length of its own size alone (tiles.chunk), whatever the list; the runs
(tiles.ticket_runs: guided self-scheduling for the programs resident, so that a phase ends on short tickets)
only decide which program computes which chunk: a tensor's bits do not depend on them (normalize is
element-wise).

With GIVEN, the host has written every tensor's (mean, std, inv, wide) row into ``stats`` before the launch
(statistics merged across the ranks that hold a DTensor's shards): the tickets start at the small items,
which apply their row instead of computing one, and no normalize item waits.

Every statistics ticket is drawn before any normalize ticket, and a drawn ticket belongs to a running program,
which computes its whole run without waiting, so a waiting program never waits for work that has not started:
no deadlock, whatever the number of programs or their residency. A program draws its next ticket as it starts
on the last record of the current one, so the atomic's latency hides behind the work; the drawn ticket is
later than the current one, so the argument holds. Under TRITON_INTERPRET=1 programs run one after another,
and the first simply drains the queue in order. The last program to leave resets the counters for the next
launch, so no memset is needed; the host keeps one workspace per stream (shared by lists of the same sizes
there), so launches that share counters are always ordered (triton_host).

A program walks records (triton_plan's layout): a statistics ticket's chunks each have one, consecutive, and
its first is found in a table of starts, loaded with the draw; every other ticket is one record. Each record
is 32 bytes (byte offset of its first element in its tensor, element count, tensor, aux), read before its
data, and the tensor's address from the table of addresses after it: three dependent loads before the data
arrive, and a run's next chunk needs no atomic. The addresses are a table of their own so that gradients
that move to new addresses cost the host a rewrite of T values, not a new table. A statistics record's aux
holds its slot and, on a run's last chunk, the run's chunks (the amount of its add); so a run is one loop
pass per chunk with a single call of chunk_moments, not a loop inside the item, whose extra live values cost
registers and spills. Offsets inside an item are 32-bit, from the item's 64-bit base address (a ticket holds
at most tiles.MAX_TICKET elements). For a group whose data pointers are all 16-byte aligned (ALIGNED), full
tiles are loaded and stored unmasked, and tails whose length is a multiple of VEC with a mask that is
constant over each vector, so both move 16 bytes per instruction; other groups keep element-wise accesses.

Numerics (docs/contract.md): the statistics of tiles, chunks and tensors are triton_moments.py's. A tensor
whose minimum equals its maximum is constant: its mean is set to that value and its multiplier to 0, so every
result is exactly 0. The per-tensor scalars (mean, std, 1/(std+eps)) are computed in float64 with correctly
rounded division and square root, and the float32 normalize pass subtracts the mean as a float32 pair (hi,
then lo), so ((x - hi) - lo) * inv keeps the mean's float64 precision; a tensor whose spread or multiplier is
beyond float32's comfortable range is normalized in float64 ("wide").

``stats`` keeps (mean, std, inv, wide) of every tensor after the launch (float64), so a fused optimizer can
reuse them: z = (g - mean) * inv.

With TIMELINE (a diagnostic variant, triton_host.timeline_) each ticket also leaves a row in timeline_ptr:
its start and end on the GPU's global timer, its program and SM, and the polls a normalize ticket waited;
the shipped variants compile without any of it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_moments import chunk_moments, merge_partials, range_factor, tile_moments
from .triton_tile_ops import load_tile, normalized, store_tile, to_output, wide_z

# The int64 table of work items and tensors: its layout is in triton_plan.py.
ITEM = tl.constexpr(4)

# A tensor is normalized in float64 ("wide") when its spread reaches WIDE_SPREAD or its multiplier leaves
# [1/WIDE_INV, WIDE_INV]: x - mean or the float32 multiplier could overflow or lose bits there.
WIDE_SPREAD = tl.constexpr(2.0**100)
WIDE_INV = tl.constexpr(2.0**100)


@triton.jit
def _normalize_chunk(
    ptr,
    count,
    mean,
    inv,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """ptr[0:count] <- (x - mean) * inv, tile by tile; whole groups of UNROLL full tiles first, their loads
    issued together, or with PREFETCH each full tile's loads issued before the previous tile is written (as
    in triton_moments.chunk_moments)."""
    start = count * 0
    if PREFETCH:
        offs = tl.arange(0, BLOCK)
        start = tl.multiple_of(count // BLOCK * BLOCK, BLOCK)  # the full tiles end here
        after = tl.load(ptr + offs, mask=offs < start, other=0.0)
        for tile in range(0, start, BLOCK):
            x = after
            after = tl.load(ptr + tile + BLOCK + offs, mask=tile + BLOCK + offs < start, other=0.0)
            tl.store(ptr + tile + offs, normalized(x.to(ACC), mean, inv, DTYPE, ACC))
    if UNROLL > 1:
        offs = tl.arange(0, BLOCK)
        groups = count // (UNROLL * BLOCK)
        for g in range(0, groups):
            at = ptr + g * (UNROLL * BLOCK)
            x0 = tl.load(at + offs)
            x1 = tl.load(at + BLOCK + offs)
            if UNROLL == 4:
                x2 = tl.load(at + 2 * BLOCK + offs)
                x3 = tl.load(at + 3 * BLOCK + offs)
            tl.store(at + offs, normalized(x0.to(ACC), mean, inv, DTYPE, ACC))
            tl.store(at + BLOCK + offs, normalized(x1.to(ACC), mean, inv, DTYPE, ACC))
            if UNROLL == 4:
                tl.store(at + 2 * BLOCK + offs, normalized(x2.to(ACC), mean, inv, DTYPE, ACC))
                tl.store(at + 3 * BLOCK + offs, normalized(x3.to(ACC), mean, inv, DTYPE, ACC))
        start = groups * (UNROLL * BLOCK)
    for tile in range(start, count, BLOCK):
        rem = count - tile
        x, _ = load_tile(ptr + tile, rem, ACC, BLOCK, VEC, ALIGNED)
        store_tile(ptr + tile, normalized(x, mean, inv, DTYPE, ACC), rem, BLOCK, VEC, ALIGNED)


@triton.jit
def _publish(stats_ptr, t, n, mean, m2, lo, hi, scale, eps, correction, ACC: tl.constexpr):
    """The tensor's (mean, std, inv, wide), float64, stored at stats[t]; returns (mean, inv, wide).
    inv = 1 / (std + eps), or s / (std + s*eps) for gradients scaled by s (scale is 1 otherwise); 0 for a
    constant tensor (its mean is then its value, so every result is exactly 0) and where std + eps is 0.
    wide is 0, or the factor f the float64 normalize scales x and the mean by (wide_z): 1, or, in a float64
    tensor of huge or tiny values, range_factor, which its statistics are scaled by; inv is then stored as
    inv / f, computed from the scaled statistics (inv itself could overflow or lose its bits there)."""
    constant = (lo == hi) & (mean == mean)
    mean = tl.where(constant, lo, mean)
    dof = tl.maximum(n.to(tl.float64) - tl.cast(correction, tl.float64), 0.0)
    # float64: sqrt.rn and div.rn on the GPU, correctly rounded like numpy's. A constant tensor's std is 0
    # exactly (merging chunk means can leave a rounding residue in m2: float64 1/3 repeated gave 5.6e-17).
    std = tl.where(constant, 0.0, tl.sqrt(m2 / dof))
    if tl.float64 == ACC:
        f = range_factor(lo, hi)  # std is the std times f here, as m2 is scaled
        denom = std + scale * tl.cast(eps, tl.float64) * f
    else:
        denom = std + scale * tl.cast(eps, tl.float64)
    inv = tl.where(constant | (denom == 0.0), 0.0, scale / denom)  # inv / f in float64
    wide = (hi - lo >= WIDE_SPREAD) | (inv > WIDE_INV) | ((inv < 1.0 / WIDE_INV) & (inv != 0.0))
    if tl.float64 == ACC:
        std = std / f
        wide = tl.where(wide | (f != 1.0), f, 0.0)
    else:
        wide = wide.to(tl.float64)
    tl.store(stats_ptr + 4 * t, mean)
    tl.store(stats_ptr + 4 * t + 1, std)
    tl.store(stats_ptr + 4 * t + 2, inv)
    tl.store(stats_ptr + 4 * t + 3, wide)
    return mean, inv, wide


@triton.jit
def _normalize_wide(ptr, count, mean, inv, wide, DTYPE: tl.constexpr, ACC: tl.constexpr, SUB: tl.constexpr):
    """ptr[0:count] <- (x - mean) * inv in float64 (wide_z), SUB values at a time (rare "wide" tensors)."""
    offs = tl.arange(0, SUB)
    for sub in range(0, count, SUB):
        mask = offs < count - sub
        x = tl.load(ptr + sub + offs, mask=mask, other=0.0).to(ACC)
        tl.store(ptr + sub + offs, to_output(wide_z(x, mean, inv, wide, ACC).to(ACC), DTYPE), mask=mask)


@triton.jit
def _pause(BACKOFF: tl.constexpr):
    """A short sleep between polls of a counter, so waiting programs leave issue slots and memory bandwidth
    to the ones they wait for (PTX nanosleep; nothing under the interpreter, which never waits)."""
    if BACKOFF:
        tl.inline_asm_elementwise(
            "nanosleep.u32 256; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _now(TIMELINE: tl.constexpr):
    """The GPU's global timer in ns (TIMELINE 1), or 0 where there is none (2: the interpreter)."""
    if TIMELINE == 1:
        t = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
    else:
        t = tl.cast(0, tl.int64)
    return t


@triton.jit
def _record_ticket(timeline_ptr, ticket, start, end, polls, TIMELINE: tl.constexpr):
    """The timeline variant's row of a ticket: start and end (ns), program and SM (SM << 32 | program), polls
    of its tensor's counter while waiting for statistics."""
    where = tl.program_id(0).to(tl.int64)
    if TIMELINE == 1:
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
        where += sm.to(tl.int64) << 32
    row = timeline_ptr + 4 * ticket.to(tl.int64)
    tl.store(row, start)
    tl.store(row + 1, end)
    tl.store(row + 2, where)
    tl.store(row + 3, polls.to(tl.int64))


@triton.jit
def _first_record(ticket, starts, S, P):
    """The record a ticket starts at: a statistics ticket's first chunk, from the table of starts; any other
    ticket's own, past the P chunk records."""
    if ticket < S:
        record = tl.load(starts + ticket).to(tl.int32)
    else:
        record = ticket - S + P
    return record


@triton.jit(do_not_specialize=["T", "S", "M", "P", "NUM_PROGRAMS", "spin_limit", "eps_bits", "correction"])
def znorm_queue_kernel(
    meta_ptr,  # int64 table, layout above
    base_ptr,  # int64 [T]: each tensor's address (a record holds its byte offset in its tensor)
    partial_ptr,  # float64 [4 * P]: (mean, M2, min, max) of every chunk of a large tensor
    stats_ptr,  # float64 [4 * T]: (mean, std, inv, wide) of every tensor, kept after the launch
    counter_ptr,  # int32 [3 + T]: ticket, programs done, error, per-tensor chunks done; 0 between launches
    scale_ptr,  # a 0-d scale tensor (read only when HAS_SCALE)
    eps_bits,  # eps as the bit pattern of its float64 value: a Python float argument would arrive as float32
    correction,
    T,
    S,  # statistics tickets, and as many normalize tickets
    M,
    P,  # chunks of the large tensors: statistics records and partial slots
    NUM_PROGRAMS,
    spin_limit,  # 0: wait as long as it takes; else give up after this many polls and flag counter[2]
    timeline_ptr,  # int64 [tickets, 4], written only with TIMELINE (_record_ticket)
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,  # full tiles whose loads a large tensor's chunk issues together: 1, 2 or 4
    PREFETCH: tl.constexpr,  # (UNROLL 1) each next full tile's loads issued before a tile is reduced/written
    PBLOCK: tl.constexpr,
    SUB: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes
    ALIGNED: tl.constexpr,  # every data pointer 16-byte aligned
    BACKOFF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    GIVEN: tl.constexpr,  # stats already holds every tensor's row: no statistics tickets, nobody waits
    TIMELINE: tl.constexpr = 0,  # diagnostics: 1 a row per ticket with the GPU's timer, 2 without it
):
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)  # (0 comes as an int32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float64)
    else:
        scale = tl.cast(1.0, tl.float64)
    tensor_table = meta_ptr + ITEM * (P + M + S).to(tl.int64)
    starts = tensor_table + ITEM * T
    total = P + M  # records
    if NORMALIZE:
        total += S

    skipped = 0
    if GIVEN:
        skipped = S  # no statistics tickets: tickets start at the small items
    ticket = skipped + tl.atomic_add(counter_ptr, 1, sem="relaxed")
    item = _first_record(ticket, starts, S, P)
    if TIMELINE:
        started = _now(TIMELINE)
    while item < total:
        record = meta_ptr + ITEM * item.to(tl.int64)
        offset = tl.load(record)
        count = tl.load(record + 1).to(tl.int32)
        t = tl.load(record + 2)
        aux = tl.load(record + 3)
        ptr = (tl.load(base_ptr + t) + offset).to(tl.pointer_type(DTYPE))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        # The next record: the run's next chunk, or after a ticket's last record the next ticket's first,
        # drawn now (awaited at the end of this item).
        following = item + 1
        next_ticket = ticket
        if (item >= P) | (aux >= 0x100000000):
            next_ticket = skipped + tl.atomic_add(counter_ptr, 1, sem="relaxed")
            following = _first_record(next_ticket, starts, S, P)
        polls = 0
        if item < P:
            # A chunk of a statistics ticket's run: its partial into its own slot.
            mean, m2, lo, hi = chunk_moments(ptr, count, ACC, BLOCK, UNROLL, SUB, VEC, ALIGNED, PREFETCH)
            slot = aux & 0xFFFFFFFF
            tl.store(partial_ptr + 4 * slot, mean)
            tl.store(partial_ptr + 4 * slot + 1, m2)
            tl.store(partial_ptr + 4 * slot + 2, lo)
            tl.store(partial_ptr + 4 * slot + 3, hi)
            run = (aux >> 32).to(tl.int32)  # the run's chunks on its last chunk, else 0
            if run != 0:
                nchunks = tl.load(tensor_table + ITEM * t + 3)
                done = tl.atomic_add(counter_ptr + 3 + t, run, sem="acq_rel")
                if done + run == nchunks:
                    # This run completed the tensor's chunks: merge in chunk order, publish, release.
                    n = tl.load(tensor_table + ITEM * t)
                    chunk = tl.load(tensor_table + ITEM * t + 1)
                    first = tl.load(tensor_table + ITEM * t + 2)
                    mean, m2, lo, hi = merge_partials(partial_ptr, first, nchunks, chunk, n, ACC, PBLOCK)
                    _publish(stats_ptr, t, n, mean, m2, lo, hi, scale, eps, correction, ACC)
                    tl.atomic_add(counter_ptr + 3 + t, 1, sem="release")
        elif item < P + M:
            # A small tensor: read once, statistics in registers, written once.
            y, mask = load_tile(ptr, count, ACC, BLOCK, VEC, ALIGNED)
            if GIVEN:
                mean = tl.load(stats_ptr + 4 * t)
                inv = tl.load(stats_ptr + 4 * t + 2)
                wide = tl.load(stats_ptr + 4 * t + 3)
            else:
                mean, m2, lo, hi = tile_moments(y, mask, ptr, count, ACC, SUB)
                mean, inv, wide = _publish(stats_ptr, t, count, mean, m2, lo, hi, scale, eps, correction, ACC)
            if NORMALIZE:
                if wide != 0.0:
                    _normalize_wide(ptr, count, mean, inv, wide, DTYPE, ACC, SUB)
                else:
                    store_tile(ptr, normalized(y, mean, inv, DTYPE, ACC), count, BLOCK, VEC, ALIGNED)
        else:
            # A normalize run: wait for the tensor's statistics (published when the tensor's counter
            # reaches aux, its chunks + 1), then one pass over the run.
            if GIVEN:
                seen = aux
            else:
                seen = tl.atomic_add(counter_ptr + 3 + t, 0, sem="acquire")
                while (seen < aux) & ((spin_limit == 0) | (polls < spin_limit)):
                    _pause(BACKOFF)
                    seen = tl.atomic_add(counter_ptr + 3 + t, 0, sem="acquire")
                    polls += 1
            if seen < aux:
                # Only with a spin limit (the host's debug switch): report the tensor, leave it unchanged.
                tl.atomic_xchg(counter_ptr + 2, (t + 1).to(tl.int32), sem="relaxed")
            else:
                mean = tl.load(stats_ptr + 4 * t, volatile=True)
                inv = tl.load(stats_ptr + 4 * t + 2, volatile=True)
                wide = tl.load(stats_ptr + 4 * t + 3, volatile=True)
                if wide != 0.0:
                    _normalize_wide(ptr, count, mean, inv, wide, DTYPE, ACC, SUB)
                else:
                    _normalize_chunk(ptr, count, mean, inv, DTYPE, ACC, BLOCK, UNROLL, VEC, ALIGNED, PREFETCH)
        if TIMELINE:  # noqa: SIM102 (a constexpr branch: the variant without it has no code here)
            if next_ticket != ticket:  # this record ended its ticket
                ended = _now(TIMELINE)
                _record_ticket(timeline_ptr, ticket, started, ended, polls, TIMELINE)
                started = ended
        ticket = next_ticket
        item = following

    # The last program out resets the counters: every other program has drawn its final ticket and finished.
    # The error flag (counter[2]) is left for the host, which clears it.
    if tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel") == NUM_PROGRAMS - 1:
        tl.store(counter_ptr, 0)
        tl.store(counter_ptr + 1, 0)
        for b in range(0, T, PBLOCK):
            idx = b + tl.arange(0, PBLOCK)
            tl.store(counter_ptr + 3 + idx, tl.zeros([PBLOCK], dtype=tl.int32), mask=idx < T)

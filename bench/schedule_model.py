"""A discrete-event model of the Triton queue kernel's schedule (issue #23): which program runs which ticket
when, so that a ticket layout or tile loop can be judged on the CPU before a GPU measures it.

What is modelled, per launch of ``znorm_queue_kernel`` (backends/triton_kernels.py):
- the grid: ``programs`` persistent programs (at most ``programs_per_sm`` per SM are resident; more start
  only as others leave, which in a drained queue changes nothing, so the model runs the resident ones);
- the queue: tickets in the table's order, drawn one ahead (a program draws its next ticket as it starts the
  current one, or, in a statistics run of several chunks, as it ends the run, about where the kernel draws
  it: on the run's last chunk);
- a ticket: a fixed latency chain (record, first loads, atomics, stores of partials), then its bytes streamed
  at the program's own rate, ``group bytes / (memory latency + compute per group)`` (the kernel has no load
  of the next group in flight while a group is reduced), scaled down when all streaming programs together
  ask for more than the memory system gives (one shared bandwidth, DRAM or L2, with processor sharing);
- a tensor's statistics: published after its last partial by the program that stored it (a merge whose
  cost grows with the tensor's partials); its normalize tickets wait for that, then wake after a poll;
- data in L2: a list whose bytes fit L2 is read from L2 (the benchmark calls the kernel on the same
  gradients over and over), else from DRAM.

The constants (``Machine``) are fitted to the three recorded H100 runs by bench/schedule_calibration.py,
which also prints the model's predictions for every list and design. A design is a ``Design`` value: the
tile size, the unroll, the chunking, and the ticket layout (one ticket per chunk in tensor order, as shipped
until #23, or guided runs of partials, as shipped since).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Design", "Machine", "Result", "Ticket", "simulate", "tickets_for"]


@dataclass(frozen=True)
class Machine:
    """The GPU as the model sees it; times in µs, bandwidths in bytes per µs."""

    sms: int = 132
    programs_per_sm: int = 2
    dram_bw: float = 3.0e6  # the copy rate of the large lists in the recorded runs
    l2_bw: float = 7.0e6
    l2_bytes: float = 40e6  # lists up to this many bytes are read from L2
    launch: float = 4.0  # launch to the first program's start, plus the last program's exit
    lat_dram: float = 1.0  # a dependent load's round trip when its data come from DRAM
    lat_l2: float = 0.5
    stat_fixed: float = 2.0  # a statistics ticket's chain besides its data: record, atomics, partial stores
    norm_fixed: float = 2.0  # a normalize ticket's: record, the acquire poll, the statistics row
    small_fixed: float = 2.0  # a small item's: record, statistics in float64, publication
    stat_tile: float = 0.3  # reducing one tile of 1024 elements (scaled by the tile size)
    norm_tile: float = 0.1  # normalizing one tile of 1024 elements
    spill: float = 0.01  # per byte of spills per thread, per group of tiles
    merge_fixed: float = 1.0  # merging a tensor's partials and publishing
    merge_partial: float = 0.002  # per partial merged
    wake: float = 0.5  # a waiting program sees a publication (poll interval and acquire)
    # Each further chunk of a statistics run read from a record of its own (the kernel as built for #23):
    # one dependent load more per chunk. Not fitted (no recorded run had runs): a DRAM round trip.
    chunk_fixed: float = 0.55

    @property
    def resident(self) -> int:
        return self.sms * self.programs_per_sm


@dataclass(frozen=True)
class Design:
    """A ticket layout and tile loop of the queue kernel.

    ``large_chunk``: tiles per chunk (partial) of tensors above ``large_tensor`` elements; ``mid_chunk`` for
    the others above one tile; with ``max_partials``, partials start at one tile and double until a tensor
    has at most that many (at most ``large_chunk`` tiles). ``runs``: None for one ticket per chunk in tensor
    order (the kernel until #23); else statistics and normalize tickets cover runs of consecutive partials of
    one tensor, cut by guided self-scheduling with divisor ``runs`` (``tickets_for``). ``prefetch``: in the
    tickets of tensors above ``large_tensor`` (whose chunks hold several tiles), the next tile's loads in
    flight while a tile is reduced (item 2 of #23, ``Tiles.prefetch``), which takes the compute out of the
    per-tile cycle; it goes with ``unroll`` 1, as in the kernel.
    """

    block: int = 8192
    unroll: int = 2
    large_chunk: int = 32
    mid_chunk: int = 1
    large_tensor: int = 1 << 20
    spills: int = 0  # bytes per thread, as ptxas reports them for this variant
    runs: int | None = None
    prefetch: bool = False
    max_partials: int | None = None
    min_partial: int = 1  # tiles: with max_partials, the shortest partial of a tensor above large_tensor
    largest_first: bool = False  # with runs: tensors cut largest first (else in the list's order)

    def chunk(self, numel: int) -> int:
        if self.max_partials is not None:
            tiles = -(-numel // (self.block * self.max_partials))
            if numel > self.large_tensor:
                tiles = max(tiles, self.min_partial)
            return self.block * min(self.large_chunk, 1 << (tiles - 1).bit_length())
        return self.block * (self.large_chunk if numel > self.large_tensor else self.mid_chunk)


@dataclass(frozen=True)
class Ticket:
    kind: str  # "stat", "small" or "norm"
    tensor: int
    elements: int
    partials: int  # partials a statistics ticket stores (1 for the others)
    large: bool  # its tensor is above large_tensor elements (its chunk loop issues `unroll` tiles at once)


def tickets_for(numels: Sequence[int], design: Design, programs: int) -> tuple[list[Ticket], list[int]]:
    """The queue of a launch (statistics, small, normalize tickets in order) and each tensor's partials.

    With ``design.runs = k``, a ticket covers a run of consecutive partials of one tensor, about a
    1/(k * programs) share of the elements not yet cut (guided self-scheduling: long tickets first, the last
    ones a partial each), cut tensor by tensor in the list's order (or largest tensor first)."""
    stats: list[Ticket] = []
    small: list[Ticket] = []
    norms: list[Ticket] = []
    partials = [0] * len(numels)
    order = range(len(numels))
    if design.runs is not None and design.largest_first:
        order = sorted(order, key=lambda t: -numels[t])
    remaining = sum(n for n in numels if n > design.block)
    for t in order:
        n = numels[t]
        if n <= design.block:
            small.append(Ticket("small", t, n, 1, False))
            continue
        chunk = design.chunk(n)
        parts = -(-n // chunk)
        partials[t] = parts
        large = n > design.large_tensor
        first = 0
        while first < parts:
            per = 1
            if design.runs is not None:
                per = max(1, -(-remaining // (design.runs * programs)) // chunk)
            k = min(per, parts - first)
            count = min(n, (first + k) * chunk) - first * chunk
            stats.append(Ticket("stat", t, count, k, large))
            norms.append(Ticket("norm", t, count, 1, large))
            remaining -= count
            first += k
    small.sort(key=lambda x: x.tensor)
    return stats + small + norms, partials


@dataclass
class Result:
    time: float  # µs, launch included
    busy: float  # mean fraction of the resident programs working (not waiting, not idle)
    tail: float  # µs between the exits of the first program that ran a ticket and of the last
    spans: list[tuple[int, int, float, float]] = field(default_factory=list)  # (program, ticket, start, end)
    queue: list[Ticket] = field(default_factory=list)  # the tickets the spans index (with record=True)


def simulate(
    numels: Sequence[int],
    elsize: int,
    design: Design,
    machine: Machine,
    programs: int | None = None,
    record: bool = False,
) -> Result:
    """The modelled device time of one launch on these tensor sizes."""
    m = machine
    progs = min(programs or m.resident, m.resident)
    queue, partials = tickets_for(numels, design, programs or m.resident)
    progs = max(1, min(progs, len(queue)))
    in_l2 = elsize * sum(numels) <= m.l2_bytes
    bw = m.l2_bw if in_l2 else m.dram_bw
    lat = m.lat_l2 if in_l2 else m.lat_dram
    scale = design.block / 1024

    def cycle(kind: str, large: bool) -> tuple[float, float]:
        """(bytes per group, µs per group when alone) of a ticket's stream."""
        tiles = design.unroll if large else 1
        group = tiles * design.block * elsize
        spill = m.spill * design.spills
        compute = (m.stat_tile if kind == "stat" else m.norm_tile) * scale * tiles + spill
        if kind == "small":
            compute = (m.stat_tile + m.norm_tile) * scale
        if kind != "stat":
            group *= 2  # read and write
        if design.prefetch and large:
            return group, max(lat, compute)
        return group, lat + compute

    done = [0] * len(numels)
    published = [math.inf] * len(numels)
    waiting: dict[int, list[int]] = {}
    # Events: real-time heap (latency phases) and a virtual-time heap (streams): every streaming program
    # advances at its own rate times one shared factor s = min(1, bw / demand).
    timeq: list[tuple[float, int, int]] = []  # (time, seq, program)
    streamq: list[tuple[float, int, int]] = []  # (virtual finish, seq, program)
    rate = [0.0] * progs
    phase = [0] * progs  # per program: 0 fixed part, 1 stream, 2 merge, 3 waiting for statistics
    current = [-1] * progs
    following = [-1] * progs
    started = [0.0] * progs
    nxt = 0
    seq = 0
    now = 0.0
    virtual = 0.0
    demand = 0.0
    busy_time = 0.0
    exits: list[float] = []
    worked: list[float] = []  # exits of the programs that ran a ticket
    spans: list[tuple[int, int, float, float]] = []

    def draw() -> int:
        nonlocal nxt
        k = nxt
        nxt += 1
        return k

    def push_time(p: int, at: float) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(timeq, (at, seq, p))

    def start(p: int, k: int) -> None:
        """Program p starts ticket k (or leaves if the queue is drained)."""
        if k >= len(queue):
            exits.append(now)
            if current[p] >= 0:
                worked.append(now)
            return
        current[p] = k
        tk = queue[k]
        following[p] = draw() if tk.kind != "stat" or tk.partials == 1 else -1  # a run draws at its end
        started[p] = now
        if tk.kind == "norm" and published[tk.tensor] > now:
            phase[p] = 3
            waiting.setdefault(tk.tensor, []).append(p)
            return
        begin_fixed(p)

    def begin_fixed(p: int) -> None:
        tk = queue[current[p]]
        fixed = {"stat": m.stat_fixed, "norm": m.norm_fixed, "small": m.small_fixed}[tk.kind]
        if tk.kind == "stat":
            fixed += (tk.partials - 1) * m.chunk_fixed
        if phase[p] == 3:  # it waited: its working time starts now
            fixed += m.wake
            started[p] = now
        phase[p] = 0
        push_time(p, now + fixed)

    def begin_stream(p: int) -> None:
        nonlocal seq, demand
        tk = queue[current[p]]
        group, per = cycle(tk.kind, tk.large)
        total = tk.elements * elsize * (1 if tk.kind == "stat" else 2)
        if tk.kind == "small":
            group = max(total, 1)  # one tile, read once and written once
        rate[p] = group / per
        demand += rate[p]
        phase[p] = 1
        seq += 1
        heapq.heappush(streamq, (virtual + total / rate[p], seq, p))

    def finish(p: int) -> None:
        nonlocal busy_time
        busy_time += now - started[p]
        if record:
            spans.append((p, current[p], started[p], now))
        start(p, following[p] if following[p] >= 0 else draw())

    def publish(t: int) -> None:
        published[t] = now
        for q in waiting.pop(t, []):
            begin_fixed(q)

    for p in range(progs):
        start(p, draw())

    while timeq or streamq:
        s = min(1.0, bw / demand) if demand > 0 else 1.0
        t_stream = now + (streamq[0][0] - virtual) / s if streamq else math.inf
        if timeq and timeq[0][0] <= t_stream:
            at, _, p = heapq.heappop(timeq)
            virtual += (at - now) * s
            now = at
            if phase[p] == 0:
                begin_stream(p)
            else:  # phase 2: a merge ended
                publish(queue[current[p]].tensor)
                finish(p)
            continue
        vfin, _, p = heapq.heappop(streamq)
        now, virtual = t_stream, vfin
        demand -= rate[p]
        if demand < 1e-9:
            demand = 0.0
        tk = queue[current[p]]
        if tk.kind == "stat":
            done[tk.tensor] += tk.partials
            if done[tk.tensor] == partials[tk.tensor]:
                phase[p] = 2
                push_time(p, now + m.merge_fixed + m.merge_partial * partials[tk.tensor])
                continue
        elif tk.kind == "small":
            published[tk.tensor] = now
        finish(p)

    if len(exits) < progs or any(math.isinf(published[t]) for t in range(len(numels)) if numels[t] > 0):
        raise RuntimeError("the modelled queue did not drain: a ticket waits for unpublished statistics")
    end = max(exits) if exits else 0.0
    return Result(
        time=end + m.launch,
        busy=busy_time / (progs * end) if end > 0 else 1.0,
        tail=end - min(worked) if worked else 0.0,
        spans=spans,
        queue=queue if record else [],
    )

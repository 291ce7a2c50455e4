"""The plans of the ZNorm queue kernel: per list of tensors, the int64 table of work items (one 32-byte
record each) and of tensor sizes on their device, the table of the tensors' addresses, and the mutable
workspace a launch uses.

Table layout (read by triton_kernels.py; S statistics tickets, M small items, T tensors, P chunks): records of
ITEM int64 fields, [byte offset of the first element in its tensor, element count, tensor, aux]: P chunk
records, M small items,
S normalize records; then ITEM fields per tensor, [numel, chunk, first slot, chunks]; then the S statistics
tickets' first chunk records (int64, zero-padded to whole rows). A tensor of more than ``block`` elements is
cut into chunks of ``tiles.chunk(numel)`` elements, each with its partial slot, and its chunks into runs
(``tiles.ticket_runs``, cut for the programs resident): a statistics ticket is one run, whose chunks have
consecutive records (aux: the chunk's slot, plus the run's chunks << 32 on its last one), and a normalize
ticket is the same run in one record (aux: its tensor's publication mark, chunks + 1). A small item's aux is
0. Within each phase the tickets follow the list's order, their runs cut by guided self-scheduling (long
first, one chunk each at the end, so that the last tickets drawn are short ones); the runs decide only which
program computes what, never a tensor's bits.

The table owes nothing to the tensors' addresses: they are a table of their own, ``bases`` (int64 [T]), and a
record's data start at ``bases[tensor] + offset``. Plans looked up by ``plan_for`` are cached by their
tensors' addresses and sizes; a caller that owns a plan (a bound group function, ``own_plan``) moves it to
new addresses with ``rebase``, which rewrites ``bases`` in stream order through pinned staging buffers of
its own: no new plan, and no allocation after its first move (the hook's gradients come back at new
addresses after ``zero_grad(set_to_none=True)``). The table of a list's sizes (a ``TableLayout``) is cached
apart. Tables reach the device through pinned memory without blocking; nothing synchronizes.

Workspaces (partials, statistics, counters) are left zeroed by every launch for the next. A plan uses one per
stream, shared with the plans of the same sizes on that stream (so launches sharing one are ordered there),
allocated on that stream so that the caching allocator frees it in that stream's order. A launch during
CUDA-graph capture gets a fresh workspace from the graph's pool (zeroed by a captured memset), and the
plan's tables are kept for the life of the process, since the graph reads them at every replay (a later
``rebase`` gives the plan new ones).
"""

from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .tiles import Tiles, ticket_runs, tiles_for
from .triton_common import ALIGNMENT, device_table, element_size, stream_of
from .triton_grid import resident_programs

__all__ = [
    "ITEM",
    "Plan",
    "TableLayout",
    "Workspace",
    "captured_tables",
    "clear_caches",
    "counts",
    "layout_for",
    "own_plan",
    "plan_for",
    "plans",
    "rebase",
    "table",
    "workspace_for",
    "workspace_pool",
]

ITEM = 4  # int64 fields per work item record (and per tensor record)
CACHE_SIZE = 16  # plans, table layouts and pooled workspaces kept (least recently used out)


@dataclass
class Workspace:
    """A launch's mutable state, used on one stream only."""

    partials: Tensor  # float64 [4 * P]: mean, M2, min, max per chunk of a large tensor
    stats: Tensor  # float64 [T, 4]: mean, std, inv, wide per tensor
    counters: Tensor  # int32 [3 + T]: ticket, programs done, error flag, per-tensor chunk counters
    dropped: bool = False  # a launch on it did not finish: its counters may be non-zero, never use it again


@dataclass(eq=False)
class Plan:
    """What a launch over one list of tensors reads: the work item table and the table of the tensors'
    addresses, on their device (the addresses change only by ``rebase``)."""

    meta: Tensor  # int64 table (layout above)
    bases: Tensor  # int64 [T]: each tensor's address (``rebase`` rewrites it)
    device: torch.device
    dtype: torch.dtype
    num_tensors: int
    num_stats_items: int  # statistics tickets (and as many normalize tickets)
    num_small_items: int
    num_partials: int  # chunks of the large tensors, each with its partial slot
    tiles: Tiles
    aligned: bool  # every data pointer is 16-byte aligned: the vector-access specialization
    numels: tuple[int, ...]  # the tensors' numbers of elements
    hosts: tuple = ()  # the pinned sources of tables copied during graph capture
    workspaces: dict[int, Workspace] = field(default_factory=dict)  # by stream (0 off CUDA)
    captured: bool = False  # a captured graph reads these tables
    written_on: int = 0  # the stream that last wrote ``bases`` (0 off CUDA)
    # Pinned buffers that ``rebase`` copies addresses from, each with the event of its last copy (a list
    # [tensor, event]), least recently used first.
    staging: list[list] = field(default_factory=list)
    # Prepared launches of the whole queue on its workspaces (triton_queue.launch_steady), by stream, eps,
    # correction and whether a scale is given.
    steady: dict[tuple, object] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return 2 * self.num_stats_items + self.num_small_items

    def new_workspace(self) -> Workspace:
        p, t = self.num_partials, self.num_tensors
        return Workspace(
            partials=torch.empty(max(4 * p, 1), dtype=torch.float64, device=self.device),
            stats=torch.zeros((t, 4), dtype=torch.float64, device=self.device),
            counters=torch.zeros(3 + t, dtype=torch.int32, device=self.device),
        )


@dataclass
class Counts:
    """How many plans were built (tables made and copied to the device) and moved: a diagnostic, for the
    benchmark's count of the paths a training step's hook took."""

    built: int = 0
    rebased: int = 0  # moved in place (``rebase``)


counts = Counts()
plans: OrderedDict[tuple, Plan] = OrderedDict()
# Workspaces by (device, stream, P, T), what sizes them: plans of the same sizes on one stream share one
# (their launches are ordered on that stream, and each leaves it zeroed), so a list that moves to new
# addresses outside a bound group (a new plan from plan_for) allocates and zeroes no new workspace.
workspace_pool: OrderedDict[tuple, Workspace] = OrderedDict()
captured_tables: list[tuple] = []  # tables a captured graph reads: kept for the life of the process


def table(numels, elsize: int, tiles: Tiles, programs: int) -> tuple[list[int], int, int, int]:
    """The int64 table (layout above), cut for ``programs`` resident programs, and its numbers of statistics
    tickets, small items and chunks."""
    # A record per chunk of a statistics run, not one per run: the kernel takes a run one chunk per pass of
    # its loop, each read from its own record before its data, as a lone ticket's (a loop over the run inside
    # one pass holds more values live, in registers the chunk's tiles need).
    chunks, small_items, normalize, tensors, starts = [], [], [], [], []
    slot = 0
    for t, (n, runs) in enumerate(zip(numels, ticket_runs(numels, tiles, programs))):
        if n <= tiles.block:
            small_items += (0, n, t, 0)
            tensors += (n, 0, 0, 0)
            continue
        chunk = tiles.chunk(n)
        nchunks = -(-n // chunk)
        tensors += (n, chunk, slot, nchunks)
        c = 0
        for k in runs:
            starts.append(len(chunks) // ITEM)
            for j in range(c, c + k):
                last = j == c + k - 1
                chunks += (
                    j * chunk * elsize,
                    min(chunk, n - j * chunk),
                    t,
                    (slot + j) | (k << 32 if last else 0),
                )
            normalize += (c * chunk * elsize, min((c + k) * chunk, n) - c * chunk, t, nchunks + 1)
            c += k
        slot += nchunks
    tickets = len(starts)
    starts += [0] * (-tickets % ITEM)
    return chunks + small_items + normalize + tensors + starts, tickets, len(small_items) // ITEM, slot


@dataclass
class TableLayout:
    """A list's table (it owes everything to the tensors' sizes) and its numbers of items."""

    template: Tensor  # int64 [rows * ITEM], CPU
    num_stats_items: int
    num_small_items: int
    num_partials: int
    pinned: Tensor | None = None  # the template in pinned memory, the source of every device copy


layouts: OrderedDict[tuple, TableLayout] = OrderedDict()


def layout_for(numels: tuple[int, ...], elsize: int, tiles: Tiles, programs: int) -> TableLayout:
    # The table owes its chunks and runs to the tiles (ticket_runs' inputs) and to the programs.
    key = (numels, elsize, tiles, programs)
    layout = layouts.get(key)
    if layout is None:
        rows, s, m, p = table(numels, elsize, tiles, programs)
        layout = layouts[key] = TableLayout(torch.tensor(rows, dtype=torch.int64), s, m, p)
        if len(layouts) > CACHE_SIZE:
            layouts.popitem(last=False)
    else:
        layouts.move_to_end(key)
    return layout


def _aligned(addrs: Sequence[int] | np.ndarray) -> bool:
    # every address a multiple of ALIGNMENT: then so is their bitwise or (one C-level pass)
    if isinstance(addrs, np.ndarray):
        return int(np.bitwise_or.reduce(addrs, initial=0)) % ALIGNMENT == 0
    return functools.reduce(operator.or_, addrs, 0) % ALIGNMENT == 0


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _keep_for_graph(plan: Plan) -> None:
    """A captured graph reads (or writes, by a captured copy) the plan's tables at every replay: kept for the
    life of the process, and never rewritten in place (``rebase``)."""
    plan.captured = True
    captured_tables.append((plan.meta, plan.bases, plan.hosts))


def _describe(tensors: list[Tensor], tiles: Tiles | None, numels, addrs) -> tuple:
    """(addresses, sizes, device, dtype, tiles) of a list: those given, else read from the tensors."""
    if addrs is None:
        addrs = tuple(map(Tensor.data_ptr, tensors))
    if numels is None:
        numels = tuple(map(Tensor.numel, tensors))
    first = tensors[0]
    return (
        addrs,
        numels,
        first.device,
        first.dtype,
        tiles if tiles is not None else tiles_for(first.dtype, numels),
    )


def _build(
    addrs: tuple[int, ...], numels: tuple[int, ...], device: torch.device, dtype, tiles: Tiles
) -> Plan:
    counts.built += 1
    programs = resident_programs(device, tiles.programs)  # what the tickets are cut for
    layout = layout_for(numels, element_size(dtype), tiles, programs)
    if device.type == "cuda":
        if layout.pinned is None:  # read by asynchronous copies, never written: pinned once
            layout.pinned = layout.template.pin_memory()
        meta, host = device_table(layout.pinned, device, pinned=True)
    else:
        meta, host = layout.template, None
    bases, host_bases = device_table(list(addrs), device)
    plan = Plan(
        written_on=stream_of(device),
        meta=meta,
        bases=bases,
        device=device,
        dtype=dtype,
        num_tensors=len(addrs),
        num_stats_items=layout.num_stats_items,
        num_small_items=layout.num_small_items,
        num_partials=layout.num_partials,
        tiles=tiles,
        aligned=_aligned(addrs),
        numels=numels,
        hosts=tuple(h for h in (host, host_bases) if h is not None),
    )
    if _capturing(device):  # its tables are copied by the graph at every replay
        _keep_for_graph(plan)
    return plan


def own_plan(tensors: list[Tensor]) -> Plan:
    """A plan for these tensors, with their own tiles, that no other caller shares (``plan_for``'s,
    uncached): its owner may ``rebase`` it."""
    return _build(*_describe(tensors, None, None, None))


def rebase(plan: Plan, addrs: Sequence[int] | np.ndarray) -> None:
    """Move an owned plan to tensors of the same sizes at ``addrs`` (ints, or an int64 array), in the current
    stream's order. Where its ``bases`` were last written on this stream, every launch of the plan so far ran
    on it and no graph reads them, they are rewritten in place from one of its two pinned staging buffers
    (made at its first such move; a buffer is written again once its last copy is done); else the plan gets
    new ``bases`` (the old ones may still be read or written there) and its prepared launches and workspaces
    are dropped, to be found again at its next launch. Nothing of the plan changes where this raises before
    the new addresses are written."""
    counts.rebased += 1
    device = plan.device
    if device.type != "cuda":  # the interpreter's launches are done when they return
        host = np.asarray(addrs, dtype=np.int64)
        aligned = _aligned(host)
        plan.bases.numpy()[:] = host
        _realign(plan, aligned)
        return
    stream = stream_of(device)
    capturing = _capturing(device)
    elsewhere = plan.written_on != stream or any(s != stream for s in plan.workspaces)
    if capturing or plan.captured or elsewhere:
        host = np.array(addrs, dtype=np.int64)
        aligned = _aligned(host)
        plan.bases, kept = device_table(torch.from_numpy(host), device)
        plan.written_on = stream
        if kept is not None:  # (the pinned sources of earlier captured copies stay kept too)
            plan.hosts = (*plan.hosts, kept)
        plan.steady.clear()
        plan.workspaces.clear()
        plan.captured = False
        if capturing:  # a graph writes these bases at every replay
            _keep_for_graph(plan)
        _realign(plan, aligned)
        return
    # Two staging buffers, made at the first move, in the order of their last use: the first whose copy is
    # done, else (two moves queued within one launch's time) the least recently used, once its copy is done.
    if not plan.staging:
        pinned = torch.empty((2, plan.num_tensors), dtype=torch.int64, pin_memory=True)
        plan.staging = [[pinned[0], torch.cuda.Event()], [pinned[1], torch.cuda.Event()]]
    buf = next((b for b in plan.staging if b[1].query()), None)
    if buf is None:
        buf = plan.staging[0]
        buf[1].synchronize()
    plan.staging = [b for b in plan.staging if b is not buf] + [buf]
    host = buf[0].numpy()
    host[:] = addrs
    plan.bases.copy_(buf[0], non_blocking=True)
    buf[1].record(torch.cuda.current_stream(device))
    _realign(plan, _aligned(host))


def _realign(plan: Plan, aligned: bool) -> None:
    """The plan's alignment specialization for its new addresses; its prepared launches dropped where it
    changes."""
    if aligned != plan.aligned:
        plan.aligned = aligned
        plan.steady.clear()


def plan_for(
    tensors: list[Tensor],
    tiles: Tiles | None = None,
    numels: tuple[int, ...] | None = None,
    addrs: tuple[int, ...] | None = None,
) -> Plan:
    """The cached plan for these tensors' addresses and sizes (``numels`` and ``addrs`` when the caller knows
    them), with ``tiles`` or else the list's own (``tiles_for``)."""
    addrs, numels, device, dtype, tiles = _describe(tensors, tiles, numels, addrs)
    # (The programs the tickets are cut for follow from the device and the tiles: no key of their own.)
    key = (device, dtype, tiles, addrs, numels)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _build(addrs, numels, device, dtype, tiles)
        if len(plans) > CACHE_SIZE:
            plans.popitem(last=False)
    else:
        plans.move_to_end(key)
    return plan


def workspace_for(plan: Plan, stream: int) -> Workspace:
    """The plan's workspace for this stream (made on first use), or a fresh one from the graph's pool while
    the stream is being captured."""
    if _capturing(plan.device):
        if not plan.captured:  # the graph reads these tables at every replay: never free them
            _keep_for_graph(plan)
        return plan.new_workspace()
    ws = plan.workspaces.get(stream)
    if ws is None or ws.dropped:
        # (A plan that keeps its workspace does not refresh the pool's order: an entry may age out while a
        # plan still holds it, which costs the next plan of those sizes one allocation, nothing else.)
        key = (plan.device, stream, plan.num_partials, plan.num_tensors)
        ws = workspace_pool.get(key)
        if ws is None or ws.dropped:
            ws = workspace_pool[key] = plan.new_workspace()
            if len(workspace_pool) > CACHE_SIZE:
                workspace_pool.popitem(last=False)
        workspace_pool.move_to_end(key)
        if stream not in plan.workspaces and plan.device.type == "cuda":
            # The tables may be freed (plan evicted, bases replaced) while this stream still reads them.
            current = torch.cuda.current_stream(plan.device)
            plan.meta.record_stream(current)
            plan.bases.record_stream(current)
        plan.workspaces[stream] = ws
    return ws


def clear_caches() -> None:
    """Drop every cached plan, table layout and pooled workspace (captured tables are kept)."""
    plans.clear()
    layouts.clear()
    workspace_pool.clear()

"""The plans of the ZNorm queue kernel: per list of tensors, the int64 table of work items (one 32-byte
record each) and of tensor sizes on their device, and the mutable workspace a launch uses.

Table layout (read by triton_kernels.py; S statistics tickets, M small items, T tensors, P chunks): records of
ITEM int64 fields, [address of the first element, element count, tensor, aux]: P chunk records, M small items,
S normalize records; then ITEM fields per tensor, [numel, chunk, first slot, chunks]; then the S statistics
tickets' first chunk records (int64, zero-padded to whole rows). A tensor of more than ``block`` elements is
cut into chunks of ``tiles.chunk(numel)`` elements, each with its partial slot, and its chunks into runs
(``tiles.ticket_runs``, cut for the programs resident): a statistics ticket is one run, whose chunks have
consecutive records (aux: the chunk's slot, plus the run's chunks << 32 on its last one), and a normalize
ticket is the same run in one record (aux: its tensor's publication mark, chunks + 1). A small item's aux is
0. Within each phase the tickets follow the list's order, their runs cut by guided self-scheduling (long
first, one chunk each at the end, so that the last tickets drawn are short ones); the runs decide only which
program computes what, never a tensor's bits.

Plans are cached while the tensors' addresses and sizes stay the same (an optimizer's gradients usually do
from step to step). What a table owes to the sizes alone (a ``TableLayout``) is cached apart, so a list that
moves to new addresses gets its table from a few numpy operations. A table reaches the device through pinned
memory without blocking; nothing synchronizes.

Workspaces (partials, statistics, counters) are left zeroed by every launch for the next. A plan uses one per
stream, shared with the plans of the same sizes on that stream (so launches sharing one are ordered there),
allocated on that stream so that the caching allocator frees it in that stream's order. A launch during
CUDA-graph capture gets a fresh workspace from the graph's pool (zeroed by a captured memset), and the
plan's table is kept for the life of the process, since the graph reads it at every replay.
"""

from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .tiles import Tiles, ticket_runs, tiles_for
from .triton_common import ALIGNMENT, device_table, element_size
from .triton_grid import resident_programs

__all__ = [
    "ITEM",
    "Plan",
    "TableLayout",
    "Workspace",
    "captured_plans",
    "clear_caches",
    "counts",
    "layout_for",
    "plan_for",
    "plans",
    "table",
    "table_at",
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
    """The read-only part of a launch for one list of tensors: the work item table, on their device."""

    meta: Tensor  # int64 table (layout above)
    device: torch.device
    dtype: torch.dtype
    num_tensors: int
    num_stats_items: int  # statistics tickets (and as many normalize tickets)
    num_small_items: int
    num_partials: int  # chunks of the large tensors, each with its partial slot
    tiles: Tiles
    aligned: bool  # every data pointer is 16-byte aligned: the vector-access specialization
    numels: tuple[int, ...]  # the tensors' numbers of elements
    host: Tensor | None = None  # the pinned source of a table copied during graph capture
    workspaces: dict[int, Workspace] = field(default_factory=dict)  # by stream (0 off CUDA)
    captured: bool = False
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
    """How many plans were built (a table made and copied to the device): a diagnostic, for the benchmark's
    count of the paths a training step's hook took."""

    built: int = 0


counts = Counts()
plans: OrderedDict[tuple, Plan] = OrderedDict()
# Workspaces by (device, stream, P, T), what sizes them: plans of the same sizes on one stream share one
# (their launches are ordered on that stream, and each leaves it zeroed), so gradients that move to new
# addresses, which need a new plan (table), allocate and zero no new workspace.
workspace_pool: OrderedDict[tuple, Workspace] = OrderedDict()
captured_plans: list[Plan] = []  # tables a captured graph reads: kept for the life of the process


def table(addrs, numels, elsize: int, tiles: Tiles, programs: int) -> tuple[list[int], int, int, int]:
    """The int64 table (layout above), cut for ``programs`` resident programs, and its numbers of statistics
    tickets, small items and chunks."""
    # A record per chunk of a statistics run, not one per run: the kernel takes a run one chunk per pass of
    # its loop, each read from its own record before its data, as a lone ticket's (a loop over the run inside
    # one pass holds more values live, in registers the chunk's tiles need).
    chunks, small_items, normalize, tensors, starts = [], [], [], [], []
    slot = 0
    for t, (addr, n, runs) in enumerate(zip(addrs, numels, ticket_runs(numels, tiles, programs))):
        if n <= tiles.block:
            small_items += (addr, n, t, 0)
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
                    addr + j * chunk * elsize,
                    min(chunk, n - j * chunk),
                    t,
                    (slot + j) | (k << 32 if last else 0),
                )
            normalize += (addr + c * chunk * elsize, min((c + k) * chunk, n) - c * chunk, t, nchunks + 1)
            c += k
        slot += nchunks
    tickets = len(starts)
    starts += [0] * (-tickets % ITEM)
    return chunks + small_items + normalize + tensors + starts, tickets, len(small_items) // ITEM, slot


@dataclass(frozen=True)
class TableLayout:
    """What a plan's table owes to its tensors' sizes alone: the table of tensors at address 0 (each item's
    address is then its byte offset within its tensor), its owners, and its numbers of items."""

    template: Tensor  # int64 [rows, ITEM], CPU
    items: int  # the first rows are records (address, count, tensor, aux); then tensors and starts
    num_stats_items: int
    num_small_items: int
    num_partials: int
    owners: np.ndarray  # int64 [items]: each work item's tensor


layouts: OrderedDict[tuple, TableLayout] = OrderedDict()


def layout_for(numels: tuple[int, ...], elsize: int, tiles: Tiles, programs: int) -> TableLayout:
    # The table owes its chunks and runs to the tiles (ticket_runs' inputs) and to the programs.
    key = (numels, elsize, tiles, programs)
    layout = layouts.get(key)
    if layout is None:
        rows, s, m, p = table([0] * len(numels), numels, elsize, tiles, programs)
        template = torch.tensor(rows, dtype=torch.int64).view(-1, ITEM)
        items = p + m + s
        layout = layouts[key] = TableLayout(template, items, s, m, p, template[:items, 2].numpy().copy())
        if len(layouts) > CACHE_SIZE:
            layouts.popitem(last=False)
    else:
        layouts.move_to_end(key)
    return layout


def table_at(layout: TableLayout, addrs: tuple[int, ...], pinned: bool = False) -> Tensor:
    """``table(addrs, ...)`` as an int64 CPU tensor (in pinned memory if ``pinned``), from the layout: each
    record's address is its tensor's address (picked by the record's tensor column) plus its offset (a record
    lies in one tensor; a run too). A few numpy operations written straight into the tensor, where building
    the table in Python costs time per chunk (gradients that move every step need a new one)."""
    out = torch.empty(layout.template.shape, dtype=torch.int64, pin_memory=pinned)
    dst, src = out.numpy(), layout.template.numpy()
    dst[layout.items :] = src[layout.items :]
    dst[: layout.items, 1:] = src[: layout.items, 1:]
    bases = np.fromiter(addrs, dtype=np.int64, count=len(addrs))
    np.add(src[: layout.items, 0], bases[layout.owners], out=dst[: layout.items, 0])
    return out.view(-1)


def _build(
    addrs: tuple[int, ...], numels: tuple[int, ...], device: torch.device, dtype, tiles: Tiles
) -> Plan:
    programs = resident_programs(device, tiles.programs)  # what the tickets are cut for
    layout = layout_for(numels, element_size(dtype), tiles, programs)
    pinned = device.type == "cuda"
    meta, host = device_table(table_at(layout, addrs, pinned), device, pinned)
    return Plan(
        meta=meta,
        device=device,
        dtype=dtype,
        num_tensors=len(addrs),
        num_stats_items=layout.num_stats_items,
        num_small_items=layout.num_small_items,
        num_partials=layout.num_partials,
        tiles=tiles,
        # every address a multiple of ALIGNMENT: then so is their bitwise or (one C-level pass)
        aligned=functools.reduce(operator.or_, addrs, 0) % ALIGNMENT == 0,
        numels=numels,
        host=host,
    )


def plan_for(
    tensors: list[Tensor],
    tiles: Tiles | None = None,
    numels: tuple[int, ...] | None = None,
    addrs: tuple[int, ...] | None = None,
) -> Plan:
    """The cached plan for these tensors' addresses and sizes (``numels`` and ``addrs`` when the caller knows
    them), with ``tiles`` or else the list's own (``tiles_for``)."""
    if addrs is None:
        addrs = tuple(map(Tensor.data_ptr, tensors))
    if numels is None:
        numels = tuple(map(Tensor.numel, tensors))
    first = tensors[0]
    if tiles is None:
        tiles = tiles_for(first.dtype, numels)
    # (The programs the tickets are cut for follow from the device and the tiles: no key of their own.)
    key = (first.device, first.dtype, tiles, addrs, numels)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _build(addrs, numels, first.device, first.dtype, tiles)
        if len(plans) > CACHE_SIZE:
            plans.popitem(last=False)
    else:
        plans.move_to_end(key)
    return plan


def workspace_for(plan: Plan, stream: int) -> Workspace:
    """The plan's workspace for this stream (made on first use), or a fresh one from the graph's pool while
    the stream is being captured."""
    if plan.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        if not plan.captured:  # the graph reads this table at every replay: never free it
            plan.captured = True
            captured_plans.append(plan)
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
            # The table may be freed (plan evicted) while this stream still reads it.
            plan.meta.record_stream(torch.cuda.current_stream(plan.device))
        plan.workspaces[stream] = ws
    return ws


def clear_caches() -> None:
    """Drop every cached plan, table layout and pooled workspace (captured plans are kept)."""
    plans.clear()
    layouts.clear()
    workspace_pool.clear()

"""The plans of the fused optimizer updates (triton_optim.py): per list of tensors, the int64 table of work
items and tensor records on their device, cached by the tensors' addresses and sizes (as triton_plan caches
the queue kernel's), copied from pinned memory without blocking, and kept for the life of the process once a
launch that reads it was captured in a CUDA graph.

Table layout (read by triton_optim_kernels.py): I items of ITEM int64 fields, [tensor record, first element,
element count, 0]; then T tensor records of TENSOR fields, [param, grad, state 1, state 2, state 3 addresses,
numel, first (SGD: the momentum buffer is new), row (the tensor's index in the caller's list)]; states: SGD
(momentum buffer, 0, 0), Adam (exp_avg, exp_avg_sq, max_exp_avg_sq or 0).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .tiles import UpdateTiles, update_tiles_for
from .triton_common import ALIGNMENT, device_table, stream_of

__all__ = ["Plan", "captured_plans", "keep_table", "plans", "update_plan"]

ITEM = 4  # int64 fields per work item: [tensor record, first element, element count, 0]
TENSOR = 8  # int64 fields per tensor record: [param, grad, state 1-3 addresses, numel, first, row]
CACHE_SIZE = 16  # plans kept (least recently used out)


@dataclass(eq=False)
class Plan:
    meta: Tensor  # int64 table: ITEM fields per item, then TENSOR fields per tensor
    num_items: int
    aligned: bool
    tiles: UpdateTiles
    numels: tuple = ()
    host: Tensor | None = None  # pinned source kept when built during graph capture
    streams: set = field(default_factory=set)
    captured: bool = False


plans: dict[tuple, Plan] = {}
captured_plans: list[Plan] = []  # tables a captured graph reads: kept for the life of the process


def _table(addrs, numels, firsts, tiles: UpdateTiles) -> tuple[list[int], int]:
    items, tensors = [], []
    for row, (a, n, first) in enumerate(zip(addrs, numels, firsts)):
        if n == 0:
            continue
        t = len(tensors) // TENSOR
        tensors += (*a, n, int(first), row)
        for start in range(0, n, tiles.chunk):
            items += (t, start, min(tiles.chunk, n - start), 0)
    return items + tensors, len(items) // ITEM


def update_plan(
    lists: list[list[Tensor]], firsts: tuple, first_key, device, dtype, tiles: UpdateTiles | None = None
) -> Plan:
    """The cached plan of validated lists ([params, grads, *states], up to three states): what a launch
    needs that depends on the tensors' addresses and sizes only (a caller that knows them unchanged keeps
    it). ``firsts``: per tensor, whether its first state is new (SGD's momentum buffer)."""
    tiles = tiles or update_tiles_for(dtype)
    n = len(lists[0])
    columns = [tuple(map(Tensor.data_ptr, lst)) for lst in lists]
    addrs = tuple(zip(*columns, *(itertools.repeat(0, n) for _ in range(5 - len(lists)))))
    numels = tuple(p.numel() for p in lists[0])
    key = (device, dtype, tiles, addrs, numels, first_key)
    plan = plans.pop(key, None)
    if plan is None:
        table, num_items = _table(addrs, numels, firsts, tiles)
        meta, host = device_table(table, device)
        aligned = all(x % ALIGNMENT == 0 for a in addrs for x in a)
        plan = Plan(meta=meta, num_items=num_items, aligned=aligned, tiles=tiles, numels=numels, host=host)
    plans[key] = plan  # (re)inserted last: the dict's order is the least recently used first
    if len(plans) > CACHE_SIZE:
        del plans[next(iter(plans))]
    return plan


def keep_table(plan: Plan, device: torch.device) -> None:
    """Keep the table alive for every stream (and every captured graph) that reads it."""
    if device.type != "cuda":
        return
    if torch.cuda.is_current_stream_capturing():
        if not plan.captured:
            plan.captured = True
            captured_plans.append(plan)
        return
    stream = stream_of(device)
    if stream not in plan.streams:
        plan.streams.add(stream)
        plan.meta.record_stream(torch.cuda.current_stream(device))

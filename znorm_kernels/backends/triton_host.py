"""The "triton" backend: host side of the single-launch multi-tensor ZNorm kernel (triton_kernels.py).

Per (device, dtype) group it builds a plan: the int64 table of work items (one 32-byte record each) and of
tensor sizes, on the device. Plans are cached while the tensors' addresses and sizes stay the same (an
optimizer's gradients usually do from step to step), so a call costs a cache look-up and one launch. The
table reaches the device through pinned memory without blocking; nothing synchronizes. Dense tensors in any
layout (channels_last, permuted) are normalized where they lie, since mean and std do not depend on element
order; non-dense views are gathered into a contiguous copy and written back.

Safe wherever PyTorch code runs (docs/contract.md, rule 12):
- Device: every launch runs under its tensors' device, whichever device is current.
- Streams: a launch's workspace (partials, statistics, counters) is mutable state that each launch leaves
  zeroed for the next. A plan uses one workspace per stream, allocated on that stream and shared with the
  plans of the same sizes there, so launches sharing one are ordered on their stream, and the caching
  allocator frees it in that stream's order. The table is read-only and recorded on every stream that uses
  it. A launch that raises drops its workspace, for every plan. So the
  counters are zero at every launch, and a wait that never ends cannot arise; ``set_spin_limit`` (or
  ``ZNORM_SPIN_LIMIT``) turns a wait past a bound into an error, for debugging.
- CUDA graphs: a launch during capture gets a fresh workspace from the graph's pool (zeroed by a captured
  memset, so every replay starts clean), and the plan's table is kept for the life of the process, since the
  graph reads it at every replay. A plan first needed during capture is built then: its pinned host table is
  kept too (the captured copy reads it at each replay). Warm-up calls before capture (which PyTorch asks for
  anyway) build the plans outside the graph.
"""

from __future__ import annotations

import functools
import operator
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import is_dense, triton_interpret
from .triton_launch import launcher_for

__all__ = [
    "apply_",
    "apply_rows",
    "group_fn",
    "serves",
    "set_spin_limit",
    "statistics",
    "unavailable",
    "znorm_group_",
]

# Elements one program holds in registers: a tensor of at most BLOCK elements is a single small item.
# 8192 (32 KB of float32 per tile): on the H100 (bench/RESULTS.md, third GPU run) 8192-element tiles with
# unroll 2 moved the 707 M list at 95% (float32) and 80% (bfloat16) of the copy rate, against 90% and 67% as
# shipped before (4096); with unroll 1, ResNet-56's 167 small tensors took up to 2 µs longer than with 4096.
BLOCK = {torch.float64: 2048}
DEFAULT_BLOCK = 8192
# Tiles whose loads a large tensor's chunk issues together, in lists that hold a large tensor (above
# LARGE_TENSOR; every other list runs with 1). The unrolled loop costs registers (spills under Triton 3.6)
# and made ResNet-56's list, which has no large tensor, 1-3 µs slower; on the 707 M list 2 tiles beat 1 and 4.
# Bits do not depend on it: the chunks are the same, and their tiles merge one by one.
LARGE_UNROLL = 2
# Tensors above this many elements use chunks of LARGE_CHUNK_TILES tiles (fewer partials and tickets, and a
# program's loads restart less often); below, a chunk is one tile. A function of the tensor's own size.
LARGE_TENSOR = 1 << 20
LARGE_CHUNK_TILES = 32
# Tiles per chunk of the tensors between BLOCK and LARGE_TENSOR elements (ResNet-50's convolutions, most of
# its list). One, as measured so far: each such chunk is one statistics and one normalize ticket of a single
# tile, with no loads of a next tile in flight while a tile's sums run. bench.gpu_probe --mid-chunk-tiles
# times other values (ResNet-50 in bfloat16 ran at 23% of the copy rate on the third H100 run, unexplained).
MID_CHUNK_TILES = 1
PBLOCK = 1024  # partials merged per vector step
SUB = 512  # values per step of the rare float64 paths (re-read from cache, few registers)
PLAN_CACHE_SIZE = 16
NUM_WARPS = 8
MAX_REGISTERS = 128
ITEM = 4  # int64 fields per work item record
ALIGNMENT = 16  # bytes: the vector width of the aligned specialization
# Programs per SM until the compiled kernel says otherwise (its registers and shared memory): ptxas gives
# float32 128 registers per thread at 8 warps, so 2 programs fit an SM.
DEFAULT_PROGRAMS_PER_SM = 2

_spin_limit = int(os.environ.get("ZNORM_SPIN_LIMIT", "0") or 0)


def set_spin_limit(polls: int) -> None:
    """Debug switch: with ``polls`` > 0, a program that waits more than that many polls for a tensor's
    statistics gives up, and the launch raises RuntimeError naming the tensor (the host then synchronizes
    after every launch to check). 0 (the default) waits as long as it takes, without synchronizing."""
    global _spin_limit
    if isinstance(polls, bool) or not isinstance(polls, int) or polls < 0:
        raise ValueError(f"polls must be an int >= 0, got {polls!r}")
    _spin_limit = polls


def unavailable(name: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA device (CPU tensors run through Triton only under TRITON_INTERPRET=1)"
    if triton_interpret():
        return _interpreter_broken()
    return None


def _major_minor(version: str) -> tuple[int, int]:
    parts = re.match(r"(\d+)\.(\d+)", version)
    return (int(parts[1]), int(parts[2])) if parts else (0, 0)


@functools.cache
def _interpreter_broken() -> str | None:
    """Why Triton's interpreter cannot run here, or None. Triton before 3.7 interprets ``range()`` bounds
    loaded from memory by converting 1-element arrays to Python ints, which numpy 2.4 made an error ("only
    0-dimensional arrays can be converted to Python scalars"): every kernel with such a loop fails (seen with
    Triton 3.6.0 and numpy 2.4.6; Triton 3.7.1 and 3.8.0 with numpy 2.4, and 3.6.0 with numpy 2.3, work)."""
    import numpy
    import triton

    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails with numpy "
            f"{numpy.__version__}: use numpy<2.4 or triton>=3.7 (on a GPU the interpreter is not used)"
        )
    return None


def serves(name: str, device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return None
    return "Triton takes CUDA tensors (and CPU tensors only under TRITON_INTERPRET=1)"


def group_fn(name: str):
    return znorm_group_


def block_for(dtype: torch.dtype) -> int:
    return BLOCK.get(dtype, DEFAULT_BLOCK)


def unroll_for(dtype: torch.dtype, numels=()) -> int:
    """UNROLL of a launch over tensors of these sizes: LARGE_UNROLL where one of them is above LARGE_TENSOR
    (float64 excepted: its tiles hold as many bytes with no unrolling), else 1."""
    if dtype == torch.float64 or not numels or max(numels) <= LARGE_TENSOR:
        return 1
    return LARGE_UNROLL


def tiles_for(dtype: torch.dtype, numels=()) -> tuple[int, int]:
    """(BLOCK, UNROLL) of the kernel for a list of this dtype and these sizes: a plan's tiles."""
    return block_for(dtype), unroll_for(dtype, numels)


def _tiles(dtype: torch.dtype, block: int | None, unroll: int | None) -> tuple[int, int] | None:
    """The tiles a caller asked for (``block=``, ``unroll=``), or None: the list's own (``tiles_for``).
    Where only one is given the other is the dtype's default (UNROLL: LARGE_UNROLL, BLOCK: block_for)."""
    if block is None and unroll is None:
        return None
    if unroll is not None and unroll not in (1, 2, 4):
        raise ValueError(f"unroll must be 1, 2 or 4, got {unroll!r}")
    if block is not None and (not isinstance(block, int) or block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block!r}")
    return block or block_for(dtype), unroll or (1 if dtype == torch.float64 else LARGE_UNROLL)


def chunk_for(numel: int, block: int) -> int:
    """Chunk length of a tensor of more than ``block`` elements: a function of its own size and its dtype's
    BLOCK only, so its bits never depend on the rest of the list (nor on UNROLL, which the list sets)."""
    return block * (LARGE_CHUNK_TILES if numel > LARGE_TENSOR else MID_CHUNK_TILES)


@dataclass
class Workspace:
    """A launch's mutable state, used on one stream only."""

    partials: Tensor  # float64 [4 * S]: mean, M2, min, max per statistics chunk
    stats: Tensor  # float64 [T, 4]: mean, std, inv, wide per tensor
    counters: Tensor  # int32 [3 + T]: ticket, programs done, error flag, per-tensor chunk counters
    dropped: bool = False  # a launch on it did not finish: its counters may be non-zero, never use it again


@dataclass(eq=False)
class Plan:
    """The read-only part of a launch for one list of tensors: the work item table, on their device."""

    meta: Tensor  # int64 table (see triton_kernels)
    device: torch.device
    num_tensors: int
    num_stats_items: int
    num_small_items: int
    tiles: tuple[int, int]  # (BLOCK, UNROLL)
    aligned: bool  # every data pointer is 16-byte aligned: the vector-access specialization
    numels: tuple[int, ...]  # the tensors' numbers of elements
    host: Tensor | None = None  # the pinned source of a table copied during graph capture
    workspaces: dict[int, Workspace] = field(default_factory=dict)  # by stream (0 off CUDA)
    captured: bool = False

    @property
    def num_items(self) -> int:
        return 2 * self.num_stats_items + self.num_small_items

    def new_workspace(self) -> Workspace:
        s, t = self.num_stats_items, self.num_tensors
        return Workspace(
            partials=torch.empty(max(4 * s, 1), dtype=torch.float64, device=self.device),
            stats=torch.zeros((t, 4), dtype=torch.float64, device=self.device),
            counters=torch.zeros(3 + t, dtype=torch.int32, device=self.device),
        )


_plans: OrderedDict[tuple, Plan] = OrderedDict()
# Workspaces by (device, stream, S, T): plans of the same sizes on one stream share one (their launches are
# ordered on that stream, and each leaves it zeroed), so gradients that move to new addresses, which need a
# new plan (table), allocate and zero no new workspace.
_workspace_pool: OrderedDict[tuple, Workspace] = OrderedDict()
_captured_plans: list[Plan] = []  # tables a captured graph reads: kept for the life of the process


def _table(addrs, numels, elsize: int, tiles: tuple[int, int]) -> tuple[list[int], int, int]:
    """The int64 table (layout in triton_kernels) and the numbers of statistics and small items."""
    block = tiles[0]
    stats_items, small_items, norm_items, tensors = [], [], [], []
    slot = 0
    for t, (addr, n) in enumerate(zip(addrs, numels)):
        if n <= block:
            small_items += (addr, n, t, 0)
            tensors += (n, 0, 0, 0)
            continue
        chunk = chunk_for(n, block)
        nchunks = -(-n // chunk)
        tensors += (n, chunk, slot, nchunks)
        for c in range(nchunks):
            start = c * chunk
            count = min(chunk, n - start)
            stats_items += (addr + start * elsize, count, t, slot + c)
            norm_items += (addr + start * elsize, count, t, nchunks + 1)
        slot += nchunks
    table = stats_items + small_items + norm_items + tensors
    return table, len(stats_items) // ITEM, len(small_items) // ITEM


def device_table(
    values: list[int] | Tensor, device: torch.device, pinned: bool = False
) -> tuple[Tensor, Tensor | None]:
    """An int64 table (a list, or a CPU tensor this takes over, already in pinned memory if ``pinned``) on
    ``device``, copied from pinned memory without blocking; and the pinned source when the copy is being
    captured in a CUDA graph (each replay reads it again: the caller keeps it), else None.
    """
    host = values if isinstance(values, Tensor) else torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host, None
    capturing = torch.cuda.is_current_stream_capturing()
    if not pinned:
        host = host.pin_memory()
    return host.to(device, non_blocking=True), host if capturing else None


@dataclass(frozen=True)
class _Layout:
    """What a plan's table owes to its tensors' sizes alone: the table of tensors at address 0 (each item's
    address is then its byte offset within its tensor), its owners, and its numbers of items."""

    template: Tensor  # int64 [rows, ITEM], CPU
    items: int  # the first rows are work items (address, count, tensor, slot); the rest are tensors
    num_stats_items: int
    num_small_items: int
    owners: np.ndarray  # int64 [items]: each work item's tensor


_layouts: OrderedDict[tuple, _Layout] = OrderedDict()


def _layout_for(numels: tuple[int, ...], elsize: int, tiles: tuple[int, int]) -> _Layout:
    key = (numels, elsize, tiles)
    layout = _layouts.get(key)
    if layout is None:
        table, s, m = _table([0] * len(numels), numels, elsize, tiles)
        template = torch.tensor(table, dtype=torch.int64).view(-1, ITEM)
        items = 2 * s + m
        layout = _layouts[key] = _Layout(template, items, s, m, template[:items, 2].numpy().copy())
        if len(_layouts) > PLAN_CACHE_SIZE:
            _layouts.popitem(last=False)
    else:
        _layouts.move_to_end(key)
    return layout


def _table_at(layout: _Layout, addrs: tuple[int, ...], pinned: bool = False) -> Tensor:
    """``_table(addrs, ...)`` as an int64 CPU tensor (in pinned memory if ``pinned``), from the layout: each
    work item's address is its tensor's address (picked by the item's tensor column) plus its offset. A few
    numpy operations written straight into the tensor, where building the table in Python costs a few µs per
    chunk (gradients that move every step need a new one)."""
    out = torch.empty(layout.template.shape, dtype=torch.int64, pin_memory=pinned)
    dst, src = out.numpy(), layout.template.numpy()
    dst[layout.items :] = src[layout.items :]
    dst[: layout.items, 1:] = src[: layout.items, 1:]
    bases = np.fromiter(addrs, dtype=np.int64, count=len(addrs))
    np.add(src[: layout.items, 0], bases[layout.owners], out=dst[: layout.items, 0])
    return out.view(-1)


def _build_plan(addrs: tuple[int, ...], numels: tuple[int, ...], device: torch.device, dtype, tiles) -> Plan:
    layout = _layout_for(numels, _element_size(dtype), tiles)
    pinned = device.type == "cuda"
    meta, host = device_table(_table_at(layout, addrs, pinned), device, pinned)
    return Plan(
        meta=meta,
        device=device,
        num_tensors=len(addrs),
        num_stats_items=layout.num_stats_items,
        num_small_items=layout.num_small_items,
        tiles=tiles,
        # every address a multiple of ALIGNMENT: then so is their bitwise or (one C-level pass)
        aligned=functools.reduce(operator.or_, addrs, 0) % ALIGNMENT == 0,
        numels=numels,
        host=host,
    )


@functools.cache
def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _plan_for(
    tensors: list[Tensor],
    tiles: tuple[int, int] | None = None,
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
    key = (first.device, first.dtype, tiles, addrs, numels)
    plan = _plans.get(key)
    if plan is None:
        plan = _build_plan(addrs, numels, first.device, first.dtype, tiles)
        _plans[key] = plan
        if len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def occupancy(regs: int, shared: int, num_warps: int, props) -> int:
    """Programs of a kernel that one SM holds at once, limited by registers (allocated per warp in units of
    256), threads and shared memory; ``props`` has the fields of torch.cuda.get_device_properties."""
    per_warp = -(-regs * 32 // 256) * 256
    limits = [
        props.regs_per_multiprocessor // max(1, per_warp * num_warps),
        props.max_threads_per_multi_processor // (32 * num_warps),
    ]
    if shared:
        limits.append(props.shared_memory_per_multiprocessor // shared)
    return max(1, min(limits))


_programs_per_sm: dict[tuple, int] = {}


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _learn_occupancy(key: tuple, kernel) -> None:
    """Programs per SM from the kernel as compiled (registers, shared memory), for the launches after the
    first: one register past 128 halves what fits, so it is read, not assumed."""
    try:
        regs, shared = int(kernel.n_regs), int(kernel.metadata.shared)
    except (AttributeError, TypeError, ValueError):
        regs = 0
    _programs_per_sm[key] = (
        occupancy(regs, shared, NUM_WARPS, torch.cuda.get_device_properties(key[0]))
        if regs > 0
        else DEFAULT_PROGRAMS_PER_SM
    )


def _num_programs(device: torch.device, items: int, key: tuple) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: one program drains the queue
    per_sm = _programs_per_sm.get(key, DEFAULT_PROGRAMS_PER_SM)
    return max(1, min(items, _sm_count(device.index) * per_sm))


def _current_device() -> int:
    return torch.cuda.current_device()


def _device_context(index: int):
    return torch.cuda.device(index)


def _on_device(device: torch.device, fn):
    """fn() with the tensors' device current: Triton launches on the current device and its stream."""
    if device.type == "cuda" and device.index != _current_device():
        with _device_context(device.index):
            return fn()
    return fn()


@functools.cache
def _triton_dtypes() -> dict[torch.dtype, tuple]:
    """torch dtype -> (Triton element type, Triton accumulation type); imports Triton on first use."""
    import triton.language as tl

    return {
        torch.float32: (tl.float32, tl.float32),
        torch.float16: (tl.float16, tl.float32),
        torch.bfloat16: (tl.bfloat16, tl.float32),
        torch.float64: (tl.float64, tl.float64),
    }


@functools.cache
def _constants(
    dtype,
    tiles: tuple[int, int],
    aligned: bool,
    has_scale: bool,
    normalize: bool,
    backoff: bool,
    given: bool = False,
):
    tl_dtype, tl_acc = _triton_dtypes()[dtype]
    return {
        "DTYPE": tl_dtype, "ACC": tl_acc, "BLOCK": tiles[0], "UNROLL": tiles[1], "PBLOCK": PBLOCK, "SUB": SUB,
        "VEC": ALIGNMENT // torch.empty((), dtype=dtype).element_size(), "ALIGNED": aligned,
        "BACKOFF": backoff, "HAS_SCALE": has_scale, "NORMALIZE": normalize, "GIVEN": given,
    }  # fmt: skip


# Compile options: no contraction of a multiply and an add into an FMA, so every operation rounds as it does
# under the interpreter (numpy) and in the float64 reference (docs/contract.md, "GPU and interpreter"); at
# most MAX_REGISTERS registers per thread, so two programs of 8 warps fit an SM (ptxas otherwise picks 80 for
# float64 and spills).
OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False, "maxnreg": MAX_REGISTERS}


def compile_for_target(
    dtype: torch.dtype,
    arch: int = 90,
    *,
    has_scale: bool = True,
    normalize: bool = True,
    aligned: bool = True,
    given: bool = False,
    unroll: int = 1,
):
    """Compile the kernel ahead of time for a CUDA architecture (e.g. 90 for H100), no GPU needed: lets CI
    check that the kernel lowers to PTX and machine code, which the interpreter does not. ``aligned`` picks
    the specialization that serves 16-byte aligned gradients (the usual case: the caching allocator aligns
    every tensor to 512 bytes); ``unroll`` is 1 for lists without a tensor above LARGE_TENSOR, else
    LARGE_UNROLL. Returns Triton's compiled kernel (``.asm["ptx"]`` holds the PTX)."""
    from .triton_kernels import znorm_queue_kernel

    signature = {
        "meta_ptr": "*i64", "partial_ptr": "*fp64", "stats_ptr": "*fp64", "counter_ptr": "*i32",
        "scale_ptr": "*fp32", "eps_bits": "i64", "correction": "fp32", "T": "i32", "S": "i32", "M": "i32",
        "NUM_PROGRAMS": "i32", "spin_limit": "i32",
    }  # fmt: skip
    tiles = (block_for(dtype), unroll)
    constants = _constants(dtype, tiles, aligned, has_scale, normalize, backoff=True, given=given)
    return compile_ahead(znorm_queue_kernel, signature, constants, arch, OPTIONS)


def compile_ahead(fn, signature: dict, constants: dict, arch: int, options: dict):
    """A Triton kernel compiled ahead of time for CUDA architecture ``arch``: ``signature`` types its runtime
    arguments (in order), ``constants`` its constexpr ones (after them)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    names = list(signature)
    source = ASTSource(
        fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()}
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _f64_bits(x: float) -> int:
    """The int64 bit pattern of float64 x: the kernel takes eps so, to keep all of its float64 value."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _stream_of(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0


def _workspace(plan: Plan, stream: int) -> Workspace:
    """The plan's workspace for this stream (made on first use), or a fresh one from the graph's pool while
    the stream is being captured."""
    if plan.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        if not plan.captured:  # the graph reads this table at every replay: never free it
            plan.captured = True
            _captured_plans.append(plan)
        return plan.new_workspace()
    ws = plan.workspaces.get(stream)
    if ws is None or ws.dropped:
        # (A plan that keeps its workspace does not refresh the pool's order: an entry may age out while a
        # plan still holds it, which costs the next plan of those sizes one allocation, nothing else.)
        key = (plan.device, stream, plan.num_stats_items, plan.num_tensors)
        ws = _workspace_pool.get(key)
        if ws is None or ws.dropped:
            ws = _workspace_pool[key] = plan.new_workspace()
            if len(_workspace_pool) > PLAN_CACHE_SIZE:
                _workspace_pool.popitem(last=False)
        _workspace_pool.move_to_end(key)
        if stream not in plan.workspaces and plan.device.type == "cuda":
            # The table may be freed (plan evicted) while this stream still reads it.
            plan.meta.record_stream(torch.cuda.current_stream(plan.device))
        plan.workspaces[stream] = ws
    return ws


def _check_no_stall(ws: Workspace, device: torch.device, limit: int) -> None:
    """Debug mode only (a spin limit is set): wait for the launch and raise if a program gave up waiting."""
    flag = int(ws.counters[2])  # synchronizes
    if flag:
        ws.counters.zero_()
        raise RuntimeError(
            f"ZNorm's Triton kernel gave up after {limit} polls waiting for the statistics of tensor "
            f"{flag - 1} of its group, which was left unchanged: the launch found its workspace counters "
            "non-zero (shared by launches that were not ordered). Please report how the call was made."
        )


def _launch(
    tensors: list[Tensor],
    eps: float,
    correction: float,
    grad_scale,
    normalize: bool,
    tiles,
    plan=None,
    given: Tensor | None = None,
) -> Workspace:
    device = tensors[0].device
    return _on_device(
        device,
        lambda: _launch_here(tensors, device, eps, correction, grad_scale, normalize, tiles, plan, given),
    )


def _launch_here(
    tensors, device, eps, correction, grad_scale, normalize, tiles, plan, given: Tensor | None = None
) -> Workspace:
    from . import triton_kernels  # the kernel module is imported once, then found in sys.modules

    dtype = tensors[0].dtype
    if plan is None:
        plan = _plan_for(tensors, tiles)
    tiles = plan.tiles
    stream = _stream_of(device)
    ws = _workspace(plan, stream)
    if grad_scale is not None:
        scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
    else:
        scale = ws.stats  # never read
    has_scale = grad_scale is not None
    on_gpu = device.type == "cuda"
    items = plan.num_items if normalize and given is None else plan.num_stats_items + plan.num_small_items
    if given is not None:  # the rows to apply, where the kernel would have published them (same stream)
        ws.stats.copy_(given)
    key = (device.index, dtype, plan.aligned, has_scale, normalize, given is not None, tiles)
    programs = _num_programs(device, items, key)
    limit = _spin_limit
    try:
        args = (
            plan.meta,
            ws.partials,
            ws.stats,
            ws.counters,
            scale,
            _f64_bits(eps),
            correction,
            plan.num_tensors,
            plan.num_stats_items,
            plan.num_small_items,
            programs,
            limit,
        )
        # After a specialization's first launch, Triton's per-call binding of the arguments (most of a hook
        # call's host time on a GPU host) is skipped.
        kernel = launcher_for(triton_kernels.znorm_queue_kernel)(
            (programs,),
            stream,
            args,
            # device, dtype, alignment, scale, stage, given and tiles, and the module's constants (tests patch
            # PBLOCK): every constexpr
            (key, on_gpu, PBLOCK, SUB),
            **_constants(dtype, tiles, plan.aligned, has_scale, normalize, on_gpu, given is not None),
            **OPTIONS,
        )
        if limit:
            _check_no_stall(ws, device, limit)
    except BaseException:
        # Its counters may be left mid-launch: never reuse it (nor may any plan sharing it).
        ws.dropped = True
        plan.workspaces.pop(stream, None)
        raise
    if on_gpu and key not in _programs_per_sm:
        _learn_occupancy(key, kernel)
    return ws


def _dense_stand_ins(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors themselves where dense, contiguous copies of non-dense views (checked in C first)."""
    if all(map(Tensor.is_contiguous, tensors)):
        return tensors
    return [t if is_dense(t) else t.contiguous() for t in tensors]


def _with_dense(tensors: list[Tensor], fn):
    """Run fn on dense stand-ins: non-dense views are gathered into contiguous copies and written back."""
    dense = _dense_stand_ins(tensors)
    result = fn(dense)
    if dense is not tensors:
        for t, d in zip(tensors, dense):
            if d is not t:
                t.copy_(d)
    return result


def znorm_group_(
    tensors: list[Tensor],
    eps: float,
    correction: float,
    grad_scale: Tensor | None = None,
    *,
    stats: Tensor | None = None,
    block: int | None = None,
    unroll: int | None = None,
) -> None:
    """Normalize a validated same-device, same-dtype list in place, in one kernel launch. ``stats`` (float64
    [T, 2] on their device, optional) receives each tensor's mean and standard deviation, which the kernel
    computed anyway (a copy of 2 values per tensor, no pass over the data). ``block`` and ``unroll`` override
    the dtype's tiles (tests, bench.gpu_probe)."""
    tiles = _tiles(tensors[0].dtype, block, unroll)
    ws = _with_dense(tensors, lambda ts: _launch(ts, eps, correction, grad_scale, True, tiles))
    if stats is not None:
        stats.copy_(ws.stats[:, :2])


def bind(tensors: list[Tensor]):
    """A group function tied to these tensors' addresses, for callers that know the next lists hold tensors
    at the same addresses with the same sizes and layouts (the hook checks that each step): it skips the plan
    look-up and the layout checks. The first tensor's dtype is still compared (``model.half()`` with
    ``set_to_none`` gradients can put gradients of the new dtype at the old addresses, and the table's chunk
    addresses depend on it). Lists of non-dense views are not bound (their stand-ins are new copies each
    call). The bound function's ``rebind(others, addrs=None)`` binds tensors with the same types, dtypes,
    devices, sizes and strides as these (the caller has checked that) at other addresses, without reading
    layouts again; ``addrs``, their data pointers, where the caller has them already."""
    if not all(map(is_dense, tensors)):
        return znorm_group_
    return _bound(tensors)


def _bound(tensors: list[Tensor], numels: tuple[int, ...] | None = None, addrs=None):
    dtype = tensors[0].dtype
    plan = _plan_for(tensors, None, numels, addrs)
    numels = plan.numels

    def run(
        tensors: list[Tensor],
        eps: float,
        correction: float,
        grad_scale: Tensor | None = None,
        *,
        stats: Tensor | None = None,
    ) -> None:
        if tensors[0].dtype is not dtype:
            return znorm_group_(tensors, eps, correction, grad_scale, stats=stats)
        ws = _launch(tensors, eps, correction, grad_scale, True, None, plan)
        if stats is not None:
            stats.copy_(ws.stats[:, :2])

    # The same layouts, all dense: only the plan (the addresses) changes; the sizes are these.
    run.rebind = lambda others, addrs=None: _bound(others, numels, addrs)
    return run


znorm_group_.bind = bind


def apply_(
    tensors: list[Tensor], rows: Tensor, *, block: int | None = None, unroll: int | None = None
) -> None:
    """Normalize a validated same-device, same-dtype list in place with given statistics, in one launch:
    ``rows`` is a float64 [T, 4] tensor on their device of (mean, std, inv, wide) per tensor, as the
    statistics stage returns them (``apply_rows`` builds them from merged counts, means and M2s): z = (x -
    mean) * inv, in float64 where wide is nonzero. For DTensor shards, whose statistics span several ranks."""
    tiles = _tiles(tensors[0].dtype, block, unroll)
    _with_dense(tensors, lambda ts: _launch(ts, 0.0, 0.0, None, True, tiles, None, rows))


def apply_rows(stats: Tensor, eps: float, correction: float, grad_scale: Tensor | None = None) -> Tensor:
    """The float64 [T, 4] rows (mean, std, inv, wide) of ``apply_`` from float64 [T, 5] statistics (count,
    mean, M2, min, max), computed as the kernel publishes its own (_publish): a tensor whose min equals its
    max is constant (mean = that value, std = 0, inv = 0: every result exactly 0); inv = s / (std + s * eps)
    for gradients scaled by s, else 1 / (std + eps); 0 where that denominator is 0. A tensor is "wide" (its
    z-scores computed in float64) where its spread reaches 2**100, or, where min and max are unknown (+-inf),
    where sqrt(M2), which bounds every |x - mean|, does; or where inv leaves [2**-100, 2**100]."""
    n, mean, m2, lo, hi = stats.to(torch.float64).unbind(1)
    constant = (lo == hi) & (mean == mean)
    mean = torch.where(constant, lo, mean)
    std = torch.where(constant, 0.0, (m2 / (n - correction).clamp(min=0.0)).sqrt())
    s = 1.0 if grad_scale is None else grad_scale.to(device=stats.device, dtype=torch.float64).reshape(())
    denom = std + s * eps
    inv = torch.where(constant | (denom == 0), 0.0, s / denom)
    spread = hi - lo
    spread = torch.where(spread.isinf() & (lo.isinf() | hi.isinf()), m2.sqrt(), spread)
    wide = (spread >= _WIDE) | (inv > _WIDE) | ((inv < 1.0 / _WIDE) & (inv != 0))
    return torch.stack([mean, std, inv, wide.to(torch.float64)], dim=1)


_WIDE = 2.0**100  # triton_kernels.WIDE_SPREAD and WIDE_INV


def statistics(
    tensors: list[Tensor],
    eps: float = 1e-10,
    correction: float = 0,
    grad_scale: Tensor | None = None,
    *,
    block: int | None = None,
    unroll: int | None = None,
) -> Tensor:
    """The statistics stage alone: a float64 [T, 4] device tensor of (mean, std, inv, wide) per tensor, where
    z = (g - mean) * inv (wide is 1.0 where the kernel computes that product in float64, else 0.0). The
    tensors are not modified. (For a fused optimizer step that applies ZNorm as it loads the gradient.)
    Same-device, same-dtype tensors of at least 2 elements."""
    tiles = _tiles(tensors[0].dtype, block, unroll)
    return _launch(_dense_stand_ins(tensors), eps, correction, grad_scale, False, tiles).stats.clone()

"""The tile configurations of the Triton kernels, as values: ``Tiles`` for the ZNorm queue kernel and
``UpdateTiles`` for the fused optimizer updates, each chosen by one function (``tiles_for``,
``update_tiles_for``) and carried by the plan of every launch. Callers that want another configuration (the
probe in bench/gpu_probe.py, tests) pass one; nothing patches module globals. A tensor's bits depend only on
its own size and the configuration's block and chunking, never on the rest of the list.

The native CUDA and CPU kernels have compile-time tiles of their own, in csrc/tiles.h.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Tiles", "UpdateTiles", "ticket_runs", "tiles_for", "update_tiles_for"]

# Elements a program of the queue kernel holds in registers per tile (float64 tiles hold as many bytes).
QUEUE_BLOCK = {torch.float64: 2048}
DEFAULT_QUEUE_BLOCK = 8192
# Above this many elements a tensor is "large": chunks of LARGE_MIN_CHUNK tiles, doubled until the tensor
# has at most MAX_PARTIALS of them (at most LARGE_CHUNK tiles), and the list's loads unrolled. Chunks that
# short spread a large tensor over many programs (bench/log/2026-12-07-dev-cpu-schedule-model.md); never
# shorter, since each chunk of a run costs a record load; at most MAX_PARTIALS keep the merge short.
LARGE_TENSOR = 1 << 20
LARGE_CHUNK = 32
LARGE_MIN_CHUNK = 8
MAX_PARTIALS = 1024
# How a large tensor's chunks keep tiles in flight, in lists that hold a large tensor, per dtype: (unroll,
# prefetch): LARGE_UNROLL tiles' loads issued together, or the next tile loaded while one is reduced. Chosen
# with the schedule model and ptxas's spills (bench/log/2026-12-07-dev-cpu-tile-loop.md); float64's tiles
# hold as many bytes without either.
LARGE_UNROLL = 2
LARGE_LOADS = {torch.float32: (LARGE_UNROLL, False), torch.float64: (1, False)}
DEFAULT_LARGE_LOADS = (1, True)  # bfloat16, float16
# Tiles per chunk of the tensors between one tile and LARGE_TENSOR elements.
MID_CHUNK = 1
# Guided self-scheduling: each ticket covers about 1/(RUN_DIVISOR * programs) of the chunked elements not yet
# cut, so a phase starts with long tickets and ends with one-chunk ones (the schedule model's choice).
RUN_DIVISOR = 2
# A ticket's elements, at most: its count and the offsets inside it are 32-bit in the kernel.
MAX_TICKET = 1 << 30


@dataclass(frozen=True)
class Tiles:
    """One launch configuration of the queue kernel (backends/triton_kernels.py)."""

    block: int  # elements per tile; a tensor of at most `block` elements is one small item
    unroll: int = 1  # full tiles whose loads a large tensor's chunk issues together: 1, 2 or 4
    prefetch: bool = False  # with unroll 1: a chunk's next full tile loaded while the current one is reduced
    mid_chunk: int = MID_CHUNK  # tiles per chunk of tensors above `block`, up to `large_tensor` elements
    large_chunk: int = LARGE_CHUNK  # most tiles per chunk of tensors above `large_tensor` elements
    large_tensor: int = LARGE_TENSOR
    large_min_chunk: int = LARGE_MIN_CHUNK  # fewest tiles per chunk of those tensors
    max_partials: int = MAX_PARTIALS  # their chunks double until they number at most this (to large_chunk)
    merge_block: int = 1024  # chunk partials a tensor's merge reads per vector step
    sub: int = 512  # values per step of the rare float64 paths (re-read from cache, few registers)
    num_warps: int = 8
    programs: int | None = None  # a fixed grid (clamped to the work items); None: as many as fit the GPU
    run: int | None = None  # partials (chunks) per ticket, fixed (tests, experiments); None: ticket_runs
    run_divisor: int = RUN_DIVISOR  # ticket_runs' guided self-scheduling divisor

    def __post_init__(self) -> None:
        for name, least in (("block", 16), ("merge_block", 2), ("sub", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {least}, got {value!r}")
        if self.unroll not in (1, 2, 4):
            raise ValueError(f"unroll must be 1, 2 or 4, got {self.unroll!r}")
        if not isinstance(self.prefetch, bool) or (self.prefetch and self.unroll != 1):
            raise ValueError(f"prefetch must be a bool, and True only with unroll 1, got {self!r}")
        names = ("mid_chunk", "large_chunk", "large_tensor", "large_min_chunk", "max_partials", "num_warps")
        for name in (*names, "run_divisor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.block * max(self.mid_chunk, self.large_chunk) > MAX_TICKET:
            raise ValueError(f"chunks of at most {MAX_TICKET} elements (32-bit offsets), got {self!r}")
        for name in ("programs", "run"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")

    def chunk(self, numel: int) -> int:
        """Chunk length of a tensor of more than ``block`` elements: a function of its own size only."""
        if numel <= self.large_tensor:
            return self.block * self.mid_chunk
        tiles = max(self.large_min_chunk, -(-numel // (self.block * self.max_partials)))
        return self.block * min(self.large_chunk, 1 << (tiles - 1).bit_length())


def ticket_runs(numels: Sequence[int], tiles: Tiles, programs: int) -> tuple[tuple[int, ...], ...]:
    """The runs of each tensor of a list, in chunks (none for a tensor of at most ``block`` elements, one
    small item): ``tiles.run`` chunks each where fixed; else guided self-scheduling in the list's order, each
    run about 1/(run_divisor * programs) of the chunked elements not yet cut, in whole chunks, at least one.
    So the first tickets are long (few draws, few merges of counters) and the last ones a chunk each, which
    the programs left share when the others finish. A run never exceeds MAX_TICKET elements. The runs only
    decide which program computes which chunk: a tensor's bits do not depend on them (its chunks are
    ``tiles.chunk`` long whatever the list)."""
    remaining = sum(n for n in numels if n > tiles.block)
    share = tiles.run_divisor * programs
    runs = []
    for n in numels:
        mine: list[int] = []
        if n > tiles.block:
            chunk = tiles.chunk(n)
            chunks = -(-n // chunk)
            first = 0
            while first < chunks:
                run = tiles.run if tiles.run is not None else -(-remaining // share) // chunk
                run = max(1, min(run, chunks - first, MAX_TICKET // chunk))
                mine.append(run)
                remaining -= min((first + run) * chunk, n) - first * chunk
                first += run
        runs.append(tuple(mine))
    return tuple(runs)


def tiles_for(dtype: torch.dtype, numels: Sequence[int] = ()) -> Tiles:
    """The shipped configuration for a list of this dtype and these sizes: the dtype's block, and where the
    list holds a tensor above LARGE_TENSOR elements, the dtype's LARGE_LOADS (the only chunks with a next
    tile are those tensors': other lists keep the registers free)."""
    block = QUEUE_BLOCK.get(dtype, DEFAULT_QUEUE_BLOCK)
    unroll, prefetch = 1, False
    if numels and max(numels) > LARGE_TENSOR:
        unroll, prefetch = LARGE_LOADS.get(dtype, DEFAULT_LARGE_LOADS)
    return Tiles(block=block, unroll=unroll, prefetch=prefetch)


@dataclass(frozen=True)
class UpdateTiles:
    """One launch configuration of the fused optimizer updates (backends/triton_optim_kernels.py)."""

    block: int  # elements per tile
    tiles_per_item: int = 8  # a work item (one program) covers at most block * tiles_per_item elements
    num_warps: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 16:
            raise ValueError(f"block must be a power of two >= 16, got {self.block!r}")
        if self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {self.block!r}")
        if not isinstance(self.tiles_per_item, int) or self.tiles_per_item < 1:
            raise ValueError(f"tiles_per_item must be an int >= 1, got {self.tiles_per_item!r}")

    @property
    def chunk(self) -> int:
        return self.block * self.tiles_per_item


def update_tiles_for(dtype: torch.dtype) -> UpdateTiles:
    """The shipped update configuration: float64 tiles half as long, so every dtype holds the same bytes."""
    return UpdateTiles(block=1024 if dtype == torch.float64 else 2048)

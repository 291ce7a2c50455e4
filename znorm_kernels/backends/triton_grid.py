"""How many programs a launch of the ZNorm queue kernel runs: as many as fit the GPU at once (a persistent
grid: each program draws tickets until the queue is empty), read from the kernel as compiled, since its
registers and shared memory decide how many fit an SM."""

from __future__ import annotations

import functools

import torch

__all__ = [
    "ASSUMED_PROGRAMS",
    "DEFAULT_PROGRAMS_PER_SM",
    "learn_occupancy",
    "num_programs",
    "occupancy",
    "resident_programs",
]

# Programs per SM until the compiled kernel says otherwise: the host caps registers so that two programs of
# eight warps fit an SM.
DEFAULT_PROGRAMS_PER_SM = 2
# The resident programs a plan off CUDA is cut for: an H100's (132 SMs, two programs each), so that the
# tables the interpreter runs are those of an H100.
ASSUMED_PROGRAMS = 264

_programs_per_sm: dict[tuple, int] = {}


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


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def known(key: tuple) -> bool:
    """Whether the occupancy of the specialization ``key`` (its first field the device index) is learned."""
    return key in _programs_per_sm


def learn_occupancy(key: tuple, kernel, num_warps: int) -> None:
    """Programs per SM of a specialization from its compiled kernel (registers, shared memory), for the
    launches after the first: one register past the cap halves what fits, so it is read, not assumed."""
    try:
        regs, shared = int(kernel.n_regs), int(kernel.metadata.shared)
    except (AttributeError, TypeError, ValueError):
        regs = 0
    _programs_per_sm[key] = (
        occupancy(regs, shared, num_warps, torch.cuda.get_device_properties(key[0]))
        if regs > 0
        else DEFAULT_PROGRAMS_PER_SM
    )


def resident_programs(device: torch.device, fixed: int | None = None) -> int:
    """The programs a plan's tickets are cut for (tiles.ticket_runs): ``fixed`` when given, else the SM count
    times DEFAULT_PROGRAMS_PER_SM on CUDA, ASSUMED_PROGRAMS elsewhere. Not the learned occupancy: a plan
    serves every specialization of its list (statistics only, scaled, given), which may fit differently,
    and a count that changed after the first launch would rebuild the table (and leave bound plans behind);
    a factor of two only makes the tickets twice as long or short as aimed."""
    if fixed is not None:
        return fixed
    if device.type != "cuda":
        return ASSUMED_PROGRAMS
    return _sm_count(device.index) * DEFAULT_PROGRAMS_PER_SM


def num_programs(device: torch.device, items: int, key: tuple, fixed: int | None = None) -> int:
    """The grid of a launch with ``items`` work items: ``fixed`` programs when given (clamped to the items),
    else as many as fit the device; one off CUDA, where the interpreter runs programs one by one (the first
    drains the queue)."""
    if fixed is not None:
        return max(1, min(items, fixed))
    if device.type != "cuda":
        return 1
    per_sm = _programs_per_sm.get(key, DEFAULT_PROGRAMS_PER_SM)
    return max(1, min(items, _sm_count(device.index) * per_sm))

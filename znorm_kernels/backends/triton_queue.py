"""Launching the queue kernel of the "triton" backend (triton_kernels.znorm_queue_kernel): its specialization
(constexprs and compile options), the full launch over a plan and its workspace, the prepared relaunch of
the same plan on the same stream (``launch_steady``: what the hook's steady step calls), the last launch's
record for diagnostics, and the spin-limit debug switch. triton_host builds on it."""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from ..transfer import to_device
from .tiles import Tiles
from .triton_common import ALIGNMENT, element_size, f64_bits, on_device, stream_of, triton_dtypes
from .triton_grid import known, learn_occupancy, num_programs
from .triton_launch import launcher_for
from .triton_plan import Plan, Workspace, plan_for, workspace_for

__all__ = [
    "MAX_REGISTERS",
    "LaunchRecord",
    "compile_options",
    "constants",
    "last_launch",
    "launch",
    "launch_steady",
    "set_spin_limit",
    "spin_limit",
]

# Compile options besides the warps: at most MAX_REGISTERS registers per thread, so two programs of 8 warps
# fit an SM (ptxas otherwise picks fewer for float64 and spills); no contraction of a multiply and an add into
# an FMA, so every operation rounds as under the interpreter (numpy) and in the float64 reference.
MAX_REGISTERS = 128

_spin_limit = int(os.environ.get("ZNORM_SPIN_LIMIT", "0") or 0)


def set_spin_limit(polls: int) -> None:
    """Debug switch: with ``polls`` > 0, a program that waits more than that many polls for a tensor's
    statistics gives up, and the launch raises RuntimeError naming the tensor (the host then synchronizes
    after every launch to check). 0 (the default) waits as long as it takes, without synchronizing."""
    global _spin_limit
    if isinstance(polls, bool) or not isinstance(polls, int) or polls < 0:
        raise ValueError(f"polls must be an int >= 0, got {polls!r}")
    _spin_limit = polls


def spin_limit() -> int:
    """The debug switch's current value (0: off)."""
    return _spin_limit


@functools.cache
def constants(
    dtype, tiles: Tiles, aligned: bool, has_scale: bool, normalize: bool, backoff: bool, given: bool,
    timeline: int = 0,
):  # fmt: skip
    """The kernel's constexprs for one specialization."""
    tl_dtype, tl_acc = triton_dtypes()[dtype]
    return {
        "DTYPE": tl_dtype, "ACC": tl_acc, "BLOCK": tiles.block, "UNROLL": tiles.unroll,
        "PREFETCH": tiles.prefetch, "PBLOCK": tiles.merge_block, "SUB": tiles.sub,
        "VEC": ALIGNMENT // element_size(dtype),
        "ALIGNED": aligned, "BACKOFF": backoff, "HAS_SCALE": has_scale, "NORMALIZE": normalize,
        "GIVEN": given, "TIMELINE": timeline,
    }  # fmt: skip


@functools.cache
def compile_options(tiles: Tiles) -> dict:
    return {"num_warps": tiles.num_warps, "enable_fp_fusion": False, "maxnreg": MAX_REGISTERS}


class LaunchRecord(NamedTuple):
    """The last launch of the queue kernel: its plan, its grid and Triton's compiled kernel (None under the
    interpreter). For diagnostics (bench/gpu_probe.py reads registers and the grid from it)."""

    plan: Plan
    programs: int
    kernel: object


_last: LaunchRecord | None = None


def last_launch() -> LaunchRecord | None:
    return _last


def _check_no_stall(ws: Workspace, limit: int) -> None:
    """Debug mode only (a spin limit is set): wait for the launch and raise if a program gave up waiting."""
    flag = int(ws.counters[2])  # synchronizes
    if flag:
        ws.counters.zero_()
        raise RuntimeError(
            f"ZNorm's Triton kernel gave up after {limit} polls waiting for the statistics of tensor "
            f"{flag - 1} of its group, which was left unchanged: the launch found its workspace counters "
            "non-zero (shared by launches that were not ordered). Please report how the call was made."
        )


def launch(
    tensors: list[Tensor],
    eps: float,
    correction: float,
    grad_scale: Tensor | None,
    *,
    normalize: bool = True,
    tiles: Tiles | None = None,
    plan: Plan | None = None,
    given: Tensor | None = None,
    timeline: Tensor | None = None,
) -> Workspace:
    """One launch over dense same-device, same-dtype tensors, under their device: statistics, and with
    ``normalize`` the z-scores written in place. ``plan`` when the caller has it (else looked up, with
    ``tiles`` or the list's own); ``given``: float64 [T, 4] rows to apply instead of computing statistics;
    ``timeline``: an int64 [tickets, 4] tensor on their device for the kernel's timeline variant (diagnostics:
    triton_host.timeline_). Returns the workspace, whose ``stats`` hold every tensor's (mean, std, inv, wide)
    until its next launch."""
    device = tensors[0].device
    return on_device(
        device,
        lambda: _launch_here(
            tensors, device, eps, correction, grad_scale, normalize, tiles, plan, given, timeline
        ),
    )


class _Steady(NamedTuple):
    """A plan's launch prepared for the next ones on one stream (``launch_steady``): the workspace and the
    runtime arguments it was made with, the kept kernel and its grid."""

    ws: Workspace
    args: tuple
    launcher: object  # the kernel's DirectLauncher
    kept: tuple
    programs: int
    scale_aligned: bool


def launch_steady(plan: Plan, eps: float, correction: float, grad_scale: Tensor | None = None) -> Workspace:
    """What ``launch(tensors, eps, correction, grad_scale, plan=plan)`` does, for a caller that knows the
    plan's tensors are still where the plan was made or last moved to (``triton_plan.rebase``), with its
    sizes and dtype (they are not handed over):
    after a first launch of this plan on the current stream, the arguments prepared then are launched again
    through the kept kernel (``DirectLauncher.direct``), with nothing looked up or bound. Anything unusual
    (no kernel kept, as under the interpreter; direct launches off; a dropped workspace; graph capture; the
    debug spin limit) takes the full launch. Runs under the plan's device, as every launch."""
    return on_device(plan.device, lambda: _steady_here(plan, eps, correction, grad_scale))


def _steady_here(plan: Plan, eps: float, correction: float, grad_scale: Tensor | None) -> Workspace:
    global _last
    device = plan.device
    stream = stream_of(device)
    steady = plan.steady.get((stream, eps, correction, grad_scale is not None))
    if (
        steady is not None
        and steady.ws is plan.workspaces.get(stream)
        and not steady.ws.dropped
        and not _spin_limit
        and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        and steady.launcher.enabled()
    ):
        args = steady.args
        if grad_scale is not None:
            scale = to_device(grad_scale, device, torch.float32)
            if (scale.data_ptr() % ALIGNMENT == 0) is steady.scale_aligned:
                args = (*args[:5], scale, *args[6:])
            else:  # another specialization: the full launch
                args = None
        if args is not None:
            try:
                done = steady.launcher.direct(steady.kept, (steady.programs,), stream, args)
            except BaseException:
                steady.ws.dropped = True  # its counters may be left mid-launch (as in _launch_here)
                plan.workspaces.pop(stream, None)
                raise
            if done:
                _last = LaunchRecord(plan, steady.programs, steady.kept[0])
                return steady.ws
    return _launch_here(None, device, eps, correction, grad_scale, True, None, plan, None, None)


def _queue_launcher():
    from . import triton_kernels  # the kernel module is imported once, then found in sys.modules

    return launcher_for(triton_kernels.znorm_queue_kernel)


def _launch_here(
    tensors, device, eps, correction, grad_scale, normalize, tiles, plan, given, timeline=None
) -> Workspace:
    global _last
    if plan is None:
        plan = plan_for(tensors, tiles)
    dtype = plan.dtype
    tiles = plan.tiles
    stream = stream_of(device)
    ws = workspace_for(plan, stream)
    # ws.stats where there is no scale: never read
    scale = to_device(grad_scale, device, torch.float32) if grad_scale is not None else ws.stats
    has_scale = grad_scale is not None
    on_gpu = device.type == "cuda"
    items = plan.num_items if normalize and given is None else plan.num_stats_items + plan.num_small_items
    if given is not None:  # the rows to apply, where the kernel would have published them (same stream)
        ws.stats.copy_(given)
    # The timeline variant's rows: 1 with the GPU's timer, 2 without (the interpreter); 0 off.
    marks = 0 if timeline is None else 1 if on_gpu else 2
    # The specialization: device, dtype, alignment, scale, stage, given rows, tiles, timeline (every
    # constexpr).
    key = (device.index, dtype, plan.aligned, has_scale, normalize, given is not None, tiles, marks)
    learned = not on_gpu or known(key)  # the grid below is final (the occupancy of this kernel is known)
    programs = num_programs(device, items, key, tiles.programs)
    limit = _spin_limit
    launcher = _queue_launcher()
    try:
        args = (
            plan.meta, plan.bases, ws.partials, ws.stats, ws.counters, scale, f64_bits(eps), correction,
            plan.num_tensors, plan.num_stats_items, plan.num_small_items, plan.num_partials, programs, limit,
            plan.meta if timeline is None else timeline,  # (the table: an int64 pointer never written)
        )  # fmt: skip
        # After a specialization's first launch, Triton's per-call binding of the arguments (most of a hook
        # call's host time on a GPU host) is skipped.
        kernel = launcher(
            (programs,),
            stream,
            args,
            (key, on_gpu),
            **constants(dtype, tiles, plan.aligned, has_scale, normalize, on_gpu, given is not None, marks),
            **compile_options(tiles),
        )
        if limit:
            _check_no_stall(ws, limit)
    except BaseException:
        # Its counters may be left mid-launch: never reuse it (nor may any plan sharing it).
        ws.dropped = True
        plan.workspaces.pop(stream, None)
        raise
    if on_gpu and not known(key):
        learn_occupancy(key, kernel, tiles.num_warps)
    keep = normalize and given is None and timeline is None
    if keep and learned and not limit and ws is plan.workspaces.get(stream):
        kept = launcher.kept_for(args, (key, on_gpu))
        if kept is not None:  # launch_steady's next calls on this stream
            plan.steady[(stream, eps, correction, has_scale)] = _Steady(
                ws, args, launcher, kept, programs, scale.data_ptr() % ALIGNMENT == 0
            )
    _last = LaunchRecord(plan, programs, kernel)
    return ws

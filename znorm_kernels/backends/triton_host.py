"""The "triton" backend: host side of the single-launch multi-tensor ZNorm kernel (triton_kernels.py).

Per (device, dtype) group a launch takes the group's plan (triton_plan: the table of work items, cached
while the tensors' addresses and sizes stay the same), its tile configuration (tiles.py) and a workspace,
and runs the queue kernel once with as many programs as fit the GPU (triton_grid). Dense tensors in any
layout (channels_last, permuted) are normalized where they lie, since mean and std do not depend on element
order; non-dense views are gathered into a contiguous copy and written back.

Safe wherever PyTorch code runs (docs/contract.md, rule 12): every launch runs under its tensors' device,
whichever device is current; each stream has its own workspace, and a launch that raises drops its
workspace for every plan, so the counters are zero at every launch and a wait that never ends cannot arise
(``set_spin_limit``, or ``ZNORM_SPIN_LIMIT``, turns a wait past a bound into an error, for debugging);
launches can be captured in CUDA graphs (triton_plan says what is kept for them). Warm-up calls before
capture (which PyTorch asks for anyway) build the plans outside the graph.
"""

from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple

import torch
from torch import Tensor

from ..memory import is_dense
from . import triton_interpret
from .float64_range import factor_of
from .tiles import Tiles
from .triton_common import ALIGNMENT, element_size, f64_bits, on_device, stream_of, triton_dtypes
from .triton_grid import known, learn_occupancy, num_programs
from .triton_launch import launcher_for
from .triton_plan import Plan, Workspace, plan_for, workspace_for

__all__ = [
    "LaunchRecord",
    "apply_",
    "apply_rows",
    "bind",
    "compile_options",
    "constants",
    "group_fn",
    "last_launch",
    "serves",
    "set_spin_limit",
    "statistics",
    "unavailable",
    "znorm_group_",
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


# --- the backend's entries in the registry (znorm_kernels.registry) ---


def unavailable(name: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA device (CPU tensors run through Triton only under TRITON_INTERPRET=1)"
    if triton_interpret():
        return interpreter_broken()
    return None


def _major_minor(version: str) -> tuple[int, int]:
    parts = re.match(r"(\d+)\.(\d+)", version)
    return (int(parts[1]), int(parts[2])) if parts else (0, 0)


@functools.cache
def interpreter_broken() -> str | None:
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


# --- the launch ---


@functools.cache
def constants(
    dtype, tiles: Tiles, aligned: bool, has_scale: bool, normalize: bool, backoff: bool, given: bool
):
    """The kernel's constexprs for one specialization."""
    tl_dtype, tl_acc = triton_dtypes()[dtype]
    return {
        "DTYPE": tl_dtype, "ACC": tl_acc, "BLOCK": tiles.block, "UNROLL": tiles.unroll,
        "PBLOCK": tiles.merge_block, "SUB": tiles.sub, "VEC": ALIGNMENT // element_size(dtype),
        "ALIGNED": aligned, "BACKOFF": backoff, "HAS_SCALE": has_scale, "NORMALIZE": normalize,
        "GIVEN": given,
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
) -> Workspace:
    """One launch over dense same-device, same-dtype tensors, under their device: statistics, and with
    ``normalize`` the z-scores written in place. ``plan`` when the caller has it (else looked up, with
    ``tiles`` or the list's own); ``given``: float64 [T, 4] rows to apply instead of computing statistics.
    Returns the workspace, whose ``stats`` hold every tensor's (mean, std, inv, wide) until its next
    launch."""
    device = tensors[0].device
    return on_device(
        device,
        lambda: _launch_here(tensors, device, eps, correction, grad_scale, normalize, tiles, plan, given),
    )


def _launch_here(tensors, device, eps, correction, grad_scale, normalize, tiles, plan, given) -> Workspace:
    global _last
    from . import triton_kernels  # the kernel module is imported once, then found in sys.modules

    dtype = tensors[0].dtype
    if plan is None:
        plan = plan_for(tensors, tiles)
    tiles = plan.tiles
    stream = stream_of(device)
    ws = workspace_for(plan, stream)
    if grad_scale is not None:
        scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
    else:
        scale = ws.stats  # never read
    has_scale = grad_scale is not None
    on_gpu = device.type == "cuda"
    items = plan.num_items if normalize and given is None else plan.num_stats_items + plan.num_small_items
    if given is not None:  # the rows to apply, where the kernel would have published them (same stream)
        ws.stats.copy_(given)
    # The specialization: device, dtype, alignment, scale, stage, given rows and tiles (every constexpr).
    key = (device.index, dtype, plan.aligned, has_scale, normalize, given is not None, tiles)
    programs = num_programs(device, items, key, tiles.programs)
    limit = _spin_limit
    try:
        args = (
            plan.meta, ws.partials, ws.stats, ws.counters, scale, f64_bits(eps), correction, plan.num_tensors,
            plan.num_stats_items, plan.num_small_items, plan.num_partials, programs, limit,
        )  # fmt: skip
        # After a specialization's first launch, Triton's per-call binding of the arguments (most of a hook
        # call's host time on a GPU host) is skipped.
        kernel = launcher_for(triton_kernels.znorm_queue_kernel)(
            (programs,),
            stream,
            args,
            (key, on_gpu),
            **constants(dtype, tiles, plan.aligned, has_scale, normalize, on_gpu, given is not None),
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
    _last = LaunchRecord(plan, programs, kernel)
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


# --- the entry points ---


def znorm_group_(
    tensors: list[Tensor],
    eps: float,
    correction: float,
    grad_scale: Tensor | None = None,
    *,
    stats: Tensor | None = None,
    tiles: Tiles | None = None,
) -> None:
    """Normalize a validated same-device, same-dtype list in place, in one kernel launch. ``stats`` (float64
    [T, 2] on their device, optional) receives each tensor's mean and standard deviation, which the kernel
    computed anyway (a copy of 2 values per tensor, no pass over the data). ``tiles`` overrides the list's
    own configuration (tests, bench.gpu_probe)."""
    ws = _with_dense(tensors, lambda ts: launch(ts, eps, correction, grad_scale, tiles=tiles))
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
    plan = plan_for(tensors, None, numels, addrs)
    numels = plan.numels

    def run(tensors, eps, correction, grad_scale=None, *, stats=None):  # the group function's signature
        if tensors[0].dtype is not dtype:
            return znorm_group_(tensors, eps, correction, grad_scale, stats=stats)
        ws = launch(tensors, eps, correction, grad_scale, plan=plan)
        if stats is not None:
            stats.copy_(ws.stats[:, :2])

    # The same layouts, all dense: only the plan (the addresses) changes; the sizes are these.
    run.rebind = lambda others, addrs=None: _bound(others, numels, addrs)
    return run


znorm_group_.bind = bind


def statistics(
    tensors: list[Tensor],
    eps: float = 1e-10,
    correction: float = 0,
    grad_scale: Tensor | None = None,
    *,
    tiles: Tiles | None = None,
    plan: Plan | None = None,
) -> Tensor:
    """The statistics stage alone: a float64 [T, 4] device tensor of (mean, std, inv, wide) per tensor, where
    z = (g - mean) * inv (wide is 1.0 where the kernel computes that product in float64, else 0.0). The
    tensors are not modified. (For a fused optimizer step that applies ZNorm as it loads the gradient.)
    Same-device, same-dtype tensors of at least 2 elements; ``plan``: theirs, from an earlier call that found
    them at these addresses with these layouts (all dense), to skip the look-up."""
    if plan is not None:
        return launch(tensors, eps, correction, grad_scale, normalize=False, plan=plan).stats.clone()
    dense = _dense_stand_ins(tensors)
    return launch(dense, eps, correction, grad_scale, normalize=False, tiles=tiles).stats.clone()


def apply_(tensors: list[Tensor], rows: Tensor, *, tiles: Tiles | None = None) -> None:
    """Normalize a validated same-device, same-dtype list in place with given statistics, in one launch:
    ``rows`` is a float64 [T, 4] tensor on their device of (mean, std, inv, wide) per tensor, as the
    statistics stage returns them (``apply_rows`` builds them from merged counts, means and M2s): z = (x -
    mean) * inv, in float64 where wide is nonzero. For DTensor shards, whose statistics span several ranks."""
    _with_dense(tensors, lambda ts: launch(ts, 0.0, 0.0, None, tiles=tiles, given=rows))


_WIDE = 2.0**100  # triton_kernels.WIDE_SPREAD and WIDE_INV


def apply_rows(stats: Tensor, eps: float, correction: float, grad_scale: Tensor | None = None) -> Tensor:
    """The float64 [T, 4] rows (mean, std, inv, wide) of ``apply_`` from float64 [T, 5] statistics (count,
    mean, M2, min, max; M2 scaled by ``float64_range.factor_of(min, max)**2``, as the kernels keep it),
    computed as the kernel publishes its own (_publish): a tensor whose min equals its max is constant (mean =
    that value, std = 0, inv = 0: every result exactly 0); inv = s / (std + s * eps) for gradients scaled by
    s, else 1 / (std + eps); 0 where that denominator is 0. A tensor is "wide" (its z-scores computed in
    float64) where its spread reaches 2**100, or, where min and max are unknown (+-inf), where sqrt(M2), which
    bounds every |x - mean|, does; or where inv leaves [2**-100, 2**100], or where the statistics are scaled
    (``float64_range.factor_of`` not 1); wide holds that factor f (the wide normalize scales x and the mean by
    it, and inv is stored as inv / f), 0 elsewhere."""
    n, mean, m2, lo, hi = stats.to(torch.float64).unbind(1)
    f = factor_of(lo, hi)
    constant = (lo == hi) & (mean == mean)
    mean = torch.where(constant, lo, mean)
    std_f = torch.where(constant, 0.0, (m2 / (n - correction).clamp(min=0.0)).sqrt())  # std * f
    s = 1.0 if grad_scale is None else grad_scale.to(device=stats.device, dtype=torch.float64).reshape(())
    denom_f = std_f + s * eps * f
    inv = torch.where(constant | (denom_f == 0), 0.0, s / denom_f)  # inv / f
    spread = hi - lo
    spread = torch.where(spread.isinf() & (lo.isinf() | hi.isinf()), m2.sqrt(), spread)
    wide = (f != 1) | (spread >= _WIDE) | (inv > _WIDE) | ((inv < 1.0 / _WIDE) & (inv != 0))
    return torch.stack([mean, std_f / f, inv, torch.where(wide, f, 0.0)], dim=1)

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
import re
from typing import NamedTuple

import torch
from torch import Tensor

from ..memory import is_dense
from . import triton_interpret
from .float64_range import factor_of
from .tiles import Tiles
from .triton_plan import Plan, own_plan, plan_for, rebase
from .triton_queue import (
    LaunchRecord,
    compile_options,
    constants,
    last_launch,
    launch,
    launch_steady,
    set_spin_limit,
    spin_limit,
)

__all__ = [
    "LaunchRecord",
    "Timeline",
    "apply_",
    "apply_rows",
    "bind",
    "compile_options",
    "constants",
    "group_fn",
    "last_launch",
    "launch",
    "launch_steady",
    "serves",
    "set_spin_limit",
    "spin_limit",
    "statistics",
    "timeline_",
    "unavailable",
    "znorm_group_",
]

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
    offsets depend on it). Lists of non-dense views are not bound (their stand-ins are new copies each
    call). The bound function's ``rebind(others, addrs=None)`` moves it to tensors with the same types,
    dtypes, devices, sizes and strides as these (the caller has checked that) at other addresses, without
    reading layouts again, and returns it: its plan is its own (``triton_plan.own_plan``), and a move
    rewrites the plan's table of addresses in stream order (``triton_plan.rebase``); ``addrs``, their data
    pointers (ints or an int64 array), where the caller has them already (``others`` may then be None: the
    hook's native steady step has only the addresses). The function is bound to the last addresses given."""
    if not all(map(is_dense, tensors)):
        return znorm_group_
    return _bound(tensors)


def _bound(tensors: list[Tensor]):
    dtype = tensors[0].dtype
    plan = own_plan(tensors)

    def run(tensors, eps, correction, grad_scale=None, *, stats=None):  # the group function's signature
        if tensors[0].dtype is not dtype:
            return znorm_group_(tensors, eps, correction, grad_scale, stats=stats)
        ws = launch(tensors, eps, correction, grad_scale, plan=plan)
        if stats is not None:
            stats.copy_(ws.stats[:, :2])

    def rebind(others: list[Tensor], addrs=None):
        rebase(plan, tuple(map(Tensor.data_ptr, others)) if addrs is None else addrs)
        return run

    # For callers that know the tensors are still these (same addresses, sizes, layouts, dtype): no tensors.
    run.launch_only = lambda eps, correction, grad_scale=None: launch_steady(
        plan, eps, correction, grad_scale
    )
    run.rebind = rebind
    run.plan = plan
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


class Timeline(NamedTuple):
    """What ``timeline_`` recorded: ``rows``, an int64 [tickets, 4] CPU tensor of (start ns, end ns,
    SM << 32 | program, polls) per ticket in queue order (times from the GPU's global timer, 0 under the
    interpreter; polls: of the tensor's counter while a normalize ticket waited for its statistics), and the
    queue's ``stats`` and ``small`` tickets (statistics tickets first, then the small items, then as many
    normalize tickets as statistics ones)."""

    rows: Tensor
    stats: int
    small: int

    def kinds(self) -> list[str]:
        """Each ticket's kind: "stat", "small" or "norm"."""
        return ["stat"] * self.stats + ["small"] * self.small + ["norm"] * self.stats


def timeline_(
    tensors: list[Tensor], eps: float = 1e-10, correction: float = 0, *, tiles: Tiles | None = None
) -> Timeline:
    """Diagnostics (issue #23, bench/timeline.py): ``znorm_group_`` on a validated same-device, same-dtype
    list of dense tensors, in the kernel's timeline variant, which also records every ticket (``Timeline``).
    The variant is compiled apart (its registers may differ), synchronizes its device to read the rows, and
    keeps nothing for the next launches."""
    plan = plan_for(tensors, tiles)
    tickets = 2 * plan.num_stats_items + plan.num_small_items
    rows = torch.full((tickets, 4), -1, dtype=torch.int64, device=tensors[0].device)
    launch(tensors, eps, correction, None, plan=plan, timeline=rows)
    return Timeline(rows.cpu(), plan.num_stats_items, plan.num_small_items)


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

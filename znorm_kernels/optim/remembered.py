"""The remembered step: what a param group's fused step derived from its tensors, kept step after step.

After a full fused step, ``remember`` keeps what the next steps can reuse while the same parameters have
gradients and every tensor the update reads (parameters, gradients, the state tensors of the update's keys,
and Adam's step counters) has the same address (counters excepted) and layout: the buckets, the statistics
and update plans, the path. Two C calls per step check that (``same_addresses``, ``layout_guard``).
Hyperparameters, ZNorm's eps and correction, and the step counters' values are read every step. Tensors are
not kept (ids and addresses only): state replaced by load_state_dict is freed.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..backends import native_optim
from ..guards import layout_guard, same_addresses
from .fused_layout import FusedLayout, statistics, stats_rows
from .settings import FusedCaches, ZNormSettings
from .updates import FusedUpdate, bucket_args, count_steps_

__all__ = ["Remembered", "remember", "remembered_step_"]

_grad_of = operator.attrgetter("grad")


@dataclass(eq=False)
class Remembered:
    """A param group's fused step as the last full step made it (see the module docstring)."""

    options: tuple  # (kind, znorm, min_ndim, state keys, backend)
    ids: list[int]  # ids of the group's parameters with a gradient, in group order
    all_present: bool  # every parameter of the group had a gradient
    ptrs: list[int]  # addresses of params, grads, then each state list (group order)
    indices: list[int]  # range(len(ptrs))
    guard: Any  # layout_guard of those tensors, then (Adam) the step counters
    layout: FusedLayout
    buckets: list[tuple]  # (positions or None for all, treated, statistics plan, update plan, device, dtype)


def _read_state(opt, params: list[Tensor], keys: tuple[str, ...], update: FusedUpdate):
    """The state lists of ``keys`` (and the step counters last, where the update counts steps), or None
    where one is missing."""
    states = list(map(opt.state.__getitem__, params))
    if update.counts_steps:
        keys = (*keys, "step")
    try:
        return [list(map(operator.itemgetter(key), states)) for key in keys]
    except KeyError:
        return None


def remember(
    opt, caches: FusedCaches, group: dict[str, Any], options: tuple, update: FusedUpdate, layout: FusedLayout,
    params: list[Tensor],
) -> None:  # fmt: skip
    """After a full fused step of the group: remember what the next steps can reuse."""
    caches.remembered.pop(id(group), None)
    lists = _read_state(opt, params, options[3], update)
    if lists is None or any(t is None for lst in lists for t in lst):
        return
    counters = lists.pop() if update.counts_steps else []
    grads = [p.grad for p in params]
    checked = [params, grads, *lists]
    flat = [t for lst in checked for t in lst]
    buckets = []
    for idx, treated in layout.buckets:
        sub = [lst if len(idx) == len(params) else [lst[i] for i in idx] for lst in checked]
        device, dtype = sub[0][0].device, sub[0][0].dtype
        stats_plan = plan = None
        if layout.path == "triton":
            from ..backends import triton_optim, triton_plan

            picked = [g for g, t in zip(sub[1], treated) if t]
            if picked:
                stats_plan = triton_plan.plan_for(picked)
            plan = triton_optim.steady_plan(sub, device, dtype)
        buckets.append((None if len(idx) == len(params) else idx, treated, stats_plan, plan, device, dtype))
    if len(caches.remembered) >= 64:
        caches.remembered.clear()
    caches.remembered[id(group)] = Remembered(
        options=options,
        ids=list(map(id, params)),
        all_present=len(params) == len(group["params"]),
        ptrs=list(map(Tensor.data_ptr, flat)),
        indices=list(range(len(flat))),
        guard=layout_guard([*flat, *counters]),
        layout=layout,
        buckets=buckets,
    )


def remembered_step_(
    opt,
    settings: ZNormSettings,
    caches: FusedCaches,
    group: dict[str, Any],
    options: tuple,
    update: FusedUpdate,
    stats_sink: list,
    names: Callable[[], list[str]],
) -> bool | None:
    """The group's step from what ``remember`` kept, or None (nothing done) where it does not apply."""
    mem = caches.remembered.get(id(group))
    if mem is None or mem.options != options:
        return None
    params = group["params"]
    grads = list(map(_grad_of, params))
    if not any(map(operator.is_, grads, itertools.repeat(None))):
        if not mem.all_present:
            return None
    else:
        params = [p for p, g in zip(params, grads) if g is not None]
        grads = [g for g in grads if g is not None]
    if list(map(id, params)) != mem.ids:
        return None
    lists = _read_state(opt, params, options[3], update)
    if lists is None:
        return None
    counters = lists.pop() if update.counts_steps else []
    lists = [params, grads, *lists]
    flat = list(itertools.chain.from_iterable(lists))
    if not (same_addresses(flat, mem.ptrs, mem.indices) and mem.guard.check(*flat, *counters)):
        return None
    try:
        args = update.args(group, counters)
    except NotImplementedError:  # hyperparameters the kernels do not take (device tensors): the full step
        return None
    eps, correction = settings.option(group, "znorm_eps"), settings.option(group, "correction")
    path = mem.layout.path
    launches = []
    for idx, treated, stats_plan, plan, device, dtype in mem.buckets:
        sub = lists if idx is None else [[lst[i] for i in idx] for lst in lists]
        if path == "triton":
            stats = statistics(sub[1], treated, eps, correction, mem.layout, stats_plan)
        elif settings.track_stats:
            stats = torch.full((len(sub[0]), 2), float("nan"), dtype=torch.float64, device=device)
        else:
            stats = None
        bucket = args if idx is None else bucket_args(args, idx)
        launches.append((sub[0], treated, stats, sub, bucket, plan, device, dtype))
    for _, treated, stats, sub, bucket, plan, device, dtype in launches:
        if path == "triton":
            from ..backends import triton_optim

            triton_optim.steady_launch(
                update.family, plan, device, dtype, stats, bucket, write_grad=settings.normalize_grad
            )
        else:
            native_optim.steady_step_(
                update.family, sub, bucket, treated=treated, znorm_eps=eps, correction=correction,
                stats_out=stats, write_grad=settings.normalize_grad,
            )  # fmt: skip
    if counters:
        count_steps_(counters)
    znorm, min_ndim = options[1], options[2]
    if settings.track_stats and znorm:
        selected = [p for p in group["params"] if p.dim() >= min_ndim]
        if selected:
            stats_sink.append(stats_rows(selected, mem.layout, launches, group, names))
    return True

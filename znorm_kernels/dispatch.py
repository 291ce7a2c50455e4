"""Dispatch: the one place that hands a call's tensors to backends.

``run_znorm_`` checks the options, validates and groups the entries (``validation``), resolves every
group's backend (``registry``) before any runs, so that an unservable request modifies nothing, and only
then runs the groups. DTensor entries (FSDP2, tensor parallelism), whose statistics span ranks, go to
``znorm_kernels.distributed``; every other entry takes the single-tensor path. Data flows one way:
api -> dispatch -> validation, registry -> backends.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from .dtensors import dtensor_positions, dtensors_possible
from .options import as_scale, check_backend_name, check_options
from .registry import GroupFn, group_fn, resolve
from .stats import StatsBuffer
from .validation import as_items, collect_indices

__all__ = ["pick", "plan_groups", "run_znorm_"]


def plan_groups(
    tensors: Tensor | Iterable[Tensor | None],
    backend: str,
    names: Iterable[str] | None,
    *,
    bound: bool = False,
) -> tuple[list, list[tuple[GroupFn, list[int]]]]:
    """Validate and group, then resolve every group's backend before any runs (so an unservable request
    modifies nothing): the entries and a list of (group function, positions). With ``bound``, each group
    function is bound to its tensors' addresses where the backend offers that (``fn.bind``), kept in the
    check's memo (check_cache): a call with the same list finds it, and only while the list is where and as
    it was."""
    items, groups = collect_indices(tensors, names)
    check_backend_name(backend)
    memo = getattr(groups, "memo", None) if bound else None
    plan = []
    for (device, dtype), idx in groups.items():
        fn = group_fn(resolve(backend, device.type))
        if memo is not None and hasattr(fn, "bind"):
            key = (backend, device, dtype, fn)
            bound_fn = memo.get(key)
            if bound_fn is None:
                bound_fn = memo[key] = fn.bind(pick(items, idx))
            fn = bound_fn
        plan.append((fn, idx))
    return items, plan


def pick(items: list, idx: list[int]) -> list:
    """items[i] for i in idx (ascending positions): the list itself when idx takes every entry."""
    return items if len(idx) == len(items) else list(map(items.__getitem__, idx))


def run_znorm_(
    tensors: Tensor | Iterable[Tensor | None],
    eps: float,
    correction: float,
    backend: str,
    grad_scale: Tensor | float | None,
    names: Iterable[str] | None,
    stats: StatsBuffer | None = None,
) -> None:
    """The eager path of ``znorm_``: check, group, resolve every group's backend, then run them. ``stats``
    (the hook's, with DTensor gradients) receives every entry's mean and std."""
    check_options(eps, correction, backend)
    grad_scale = as_scale(grad_scale)
    if dtensors_possible():
        tensors = as_items(tensors, "znorm_")
        dtensors = dtensor_positions(tensors)
        if dtensors:
            _run_with_dtensors_(tensors, dtensors, eps, correction, backend, grad_scale, names, stats)
            return
    items, plan = plan_groups(tensors, backend, names, bound=True)
    for fn, idx in plan:
        fn(pick(items, idx), float(eps), float(correction), grad_scale)


def _run_with_dtensors_(
    items: list,
    dtensors: list[int],
    eps: float,
    correction: float,
    backend: str,
    grad_scale: Tensor | None,
    names: Iterable[str] | None,
    stats: StatsBuffer | None = None,
) -> None:
    """Every entry is checked before any is modified: the plain ones here, the DTensors by znorm_dtensors_
    (which checks them all before it communicates or writes); then the DTensors, then the plain groups.
    ``stats`` gets one buffer per plain group and one for the DTensors (their whole tensors' figures)."""
    from .distributed import znorm_dtensors_

    names = list(names) if names is not None else None
    skip = set(dtensors)
    rest = [None if i in skip else t for i, t in enumerate(items)]
    _, plan = plan_groups(rest, backend, names)
    outs: list[Tensor | None] = [None] * (len(plan) + 1)
    if stats is not None:
        groups = [(idx, items[idx[0]].device) for _, idx in plan]
        groups.append((dtensors, items[dtensors[0]]._local_tensor.device))
        outs = stats.reset(len(items), groups)
    znorm_dtensors_(
        [items[i] for i in dtensors],
        float(eps),
        float(correction),
        backend,
        grad_scale,
        names=names,
        positions=dtensors,
        stats_out=outs[-1],
    )
    for (fn, idx), out in zip(plan, outs):
        fn(pick(rest, idx), float(eps), float(correction), grad_scale, stats=out)

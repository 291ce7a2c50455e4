"""The fused step of the ZNorm optimizers. On Triton: per (device, dtype) bucket of a param group, the
statistics stage (one launch: each gradient read once) and one update launch that applies the z-scores as it
loads the gradient (backends/triton_optim.py). The gradient is read twice and never written (unless
``normalize_grad``), where the hook then torch's update read it three times and write it once. On the CPU
(backend "cpu", or "auto" for CPU tensors) and on CUDA without Triton (backend "cuda"): one call of the
native op per dtype bucket (backends/native_optim.py), which computes each tensor's statistics and then
updates it in one pass, with no scratch copy of the gradient.

``try_fused_step_`` takes a param group when its options allow (a fused path serves its devices; not
``capturable``, ``differentiable`` or torch's own ``fused``; a plain float learning rate; no gradient scale)
and the optimizer's kind has an entry in ``updates.FUSED_UPDATES``; it returns False otherwise, for the
caller's general path (the hook's kernel, then torch's update). The optimizer state is created and kept
exactly as torch's optimizers keep it, so checkpoints stay interchangeable. Steps after the first reuse what
the first derived (``remembered``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..backends import native_optim, optim_steps
from ..guards import layout_guard, same_addresses
from .fused_layout import FUSED_BACKENDS, layout_of, statistics, stats_rows
from .remembered import remember, remembered_step_
from .settings import FusedCaches, ZNormSettings
from .updates import FUSED_UPDATES

__all__ = ["try_fused_step_"]


def _options_allow(opt, group: dict[str, Any], settings: ZNormSettings) -> bool:
    """Whether the group's options allow a fused step (checked every step: they may change)."""
    if group.get("differentiable") or group.get("capturable") or group.get("fused"):
        return False
    if isinstance(group["lr"], Tensor):
        return False
    if getattr(opt, "_step_supports_amp_scaling", False) and getattr(opt, "grad_scale", None) is not None:
        return False
    return settings.backend in FUSED_BACKENDS


class _Engine:
    """One bucket's fused update on one path: ``check(lists, names)`` (NotImplementedError for what it does
    not serve, nothing touched) and ``step(family, lists, args, **options)``, the family's step function of
    that path with its Args (backends/optim_steps.py) and ``checked=True`` among the options."""

    def __init__(self, name: str, check, step) -> None:
        self.name, self.check, self.step = name, check, step


def _triton_engine(stats: Tensor) -> _Engine:
    from ..backends import triton_optim

    return _Engine(
        "triton",
        lambda lists, names: triton_optim.check(lists, names, stats),
        lambda family, lists, args, **kw: triton_optim.STEPS[family](*lists, stats, args, **kw),
    )


def _native_engine(
    name: str, treated: list[bool], eps: float, correction: float, stats: Tensor | None
) -> _Engine:
    """The native op's step ("cpu" or "cuda": the device of the bucket's tensors)."""
    znorm = dict(treated=treated, znorm_eps=eps, correction=correction, stats_out=stats)
    return _Engine(
        name,
        native_optim.check_step,
        lambda family, lists, args, **kw: native_optim.STEPS[family](*lists, args, **znorm, **kw),
    )


def _validate(caches: FusedCaches, lists: list[list[Tensor]], names: list[str], engine: _Engine) -> None:
    """The update kernel's checks (NotImplementedError for what it does not serve), run once per set of
    tensors: the addresses and layouts (dtype, device, sizes, strides, ...) of every list are remembered, and
    unchanged ones (an optimizer's gradients and state, step after step) are not checked again."""
    flat = [t for lst in lists for t in lst if t is not None]
    seen = caches.validated
    key = (engine.name, id(lists[0][0]) if lists[0] else 0, len(flat), tuple(map(len, lists)))
    entry = seen.get(key)
    if entry is not None and same_addresses(flat, entry[0], list(range(len(flat)))) and entry[1].check(*flat):
        return
    engine.check(lists, names)
    if len(seen) >= 64:
        seen.clear()
    seen[key] = (list(map(Tensor.data_ptr, flat)), layout_guard(flat))


def try_fused_step_(
    opt,
    settings: ZNormSettings,
    caches: FusedCaches,
    group: dict[str, Any],
    kind: str,
    names: Callable[[], list[str]],
    stats_sink: list,
) -> bool:
    """The fused step of one param group, or False (nothing done) when the fused path does not serve it.
    ``kind``: the optimizer's entry in FUSED_UPDATES; ``names()``: the group's parameter names (called only
    where needed). With ``track_stats``, appends (names, float64 [k, 2] mean/std) for the group's treated
    parameters to ``stats_sink`` (NaN rows where a parameter has no gradient or fewer than 2 elements)."""
    update = FUSED_UPDATES.get(kind)
    if update is None or not _options_allow(opt, group, settings):
        return False
    znorm, min_ndim = settings.option(group, "znorm"), settings.option(group, "min_ndim")
    eps, correction = settings.option(group, "znorm_eps"), settings.option(group, "correction")
    options = (kind, znorm, min_ndim, update.state_keys(group), settings.backend)
    done = remembered_step_(opt, settings, caches, group, options, update, stats_sink, names)
    if done is not None:
        return done
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return False
    layout = layout_of(opt, settings.backend, caches, group, params, names, (znorm, min_ndim))
    if layout.path is None:
        return False
    grads = [p.grad for p in params]
    # Phase 1, nothing modified: statistics, the update's arguments, and the kernels' own checks, which raise
    # NotImplementedError for what they do not serve (non-dense tensors, state of another layout): then the
    # general path runs instead, from scratch.
    launches = []
    try:
        for idx, treated in layout.buckets:
            ps = [params[i] for i in idx]
            gs = [grads[i] for i in idx]
            if layout.path == "triton":
                stats = statistics(gs, treated, eps, correction, layout)
                engine = _triton_engine(stats)
            else:  # the native op computes the statistics itself, and writes them here with track_stats
                stats = None
                if settings.track_stats:
                    stats = torch.full((len(ps), 2), float("nan"), dtype=torch.float64, device=ps[0].device)
                engine = _native_engine(layout.path, treated, eps, correction, stats)
            checked, call, args, extra, after = update.prepare(opt, group, ps, gs, update)
            _validate(caches, checked, optim_steps.list_names(update.family, len(checked)), engine)
            launches.append((ps, treated, stats, engine, call, args, extra, after))
    except NotImplementedError:
        return False
    # Phase 2: the updates.
    for _, _, _, engine, call, args, extra, after in launches:
        engine.step(update.family, call, args, write_grad=settings.normalize_grad, checked=True, **extra)
        after()
    if settings.track_stats and znorm:
        selected = [p for p in group["params"] if p.dim() >= min_ndim]
        if selected:
            stats_sink.append(stats_rows(selected, layout, launches, group, names))
    remember(opt, caches, group, options, update, layout, params)
    return True

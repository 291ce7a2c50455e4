"""What the ZNorm optimizers share: the ZNorm options (per optimizer and per param group), the selection of
the gradients to normalize, the z-scores, and the call into torch's own update.

The step computes the z-scores of the selected gradients with the library's kernels (``GradientGroups``, the
hook's cached path), then runs torch's update on them: the results are those of
``register(torch_optimizer)``, for every option torch supports (foreach, fused, capturable, differentiable,
GradScaler). By default the z-scores go to a scratch buffer per parameter that stands in for ``.grad`` during
the update, so ``.grad`` keeps the raw gradient (gradient-norm logging sees what it expects);
``normalize_grad=True`` writes them into ``.grad`` instead (no scratch memory, no copy). Param groups that a
fused step serves (fused.py) skip all of that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..dtensors import dtensor_positions
from ..options import check_min_ndim, check_options
from ..stats import GradStats, StatsBuffer
from ..step_cache import GradientGroups
from ..step_hooks import grad_scale_of
from .fused import try_fused_step_
from .settings import FusedCaches, ZNormSettings

__all__ = ["ZNORM_OPTIONS_DOC", "ZNormOptimizer"]

ZNORM_OPTIONS_DOC = """
    ZNorm options: ``znorm_eps`` (added to the std, default 1e-10), ``correction`` (0: population std),
    ``min_ndim`` (only parameters with at least this many dimensions; per group too), ``backend`` (as for
    ``znorm_``), ``normalize_grad`` (write the z-scores into ``.grad``; default: leave it raw),
    ``track_stats`` (keep each step's gradient mean and std for ``grad_stats()``). A param group with
    ``znorm=False`` gets the plain update.
"""


def _unhooked(step: Callable) -> Callable:
    """torch's step without the hook-running wrapper torch adds to a class's step on first use (our own step
    is wrapped already: the hooks must run once)."""
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


def _param_names(group: dict[str, Any], index: int) -> list[str]:
    """The group's parameter names (``param_names``, from named_parameters), else "group<i>.param<k>"."""
    return group.get("param_names") or [f"group{index}.param{k}" for k in range(len(group["params"]))]


class ZNormOptimizer:
    """Mixin placed before a torch optimizer class (``class ZNormSGD(ZNormOptimizer, torch.optim.SGD)``).

    ``_torch_class`` is the torch optimizer whose update runs; ``_fused_kind`` names the optimizer's entry
    in ``optim.updates.FUSED_UPDATES`` (a kind without one takes the general path); ``_checks_capture``: the
    step refuses CUDA-graph capture unless capturable, as torch's Adam does."""

    _torch_class: type[torch.optim.Optimizer]
    _fused_kind: str
    _checks_capture = False

    def _init_znorm(
        self,
        znorm_eps: float,
        correction: float,
        min_ndim: int,
        backend: str,
        normalize_grad: bool,
        track_stats: bool,
    ) -> None:
        """Called before torch's __init__ (which adds the param groups through add_param_group)."""
        check_options(znorm_eps, correction, backend)
        check_min_ndim(min_ndim)
        self._znorm = ZNormSettings(
            defaults={"znorm": True, "min_ndim": min_ndim, "znorm_eps": float(znorm_eps),
                      "correction": float(correction)},
            backend=backend,
            normalize_grad=bool(normalize_grad),
            track_stats=bool(track_stats),
        )  # fmt: skip
        self._reset_znorm_caches()

    def _reset_znorm_caches(self) -> None:
        self._znorm_groups: dict[tuple[float, float], GradientGroups] = {}
        self._znorm_scratch: dict[int, Tensor] = {}  # id(param) -> its z-scores' buffer
        self._znorm_fused = (
            FusedCaches()
        )  # the fused step's (each checks its tensors anyway): a load restarts

    # --- param groups and pickling ---

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self._znorm.defaults.items():
            param_group.setdefault(key, value)
        check_min_ndim(param_group["min_ndim"])
        check_options(param_group["znorm_eps"], param_group["correction"], self._znorm.backend)
        super().add_param_group(param_group)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state["_znorm"] = self._znorm
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        znorm = state.pop("_znorm", None)
        if isinstance(znorm, dict):  # pickled by a version that kept the settings in a dict
            znorm = ZNormSettings(**znorm)
        if znorm is not None:
            self._znorm = znorm
        super().__setstate__(state)  # type: ignore[misc]
        # Groups loaded from a torch optimizer's state_dict lack the ZNorm keys: the defaults apply.
        for group in self.param_groups:  # type: ignore[attr-defined]
            for key, value in self._znorm.defaults.items():
                group.setdefault(key, value)
        self._reset_znorm_caches()

    # --- the step ---

    def _selected(self, skip: set[int]) -> dict[tuple[float, float], tuple[list[Tensor], list[str]]]:
        """The parameters whose gradients are normalized, per (znorm_eps, correction), with their names (the
        param groups in ``skip`` left out)."""
        settings = self._znorm
        selected: dict[tuple[float, float], tuple[list[Tensor], list[str]]] = {}
        for g, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            if g in skip or not settings.option(group, "znorm"):
                continue
            min_ndim = settings.option(group, "min_ndim")
            key = (settings.option(group, "znorm_eps"), settings.option(group, "correction"))
            params, names = selected.setdefault(key, ([], []))
            for p, name in zip(group["params"], _param_names(group, g)):
                if p.dim() >= min_ndim:
                    params.append(p)
                    names.append(name)
        return selected

    def _scratch_for(self, p: Tensor, grad: Tensor) -> Tensor:
        z = self._znorm_scratch.get(id(p))
        if (
            z is None
            or z.shape != grad.shape
            or z.dtype != grad.dtype
            or z.device != grad.device
            or z.stride() != grad.stride()
        ):
            z = torch.empty_like(grad)  # the gradient's dense layout (torch's optimizers expect it)
            self._znorm_scratch[id(p)] = z
        return z

    def _normalize_grads(self, skip: set[int]) -> list[tuple[Tensor, Tensor]]:
        """Normalize the selected gradients (into scratch buffers that stand in for .grad, or into .grad);
        returns the (parameter, raw gradient) pairs to put back after the update."""
        scale = grad_scale_of(self)  # type: ignore[arg-type]
        restore: list[tuple[Tensor, Tensor]] = []
        for key, (params, names) in self._selected(skip).items():
            groups = self._znorm_groups.get(key)
            if groups is None:
                stats = StatsBuffer() if self._znorm.track_stats else None
                groups = self._znorm_groups[key] = GradientGroups(key[0], key[1], self._znorm.backend, stats)
            grads = [p.grad for p in params]
            if not any(g is not None for g in grads):
                continue
            if not self._znorm.normalize_grad:
                raw = [(p, g) for p, g in zip(params, grads) if g is not None]
                zs = [self._scratch_for(p, g) for p, g in raw]
                sources = [g for _, g in raw]
                if dtensor_positions(sources) is None:
                    torch._foreach_copy_(zs, sources)
                else:  # DTensor has no foreach copy
                    for z, g in zip(zs, sources):
                        z.copy_(g)
                it = iter(zs)
                grads = [None if g is None else next(it) for g in grads]
                for (p, _), z in zip(raw, zs):
                    p.grad = z
                restore.extend(raw)
            groups.znorm_(grads, names, scale)
            if groups.stats is not None:
                self._znorm_last_stats.append(lambda stats=groups.stats, names=names: stats.assemble(names))
        return restore

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Compute the loss with ``closure`` if given, then update with the z-scores of the gradients."""
        if self._checks_capture:
            # As torch's Adam: a step captured in a CUDA graph must be capturable (its step counters on the
            # device); the fused path, which skips torch's step, must refuse it too.
            self._accelerator_graph_capture_health_check()  # type: ignore[attr-defined]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._znorm_last_stats: list[Callable[[], GradStats | None]] = []
        fused: set[int] = set()
        sink: list[tuple[list[str], Tensor]] = []
        for i, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            names = lambda group=group, i=i: _param_names(group, i)  # names read only where needed
            if try_fused_step_(self, self._znorm, self._znorm_fused, group, self._fused_kind, names, sink):
                fused.add(i)
        for names, values in sink:
            self._znorm_last_stats.append(lambda names=names, values=values: GradStats(names, values))
        groups = self.param_groups  # type: ignore[attr-defined]
        if len(fused) == len(groups):
            return loss
        restore = self._normalize_grads(fused)
        try:
            # torch's update for the groups the fused step did not take (it reads self.param_groups).
            self.param_groups = [g for i, g in enumerate(groups) if i not in fused]
            _unhooked(self._torch_class.step)(self)
        finally:
            self.param_groups = groups
            for p, g in restore:
                p.grad = g
        return loss

    # --- statistics ---

    def grad_stats(self) -> GradStats | None:
        """Per treated parameter, the mean and std of its raw gradient at the last step (``GradStats``: one
        stacked float64 device tensor and the names), or None before the first step. Requires
        ``track_stats=True``."""
        if not self._znorm.track_stats:
            raise RuntimeError("gradient statistics are kept only with track_stats=True")
        parts = [part() for part in getattr(self, "_znorm_last_stats", [])]
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        device = parts[0].values.device
        return GradStats([n for p in parts for n in p.names], torch.cat([p.values.to(device) for p in parts]))

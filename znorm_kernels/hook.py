"""The optimizer hook: ``register(optimizer)`` runs ZNorm on the gradients before every ``optimizer.step()``.

It is a step pre-hook (``step_hooks.register_grad_hook``), so it runs once per step, after any gradient
accumulation (with ``step(closure)``, it treats the gradients each closure call computes); under
``torch.amp.GradScaler`` with an ordinary optimizer it sees unscaled gradients and does not run on skipped
steps. With a fused optimizer GradScaler leaves the gradients scaled by s and sets ``optimizer.grad_scale``;
the hook then keeps them scaled (docs/contract.md) and reads the scale as a device tensor, without syncing.
Step after step it reuses its checks while the gradients keep their layouts (``step_cache.GradientGroups``),
in one native call where it can (``grad_watch``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .api import znorm_
from .deepspeed_zero import check_not_deepspeed_zero
from .stats import GradStats, StatsBuffer
from .step_cache import GradientGroups
from .step_hooks import ParamSelector, register_grad_hook

__all__ = ["ZNormHandle", "register"]


class ZNormHandle(RemovableHandle):
    """What ``register`` returns: ``.remove()`` uninstalls the hook; with ``track_stats=True``,
    ``.grad_stats()`` gives the last step's per-parameter gradient mean and std (``GradStats``)."""

    def __init__(self, inner: RemovableHandle, stats: StatsBuffer | None, names: Callable[[], list[str]]):
        self.__dict__.update(inner.__dict__)  # the same hook id and dicts: remove() acts on the same entry
        self._stats, self._names = stats, names

    def grad_stats(self) -> GradStats | None:
        """Mean and std of every gradient the hook treated at the last step, as device tensors, or None
        before the first step. Requires ``register(..., track_stats=True)``."""
        if self._stats is None:
            raise RuntimeError("gradient statistics are kept only with register(..., track_stats=True)")
        return self._stats.assemble(self._names())


def register(
    optimizer: torch.optim.Optimizer,
    *,
    eps: float = 1e-10,
    correction: float = 0,
    backend: str = "auto",
    min_ndim: int = 1,
    params: Iterable | None = None,
    track_stats: bool = False,
) -> ZNormHandle:
    """Install ZNorm on ``optimizer``: each ``step()`` first normalizes the gradients it is about to use.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (fused ones included).
        eps, correction, backend: as for ``znorm_kernels.znorm_``.
        min_ndim: only gradients of parameters with at least this many dimensions (2 leaves biases and
            norm weights alone; 4 treats conv weights only).
        params: if given, only these parameters (or ``(name, parameter)`` pairs) of the optimizer.
        track_stats: keep each step's per-gradient mean and std (computed by the normalization anyway) for
            ``handle.grad_stats()``: two numbers copied per tensor, no pass over the gradients, no sync.
            Eager steps only (not inside torch.compile).

    Returns:
        a ``ZNormHandle``: ``.remove()`` uninstalls the hook, ``.grad_stats()`` gives the statistics.
    """
    check_not_deepspeed_zero(optimizer)  # flat ZeRO partitions: per-tensor ZNorm would be silently wrong
    stats = StatsBuffer() if track_stats else None
    groups = GradientGroups(eps, correction, backend, stats)
    selector = ParamSelector(optimizer, min_ndim, params)

    def transform(params: list[Tensor], grads: list[Tensor | None], names: list[str], scale) -> None:
        if torch.compiler.is_compiling():
            znorm_(grads, eps=eps, correction=correction, backend=backend, grad_scale=scale, names=names)
        else:
            groups.znorm_(grads, names, scale, params)

    def steady(params: list[Tensor], scale) -> bool:  # the step in one native call, where it can be
        return not torch.compiler.is_compiling() and groups.steady(params, scale)

    inner = register_grad_hook(optimizer, transform, selector=selector, steady=steady)
    return ZNormHandle(inner, stats, lambda: selector.select()[1])

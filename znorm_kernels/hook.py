"""The optimizer hook: ``register(optimizer)`` runs ZNorm on the gradients before every ``optimizer.step()``.

It is a step pre-hook, so it runs once per step, after any gradient accumulation (with ``step(closure)``, it
wraps the closure and treats the gradients each closure call computes); under
``torch.amp.GradScaler`` with an ordinary optimizer it sees unscaled gradients and does not run on skipped
steps. With a fused optimizer GradScaler leaves the gradients scaled by s and sets ``optimizer.grad_scale``;
the hook then keeps them scaled (docs/contract.md) and reads the scale as a device tensor, without syncing.

``register_grad_hook`` is the shared machinery (parameter selection, names, the scale) that the baselines'
hooks (gradient centralization, clipping) use too.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .api import znorm_
from .dispatch import GradientGroups
from .integrations.deepspeed import check_not_deepspeed_zero
from .stats import GradStats, StatsBuffer

__all__ = ["GradTransform", "ParamSelector", "ZNormHandle", "register", "register_grad_hook"]

# What a hook applies: (parameters, their grads (None where absent), their names, grad scale or None).
GradTransform = Callable[[list[Tensor], list["Tensor | None"], list[str], "Tensor | None"], None]


def _params_and_names(params: Iterable) -> tuple[list[Tensor], dict[int, str]]:
    """Accept parameters or (name, parameter) pairs, as from ``model.named_parameters()``."""
    tensors: list[Tensor] = []
    names: dict[int, str] = {}
    for i, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, item = item
            names[id(item)] = name
        if not isinstance(item, Tensor):
            raise TypeError(f"params[{i}] is a {type(item).__name__}, expected a parameter tensor")
        tensors.append(item)
    return tensors, names


class ParamSelector:
    """The parameters of an optimizer that a hook treats: those with at least ``min_ndim`` dimensions, and
    only those in ``params`` when it is given. The selection is cached while the param groups stay the same
    (``add_param_group`` invalidates it), so a step costs one pass over the selected parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, min_ndim: int, params: Iterable | None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 0:
            raise ValueError(f"min_ndim must be an int >= 0, got {min_ndim!r}")
        self.optimizer = optimizer
        self.min_ndim = min_ndim
        self.only: set[int] | None = None
        self.given_names: dict[int, str] = {}
        if params is not None:
            if isinstance(params, Tensor):
                params = [params]
            tensors, self.given_names = _params_and_names(params)
            in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
            for i, p in enumerate(tensors):
                if id(p) not in in_optimizer:
                    raise ValueError(
                        f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the optimizer"
                    )
            self.only = {id(p) for p in tensors}
        self._key: list | None = None
        self.params: list[Tensor] = []
        self.names: list[str] = []

    def select(self) -> tuple[list[Tensor], list[str]]:
        groups = self.optimizer.param_groups
        if torch.compiler.is_compiling():
            # Traced once into the graph, the cache has nothing to save, and torch 2.11's dynamo cannot
            # trace id() of a list (the key below).
            return self._selected(groups)
        key = [(id(g["params"]), len(g["params"])) for g in groups]
        if key != self._key:
            self.params, self.names = self._selected(groups)
            self._key = key
        return self.params, self.names

    def _selected(self, groups: list[dict]) -> tuple[list[Tensor], list[str]]:
        params, names = [], []
        for g in groups:
            group_names = g.get("param_names") or [""] * len(g["params"])
            for p, name in zip(g["params"], group_names):
                if p.dim() < self.min_ndim or (self.only is not None and id(p) not in self.only):
                    continue
                params.append(p)
                names.append(self.given_names.get(id(p), name))
        return params, names


def grad_scale_of(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The scale s of still-scaled gradients: set by GradScaler.step on optimizers that unscale inside
    their own (fused) step, None otherwise (the gradients are already unscaled)."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        return getattr(optimizer, "grad_scale", None)
    return None


def register_grad_hook(
    optimizer: torch.optim.Optimizer,
    transform: GradTransform,
    *,
    min_ndim: int = 1,
    params: Iterable | None = None,
    selector: ParamSelector | None = None,
) -> RemovableHandle:
    """Run ``transform`` on the selected parameters' gradients before every ``optimizer.step()`` (those of
    ``selector``, or of a new ``ParamSelector(optimizer, min_ndim, params)``)."""
    if selector is None:
        selector = ParamSelector(optimizer, min_ndim, params)

    def apply(opt: torch.optim.Optimizer) -> None:
        selected, names = selector.select()
        grads = [p.grad for p in selected]
        if any(map(operator.is_not, grads, itertools.repeat(None))):
            transform(selected, grads, names, grad_scale_of(opt))

    def hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # torch passes step()'s own arguments, the optimizer itself first: (opt, closure?), {closure?}.
        at = 1 if args and args[0] is opt else 0
        closure = kwargs["closure"] if "closure" in kwargs else (args[at] if len(args) > at else None)
        if closure is None:
            apply(opt)
            return None

        # step(closure) computes the gradients inside step(), after this pre-hook: treat them as the closure
        # returns (every time it is called: LBFGS calls it several times per step), not the stale ones now.
        def closure_then_transform():
            loss = closure()
            apply(opt)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_transform}
        return (*args[:at], closure_then_transform, *args[at + 1 :]), kwargs

    return optimizer.register_step_pre_hook(hook)


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
            groups.znorm_(grads, names, scale)

    inner = register_grad_hook(optimizer, transform, selector=selector)
    return ZNormHandle(inner, stats, lambda: selector.select()[1])

"""What every gradient treatment run before ``optimizer.step()`` shares (the ZNorm hook, the baselines'
hooks, the callbacks, the ZNorm optimizers): the selection of the parameters, the GradScaler scale of still
scaled gradients, and the step pre-hook itself (``register_grad_hook``)."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .options import check_min_ndim

__all__ = ["GradTransform", "ParamSelector", "grad_scale_of", "register_grad_hook"]

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
        check_min_ndim(min_ndim)
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
        """The selected parameters and their names (from ``param_names`` or ``params``; "" where unknown)."""
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
    steady: Callable[[list[Tensor], Tensor | None], bool] | None = None,
) -> RemovableHandle:
    """Run ``transform`` on the selected parameters' gradients before every ``optimizer.step()`` (those of
    ``selector``, or of a new ``ParamSelector(optimizer, min_ndim, params)``). ``steady(parameters,
    grad_scale)``, when given, is tried first: True means it treated the gradients itself (without the
    gradient list being built here).

    With ``step(closure)`` the gradients are computed inside ``step()``, after this pre-hook: the closure is
    wrapped so that ``transform`` treats what each call of it computes (LBFGS calls it several times)."""
    if selector is None:
        selector = ParamSelector(optimizer, min_ndim, params)

    def apply(opt: torch.optim.Optimizer) -> None:
        selected, names = selector.select()
        if steady is not None and steady(selected, grad_scale_of(opt)):
            return
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

        def closure_then_transform():
            loss = closure()
            apply(opt)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_transform}
        return (*args[:at], closure_then_transform, *args[at + 1 :]), kwargs

    return optimizer.register_step_pre_hook(hook)

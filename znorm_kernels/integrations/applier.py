"""What the Lightning and Hugging Face callbacks share: the unwrapped optimizer, the selected parameters
and their names (cached per optimizer), and ZNorm on their gradients with the GradScaler state taken into
account."""

from __future__ import annotations

import itertools
import operator

import torch
from torch import Tensor

from ..api import znorm_
from ..deepspeed_zero import check_not_deepspeed_zero
from ..options import check_min_ndim
from ..step_hooks import ParamSelector

__all__ = ["ZNormApplier", "unwrap_optimizer"]

# Wrappers that hold the real optimizer: Lightning's LightningOptimizer (._optimizer), accelerate's
# AcceleratedOptimizer and DeepSpeedOptimizerWrapper (.optimizer).
_INNER = ("_optimizer", "optimizer")


def unwrap_optimizer(optimizer):
    """The innermost ``torch.optim.Optimizer`` behind framework wrappers (the object itself if none)."""
    seen = set()
    while not isinstance(optimizer, torch.optim.Optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = next((getattr(optimizer, a) for a in _INNER if getattr(optimizer, a, None) is not None), None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def _grads_scaled(scaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler`` (a torch GradScaler, or None) still holds this optimizer's gradients scaled: it is
    enabled and ``unscale_`` has not run on the optimizer since the last ``update()``."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return False
    if getattr(scaler, "_scale", None) is None:  # nothing was scaled with it yet
        return False
    from torch.amp.grad_scaler import OptState

    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
    return state is None or state.get("stage") is OptState.READY


class ZNormApplier:
    """ZNorm on the gradients an optimizer is about to use, for callbacks that run just before its step."""

    def __init__(self, eps: float, correction: float, backend: str, min_ndim: int) -> None:
        check_min_ndim(min_ndim)
        self.eps, self.correction, self.backend, self.min_ndim = eps, correction, backend, min_ndim
        self._selectors: dict[int, ParamSelector] = {}
        self._names: dict[int, tuple[list, list[str]]] = {}

    def __call__(self, optimizer, model: torch.nn.Module | None, scaler=None) -> None:
        opt = unwrap_optimizer(optimizer)
        selector = self._selectors.get(id(opt))
        if selector is None or selector.optimizer is not opt:
            check_not_deepspeed_zero(optimizer)
            check_not_deepspeed_zero(opt)
            selector = self._selectors[id(opt)] = ParamSelector(opt, self.min_ndim, None)
        params, names = selector.select()
        grads: list[Tensor | None] = [p.grad for p in params]
        if not any(map(operator.is_not, grads, itertools.repeat(None))):
            return
        names = self._named(opt, params, names, model)
        grad_scale = None
        if _grads_scaled(scaler, opt):
            if getattr(opt, "_step_supports_amp_scaling", False):
                # A fused optimizer unscales inside its own step (GradScaler sets its grad_scale to this very
                # tensor): keep the gradients scaled, as register() does, without a sync.
                grad_scale = scaler._scale
            else:
                scaler.unscale_(opt)  # what accelerator.unscale_gradients does; scaler.step won't repeat it
        znorm_(
            grads,
            eps=self.eps,
            correction=self.correction,
            backend=self.backend,
            grad_scale=grad_scale,
            names=names,
        )

    def _named(self, opt, params: list[Tensor], names: list[str], model) -> list[str]:
        """The selector's names, with the model's parameter names filling the gaps (cached per selection)."""
        if model is None or all(names):
            return names
        cached = self._names.get(id(opt))
        if cached is not None and cached[0] is params:
            return cached[1]
        by_id = {id(p): n for n, p in model.named_parameters()}
        filled = [n or by_id.get(id(p), "") for p, n in zip(params, names)]
        self._names[id(opt)] = (params, filled)
        return filled

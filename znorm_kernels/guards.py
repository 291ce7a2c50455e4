"""Cheap checks that a list of tensors is still the one a cached decision was made for: its layouts
(``layout_guard``) and its addresses (``same_addresses``), each in one C call over the whole list. The hook's
per-step cache, the cache of recent checks and the fused optimizer step all keep their work this way."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["layout_guard", "same_addresses", "same_addresses_or_raise"]


def _signature(t: Tensor) -> tuple:
    return (type(t), t.dtype, t.device, t.layout, t.shape, t.stride(), t.requires_grad, t.is_neg())


class _PythonGuard:
    """What ``TensorGuards`` checks, in Python (for a torch without it): slower, the same answers."""

    def __init__(self, *tensors: Tensor) -> None:
        self.signatures = list(map(_signature, tensors))

    def check(self, *tensors: Tensor) -> bool:
        try:
            return list(map(_signature, tensors)) == self.signatures
        except (AttributeError, TypeError, RuntimeError):  # not a tensor, or one without strides
            return False


try:  # private torch API, in torch since 2.0
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover
    _TensorGuards = None


def layout_guard(tensors: list[Tensor]):
    """An object whose ``.check(*others)`` says, in one C call, whether ``others`` match ``tensors`` now in
    everything but their addresses: Python type, dtype, device, dispatch keys (layout, sparse, conj/neg
    views), requires_grad, sizes and strides. ``others`` must have the same length. It is torch's own check
    of a compiled graph's tensor inputs (dynamo's ``TensorGuards``); its dispatch keys are read under the
    thread's dispatch state, so a call under another mode (autocast, inference mode) only fails to match, it
    never matches wrongly."""
    if _TensorGuards is not None:
        try:
            return _TensorGuards(
                *tensors,
                dynamic_dims_sizes=[list(t.shape) for t in tensors],
                dynamic_dims_strides=[list(t.stride()) for t in tensors],
            )
        except Exception:  # pragma: no cover (a private torch API that changed): the Python check decides
            pass
    return _PythonGuard(*tensors)


# same_addresses_or_raise(tensors, starts, indices): whether tensors[i].data_ptr() == starts[i] for i in
# indices, in one C call; raises TypeError or RuntimeError for an entry without an address (None, sparse).
if hasattr(torch._C, "_tensors_data_ptrs_at_indices_equal"):  # private torch API (CUDA graph trees use it)
    same_addresses_or_raise = torch._C._tensors_data_ptrs_at_indices_equal
else:  # pragma: no cover

    def same_addresses_or_raise(tensors: list, starts: list[int], indices: list[int]) -> bool:
        return all(tensors[i].data_ptr() == starts[i] for i in indices)


def same_addresses(tensors: list[Tensor], starts: list[int], indices: list[int]) -> bool:
    """Whether tensors[i].data_ptr() == starts[i] for i in indices; False where one has no address."""
    try:
        return same_addresses_or_raise(tensors, starts, indices)
    except (TypeError, RuntimeError):  # a None, or a tensor without storage
        return False

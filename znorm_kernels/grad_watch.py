"""The hook's steady step in one native call: ``GradWatch`` (csrc/grad_watch.cpp) holds the parameters a hook
treats and a record of their gradients (present or not; dtype, device, dispatch keys, requires_grad, sizes,
strides, address), and each step compares them with it in one loop, without a Python object per gradient.
Where nothing changed it also runs the groups of the native op (``backends.native``) on them, and the caller
launches the others through what their backend bound to those addresses (``launch_only``); where the
gradients moved (same layouts, other addresses, still disjoint) it hands them back for the caller to bind
again; anything else, the caller takes its full path.

What it does not compare, where the Python path does: the Python type of a gradient object. A gradient
replaced by an instance of a Tensor subclass without ``__torch_dispatch__`` (whose dispatch keys are a plain
tensor's), at the same address with the same layout, is normalized as a plain tensor of its data; and a
``TorchFunctionMode`` around the step does not see the op called from C++.

A watch holds its parameters, which ``torch.utils.swap_tensors`` refuses to swap: no watch is made, and one
made is dropped at the next step, while torch swaps parameters on conversion (``swapping``); a user's own
``swap_tensors`` on a watched parameter raises (``ZNORM_NATIVE_STEADY=0`` avoids it).
``ZNORM_NATIVE_STEADY=0`` turns the watch off (every step takes the Python path).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .backends import native
from .tensor_types import PLAIN_TYPES

__all__ = ["CHANGED", "MOVED", "SAME", "enabled", "new_watch", "swapping"]

SAME, MOVED, CHANGED = 0, 1, 2  # GradWatch.step's answers (csrc/grad_watch.cpp)

_enabled = os.environ.get("ZNORM_NATIVE_STEADY", "1") != "0"


def enabled() -> bool:
    """Whether hooks use the native steady path (the extension is built and the switch is not off)."""
    return _enabled and native.loaded()[0] is not None


def swapping() -> bool:
    """Whether torch may swap parameters now (``torch.utils.swap_tensors``, which ``model.to()`` and
    ``load_state_dict`` use under ``torch.__future__.set_swap_module_params_on_conversion(True)``): it
    refuses tensors referenced from elsewhere, as a watch's parameters are."""
    return torch.__future__.get_swap_module_params_on_conversion()


def new_watch(params: list[Tensor]):
    """A ``torch.classes.znorm_kernels_C.GradWatch`` over ``params``, or None (the switch is off, the
    extension is not built or was built before GradWatch, torch may swap the parameters: ``swapping()``, or
    one is a Tensor subclass, which torch swaps too)."""
    if not enabled() or swapping() or not PLAIN_TYPES.issuperset(map(type, params)):
        return None
    try:
        return torch.classes.znorm_kernels_C.GradWatch(params)
    except (RuntimeError, AttributeError):
        return None

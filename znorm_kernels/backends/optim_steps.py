"""What the fused optimizer steps' host sides share (``triton_optim`` and ``native``): reading their
hyperparameters and checking their lists of tensors before anything is launched.

Both kernels pair the elements of a parameter, its gradient and its states by memory order, so every tensor
must have its parameter's shape, strides, dtype and device, and the parameter must be dense. What they do
not serve raises NotImplementedError (the caller's cue to take its general path); malformed calls raise
ValueError.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..memory import is_dense

__all__ = ["LIST_NAMES", "STEP_DTYPES", "check_lengths", "check_tensors", "list_names", "scalars"]

STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def scalars(step: str, **values) -> tuple[float, ...]:
    """The hyperparameters as Python floats, in the order given: numbers, or 1-element CPU tensors (a device
    tensor would need a host sync to read: NotImplementedError)."""
    out = []
    for name, x in values.items():
        if isinstance(x, Tensor) and (x.device.type != "cpu" or x.numel() != 1):
            raise NotImplementedError(f"{name} as a device tensor is not supported by the {step}")
        out.append(float(x))
    return tuple(out)


def check_lengths(lists: list[list], names: list[str]) -> int:
    """The number of params (``lists[0]``); ValueError when another list has another length."""
    n = len(lists[0])
    for lst, name in zip(lists, names):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries for {n} params")
    return n


def check_tensors(lists: list[list], names: list[str], device: torch.device, step: str) -> None:
    """Every entry a strided tensor on ``device`` with its param's shape, strides and dtype (one of
    STEP_DTYPES), and every param dense."""
    for i, p in enumerate(lists[0]):
        for lst, name in zip(lists, names):
            t = lst[i]
            if not isinstance(t, Tensor):
                raise ValueError(f"{name}[{i}] is {type(t).__name__}, not a tensor")
            if t.device != device:
                raise NotImplementedError(
                    f"{name}[{i}] is on {t.device}: the {step} takes the tensors of one device ({device})"
                )
            if t.dtype not in STEP_DTYPES or t.dtype != p.dtype:
                raise NotImplementedError(f"{name}[{i}] is {t.dtype}, its param {p.dtype}")
            if t.layout != torch.strided:
                raise NotImplementedError(f"{name}[{i}] is not a dense strided tensor ({t.layout})")
            if t.shape != p.shape or t.stride() != p.stride():
                raise NotImplementedError(
                    f"{name}[{i}] has shape {tuple(t.shape)} and strides {t.stride()}, its param "
                    f"{tuple(p.shape)} and {p.stride()}: the fused step pairs elements by memory order"
                )
        if not is_dense(p):
            raise NotImplementedError(f"params[{i}] is not dense (a view with gaps or overlaps)")


# The names of a fused step's lists, in the kernels' order ([params, grads, *states]), for error messages.
LIST_NAMES = {
    "sgd": ("params", "grads", "momentum_buffers"),
    "adam": ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
}


def list_names(kind: str, count: int) -> list[str]:
    """The names of the first ``count`` lists of a ``kind`` ("sgd" or "adam") step."""
    return list(LIST_NAMES[kind][:count])

"""What the fused optimizer steps' host sides share (``triton_optim`` and ``native_optim``): their
hyperparameters (``SgdArgs``, ``AdamArgs``) and the checks of their lists of tensors before anything is
launched.

Both kernels pair the elements of a parameter, its gradient and its states by memory order, so every tensor
must have its parameter's shape, strides, dtype and device, and the parameter must be dense. What they do
not serve raises NotImplementedError (the caller's cue to take its general path); malformed calls raise
ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..memory import is_dense

__all__ = [
    "LIST_NAMES",
    "STEP_DTYPES",
    "AdamArgs",
    "SgdArgs",
    "check_lengths",
    "check_tensors",
    "list_names",
    "scalars",
]

STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _scalar(name: str, x, step: str) -> float:
    if isinstance(x, Tensor) and (x.device.type != "cpu" or x.numel() != 1):
        raise NotImplementedError(f"{name} as a device tensor is not supported by the {step}")
    return float(x)


def scalars(step: str, **values) -> tuple[float, ...]:
    """The hyperparameters as Python floats, in the order given: numbers, or 1-element CPU tensors (a device
    tensor would need a host sync to read: NotImplementedError)."""
    return tuple(_scalar(name, x, step) for name, x in values.items())


def _read(args, floats: tuple[str, ...], flags: tuple[str, ...]) -> None:
    """An Args object's ``floats`` made Python floats (as ``scalars`` reads them) and its ``flags`` Python
    bools, in place, as it is made (its ``__dict__``: the dataclass is frozen)."""
    fields = args.__dict__
    for name in floats:
        if type(fields[name]) is not float:
            fields[name] = _scalar(name, fields[name], "fused step")
    for name in flags:
        if type(fields[name]) is not bool:
            fields[name] = bool(fields[name])


@dataclass(frozen=True)
class SgdArgs:
    """torch.optim.SGD's hyperparameters, as the fused SGD steps of both hosts take them (one set per call;
    optim/updates.py makes them from a param group). Numbers become Python floats as the object is made
    (1-element CPU tensors read; a device tensor would need a host sync: NotImplementedError), flags Python
    bools."""

    lr: float  # the learning rate
    momentum: float  # the momentum factor (0: no momentum buffers)
    dampening: float  # the momentum's dampening (the gradient's weight in the buffer is 1 - dampening)
    nesterov: bool  # Nesterov momentum
    weight_decay: float  # L2 penalty, added to the gradient
    maximize: bool  # ascend (the update takes -z)

    def __post_init__(self) -> None:
        _read(self, ("lr", "momentum", "dampening", "weight_decay"), ("nesterov", "maximize"))


@dataclass(frozen=True)
class AdamArgs:
    """torch.optim.Adam's and AdamW's hyperparameters, as the fused Adam steps take them (one set per call;
    the step counters already incremented). Numbers become Python floats as for ``SgdArgs`` (``step_size`` and
    ``bias_correction2_sqrt`` are taken as given: the steps read them as floats), flags Python bools."""

    step_size: float | list[float]  # lr / (1 - beta1**step): one for every tensor, or one per tensor
    bias_correction2_sqrt: float | list[float]  # (1 - beta2**step) ** 0.5, as step_size
    amsgrad: bool  # keep the maximum of the second moments (max_exp_avg_sqs)
    beta1: float  # the first moment's decay
    beta2: float  # the second moment's decay
    lr: float  # the learning rate (decoupled weight decay scales the parameter by 1 - lr * weight_decay)
    weight_decay: float  # L2 penalty (Adam: added to the gradient; AdamW: decoupled)
    eps: float  # Adam's eps, added to the denominator (not ZNorm's)
    maximize: bool  # ascend (the update takes -z)
    decoupled: bool  # AdamW's decoupled weight decay

    def __post_init__(self) -> None:
        _read(self, ("beta1", "beta2", "lr", "weight_decay", "eps"), ("amsgrad", "maximize", "decoupled"))


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

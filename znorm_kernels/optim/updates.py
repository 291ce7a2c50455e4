"""The fused updates of the ZNorm optimizers, one entry per optimizer kind in ``FUSED_UPDATES``: which state
tensors the update reads, how the first step creates them (exactly as torch's optimizer would), the kernel
arguments it takes from the param group, and its kernel on each path (Triton, native). An optimizer whose
kind has no entry takes the general path (the hook's kernel, then torch's own update), never another kind's
update. docs/extending.md has the checklist for adding one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from ..backends import optim_steps, step_counters
from ..backends.optim_steps import AdamArgs, SgdArgs

__all__ = ["FUSED_UPDATES", "FusedUpdate", "bias_corrections", "bucket_args"]


def count_steps_(counters: list[Tensor]) -> None:
    """Add one to Adam's step counters (CPU tensors, as torch counts them)."""
    step_counters.add_one_(counters)


def bias_corrections(lr: float, beta1: float, beta2: float, counts: list[float]) -> tuple[list, list]:
    """Adam's per-tensor step sizes and bias-correction square roots for step counts already incremented,
    as Python floats, the way torch's single-tensor Adam computes them."""
    return [lr / (1 - beta1**c) for c in counts], [(1 - beta2**c) ** 0.5 for c in counts]


def bucket_args(args: SgdArgs | AdamArgs, idx: list[int]) -> SgdArgs | AdamArgs:
    """The hyperparameters of the tensors at ``idx`` (per-tensor lists picked, scalars kept)."""
    if not isinstance(getattr(args, "step_size", None), list):
        return args
    step_size, bc2 = args.step_size, args.bias_correction2_sqrt
    return replace(args, step_size=[step_size[i] for i in idx], bias_correction2_sqrt=[bc2[i] for i in idx])


# --- SGD ---


def _sgd_state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("momentum_buffer",) if group["momentum"] != 0 else ()


def _sgd_args(group: dict[str, Any], counters: list[Tensor]) -> SgdArgs:
    return SgdArgs(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                   nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                   maximize=group["maximize"])  # fmt: skip


def _sgd_prepare(opt, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], update: FusedUpdate):
    """The SGD update's lists (momentum buffers allocated for a first step, as torch's first step makes
    them), its hyperparameters, its ``first`` flags and what to do after it."""
    args = _sgd_args(group, [])
    momentum = group["momentum"]
    bufs, first = [], []
    for p in params:
        buf = opt.state[p].get("momentum_buffer")
        if momentum != 0 and buf is None:
            buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            first.append(True)
        else:
            first.append(False)
        bufs.append(buf)
    lists = [params, grads] + ([bufs] if momentum != 0 else [])

    def after() -> None:
        if momentum != 0:  # torch keeps the buffer only with momentum
            for p, buf in zip(params, bufs):
                opt.state[p]["momentum_buffer"] = buf

    return lists, [params, grads, bufs], args, dict(first=first), after


# --- Adam and AdamW ---


def _adam_state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")


def _adam_group_args(group: dict[str, Any], decoupled: bool, step_size, bias_correction2_sqrt) -> AdamArgs:
    """The group's AdamArgs with these step sizes."""
    beta1, beta2 = group["betas"]
    return AdamArgs(step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt,
                    amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    decoupled=decoupled)  # fmt: skip


def _adam_args(group: dict[str, Any], counters: list[Tensor], *, decoupled: bool) -> AdamArgs:
    beta1, beta2 = group["betas"]
    beta1, beta2, lr = optim_steps.scalars("fused step", beta1=beta1, beta2=beta2, lr=group["lr"])
    counts = [c + 1 for c in step_counters.counts(counters)]  # CPU tensors: no device sync
    if counts.count(counts[0]) == len(counts):  # one value for every tensor
        (step_size,), (bc2_sqrt,) = bias_corrections(lr, beta1, beta2, counts[:1])
    else:
        step_size, bc2_sqrt = bias_corrections(lr, beta1, beta2, counts)
    return _adam_group_args(group, decoupled, step_size, bc2_sqrt)


def _adam_prepare(opt, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], update: FusedUpdate):
    """The Adam/AdamW update's lists (state created as torch's Adam._init_group makes it for a group neither
    capturable nor fused), its hyperparameters, no further options, and the step count after it."""
    beta1, beta2 = group["betas"]
    amsgrad = group["amsgrad"]
    exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], []
    for p in params:
        state = opt.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device.type != "cpu":
            raise NotImplementedError("step counters on the device (a capturable or fused checkpoint)")
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        max_sqs.append(state.get("max_exp_avg_sq") if amsgrad else None)
        steps.append(state["step"])
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_sqs] if amsgrad else [])
    counts = [float(s) + 1 for s in steps]  # CPU tensors: no device sync
    step_size, bc2_sqrt = bias_corrections(group["lr"], beta1, beta2, counts)
    args = _adam_group_args(group, update.decoupled, step_size, bc2_sqrt)
    return lists, [params, grads, exp_avgs, exp_avg_sqs, max_sqs], args, {}, lambda: count_steps_(steps)


@dataclass(frozen=True)
class FusedUpdate:
    """One optimizer kind's fused update.

    ``family``: its kernels ("sgd" or "adam": triton_optim.KERNELS, native_optim's ``<family>_step_``);
    ``state_keys(group)``: the state tensors the update reads per parameter, in the kernels' list order;
    ``counts_steps``: whether each parameter has a CPU ``step`` counter the update advances (Adam);
    ``args(group, counters)``: the kernels' hyperparameters for a remembered step (the family's Args of
    backends/optim_steps.py);
    ``prepare(opt, group, params, grads, update)``: for a full step, (the lists to check, the lists the
    kernels take, their hyperparameters (the family's Args), the step's other keyword options, what to run
    after the launch), creating missing state as torch's optimizer would; ``decoupled``: AdamW's weight
    decay."""

    family: str
    state_keys: Callable[[dict[str, Any]], tuple[str, ...]]
    counts_steps: bool
    args: Callable[[dict[str, Any], list[Tensor]], SgdArgs | AdamArgs]
    prepare: Callable
    decoupled: bool = False


FUSED_UPDATES: dict[str, FusedUpdate] = {
    "sgd": FusedUpdate("sgd", _sgd_state_keys, False, _sgd_args, _sgd_prepare),
    "adam": FusedUpdate("adam", _adam_state_keys, True, partial(_adam_args, decoupled=False), _adam_prepare),
    "adamw": FusedUpdate(
        "adam", _adam_state_keys, True, partial(_adam_args, decoupled=True), _adam_prepare, decoupled=True
    ),
}

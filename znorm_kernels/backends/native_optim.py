"""The fused optimizer steps of the native extension (CPU kernels, and CUDA kernels in a CUDA build):
``sgd_step_`` and ``adam_step_`` wrap the ops ``znorm_kernels_C::znorm_sgd_step_`` and ``znorm_adam_step_``.

One call per (dtype) group computes, per tensor, the statistics as ``znorm_`` does on that device (bitwise
the same mean and multiplier, so z is bitwise what the "cpu" or "cuda" backend writes into the gradient),
then makes ONE pass over the gradient, the parameter and its states applying torch.optim.SGD's or
Adam/AdamW's update to z, with the formulas (operation by operation, in float32, float64 for float64 tensors,
no FMA, correctly rounded division and square root, each stored value rounded once) of the fused Triton step
(triton_optim.py). On the CPU parallel over tensors and chunks; on CUDA three launches per dtype (znorm_'s
statistics and finalize kernels over a cached table, then one update kernel), no host synchronization, on the
current stream. Both deterministic. Under CUDA-graph capture the host values of the call (learning rate,
Adam's per-tensor step sizes) are captured: a replay repeats the captured step's values, as any captured
kernel argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import optim_steps
from .native import BUILD_HINT, has_optim_kernels
from .optim_steps import AdamArgs, SgdArgs

__all__ = ["STEPS", "adam_step_", "check_step", "sgd_step_", "steady_step_"]


def check_step(lists: list[list], names: list[str]) -> None:
    """Validate one group of a fused step without touching it (``lists[0]`` are the params): ValueError for
    malformed calls, NotImplementedError for what the native kernels do not serve (the caller's cue to take
    its general path): a first param on a device without native step kernels (CPU always; CUDA in a build
    with them), and what ``optim_steps.check_tensors`` refuses (another device, dtype, shape or strides than
    the param's; non-dense params)."""
    n = optim_steps.check_lengths(lists, names)
    params = lists[0]
    device = params[0].device if n and isinstance(params[0], Tensor) else torch.device("cpu")
    if not has_optim_kernels(device.type):
        raise NotImplementedError(
            f"the native extension has no fused optimizer kernels for {device.type} tensors; {BUILD_HINT}"
        )
    optim_steps.check_tensors(lists, names, device, "native fused step")


def _flags(name: str, flags, n: int) -> list[int]:
    flags = [int(bool(f)) for f in flags]
    if len(flags) != n:
        raise ValueError(f"{name} has {len(flags)} entries for {n} params")
    return flags


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    args: SgdArgs,
    *,
    treated: list[bool],
    first: list[bool] | None = None,
    znorm_eps: float,
    correction: float,
    write_grad: bool = False,
    stats_out: Tensor | None = None,
    checked: bool = False,
) -> None:
    """torch.optim.SGD's step on the z-scores of the gradients, for CPU or CUDA tensors, in one op call (the
    arguments of ``triton_optim.sgd_step_``, the hyperparameters ``args`` an ``optim_steps.SgdArgs``, with
    ``treated``, ``znorm_eps`` and ``correction`` for its stats tensor).

    ``treated[i]``: whether tensor i gets ZNorm (else, and for tensors of fewer than 2 elements, z = g).
    ``momentum_buffers[i]`` is unused (may be None) when momentum is 0; where ``first[i]`` is True (None:
    nowhere) it is a buffer the caller just allocated, which becomes d as torch's first step makes it.
    ``write_grad`` stores z into the gradient. ``stats_out``: an optional float64 ``[len(params), 2]``
    tensor on the tensors' device (contiguous) that receives each treated tensor's (mean, std), as
    ``znorm_``'s ``stats`` (NaN rows elsewhere). ``checked=True``: the caller has validated these very lists
    with ``check_step`` (skips it; the op checks them again in C++ before writing anything, raising
    RuntimeError)."""
    use_momentum = args.momentum != 0
    lists = [params, grads] + ([momentum_buffers] if use_momentum else [])
    if not checked:
        check_step(lists, optim_steps.list_names("sgd", len(lists)))
    n = len(params)
    treated = _flags("treated", treated, n)
    first = [0] * n if first is None else _flags("first", first, n)
    if n == 0:
        return
    with torch.no_grad():
        torch.ops.znorm_kernels_C.znorm_sgd_step_(
            params, grads, momentum_buffers if use_momentum else [], treated, first, float(znorm_eps),
            float(correction), args.lr, args.momentum, args.dampening, args.nesterov, args.weight_decay,
            args.maximize, bool(write_grad), stats_out,
        )  # fmt: skip


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor | None],
    args: AdamArgs,
    *,
    treated: list[bool],
    znorm_eps: float,
    correction: float,
    write_grad: bool = False,
    stats_out: Tensor | None = None,
    checked: bool = False,
) -> None:
    """torch.optim.Adam's (``args.decoupled`` False) or AdamW's (True) non-capturable step on the z-scores of
    the gradients, for CPU or CUDA tensors, in one op call (the arguments of ``triton_optim.adam_step_``, the
    hyperparameters ``args`` an ``optim_steps.AdamArgs`` whose ``step_size`` and ``bias_correction2_sqrt``
    may also be one float for every tensor, with ``treated``, ``znorm_eps`` and ``correction`` for its stats
    tensor). ``max_exp_avg_sqs`` is read only with amsgrad. ``treated``, ``write_grad``, ``stats_out`` and
    ``checked`` as for ``sgd_step_``."""
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if args.amsgrad else [])
    if not checked:
        check_step(lists, optim_steps.list_names("adam", len(lists)))
    n = len(params)
    treated = _flags("treated", treated, n)
    step_size, bias_correction2_sqrt = args.step_size, args.bias_correction2_sqrt
    if not isinstance(step_size, list):  # one value for every tensor
        step_size, bias_correction2_sqrt = [step_size] * n, [bias_correction2_sqrt] * n
    if len(step_size) != n or len(bias_correction2_sqrt) != n:
        raise ValueError("step_size and bias_correction2_sqrt need one entry per param")
    if n == 0:
        return
    with torch.no_grad():
        torch.ops.znorm_kernels_C.znorm_adam_step_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if args.amsgrad else [], treated,
            [float(x) for x in step_size], [float(x) for x in bias_correction2_sqrt], float(znorm_eps),
            float(correction), args.amsgrad, args.beta1, args.beta2, args.lr, args.weight_decay, args.eps,
            args.maximize, args.decoupled, bool(write_grad), stats_out,
        )  # fmt: skip


STEPS = {"sgd": sgd_step_, "adam": adam_step_}


def steady_step_(family: str, lists: list[list[Tensor]], args: SgdArgs | AdamArgs, **kwargs) -> None:
    """A step that creates no state, of lists validated by an earlier full step ([params, grads, *states]
    as far as the family's update reads them): the family's step with its unused lists padded."""
    n = len(lists[0])
    lists = [*lists, *([[None] * n] * (len(optim_steps.LIST_NAMES[family]) - len(lists)))]
    STEPS[family](*lists, args, checked=True, **kwargs)

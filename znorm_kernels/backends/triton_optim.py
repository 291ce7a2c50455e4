"""Fused ZNorm optimizer steps on Triton (host side; kernels in triton_optim_kernels.py): SGD and Adam/AdamW
updates that apply ZNorm to the gradient as they load it, one launch per (device, dtype) group.

The caller runs the statistics stage first, ``stats = triton_host.statistics(grads, eps, correction,
grad_scale)`` (a float64 [T, 4] device tensor, one (mean, std, inv, wide) row per tensor of the list), then
``sgd_step_`` or ``adam_step_`` with the same lists. Each reads every gradient, parameter and state element
once and writes every parameter and state element once: z = (g - mean) * inv exactly as the normalize pass
computes it (the value the hook would have written into the gradient, in its dtype), then torch.optim's
update in float32 (float64 for float64 tensors) from that z.

What the statistics rows must hold:
- Unscaled gradients (``grad_scale=None``): the rows of ``statistics(grads, eps, correction)``.
- Scaled gradients (``grad_scale=s``, a 0-d or 1-element device tensor, the gradients holding s*g, as
  GradScaler leaves them for an optimizer that unscales itself): the rows of ``statistics(grads, eps,
  correction, grad_scale=s)`` with the same s, i.e. mean = mean(s*g) and inv = s / (std(s*g) + s*eps). The
  kernel then forms what the hook writes for a fused optimizer, round((s*g - mean) * inv) = s*z in the
  gradient's dtype, and divides it by s in float32 as torch's fused optimizers do, so z is the z-score of g.
- A tensor to use without ZNorm (a group or a parameter the caller does not normalize): the row
  (0, anything, 1, 0), which gives z = g exactly (z = (s*g)/s with a grad scale), in the same launch.
- Tensors of fewer than 2 elements: ZNorm leaves them unchanged, so the kernel uses z = g (divided by s with
  a grad scale) whatever their row holds. (``statistics`` itself gives a 1-element tensor the row of a
  constant tensor, (g, 0, 0, 0), which would make z = 0: the kernel never reads it.) Empty tensors are
  skipped.

found_inf (a device tensor, 0-d or 1 element, nonzero when GradScaler found inf/NaN): read by every program
on the device, no host synchronization; when it is nonzero the launch writes nothing (parameters, states and
gradients unchanged). write_grad=True also stores z (unscaled, in the gradient's dtype, as torch's fused
optimizers leave the unscaled gradient) into the gradient.

Lists that this kernel does not serve raise NotImplementedError (the caller's cue to take its slow path):
mixed devices or dtypes, dtypes other than float32/float16/bfloat16/float64, a device Triton cannot serve,
sparse tensors, non-dense tensors, or a parameter whose gradient or states differ from it in shape or
strides. Malformed calls (list lengths, the stats tensor's shape) raise ValueError.

The int64 table of work items and tensor addresses is cached by the tensors' addresses and sizes (as
triton_host caches its plans), reaches the device through pinned memory without blocking, and is kept for the
life of the process once a launch that reads it was captured in a CUDA graph. Hyperparameters are kernel
arguments (float64 bit patterns), so an optimizer step captured in a graph replays with the values it was
captured with, as torch's non-capturable optimizers would; Adam's per-tensor step sizes, when they differ
between tensors, travel in a small per-call table and raise NotImplementedError under capture.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import optim_steps
from .triton_host import _on_device, _stream_of, _triton_dtypes, compile_ahead, device_table, serves
from .triton_launch import launcher_for

__all__ = ["adam_step_", "check", "compile_adam_for_target", "compile_sgd_for_target", "sgd_step_"]

# Elements per tile (registers): float64 tiles are half as long, so every dtype holds the same bytes.
BLOCK = {torch.float64: 1024}
DEFAULT_BLOCK = 2048
TILES = 8  # tiles per work item: an item (one program) covers at most BLOCK * TILES elements
NUM_WARPS = 8
ALIGNMENT = 16
ITEM = 4
TENSOR = 8
PLAN_CACHE_SIZE = 16
# As triton_host: no FMA contraction, so every operation rounds as under the interpreter and in torch.
OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


def block_for(dtype: torch.dtype) -> int:
    return BLOCK.get(dtype, DEFAULT_BLOCK)


def _bits(x: float) -> int:
    """The int64 bit pattern of float64 x (the kernels' scalar arguments)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@dataclass(eq=False)
class Plan:
    meta: Tensor  # int64 table (layout in triton_optim_kernels)
    num_items: int
    aligned: bool
    numels: tuple = ()
    host: Tensor | None = None  # pinned source kept when built during graph capture
    streams: set = field(default_factory=set)
    captured: bool = False


_plans: OrderedDict[tuple, Plan] = OrderedDict()
_captured_plans: list[Plan] = []  # tables a captured graph reads: kept for the life of the process


def _checked_group(lists: list[list], names: list[str], stats: Tensor) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of lists the caller validated with ``check`` (lengths still compared: cheap)."""
    n = optim_steps.check_lengths(lists, names)
    return (lists[0][0].device, lists[0][0].dtype) if n else (None, None)


def check(lists: list[list], names: list[str], stats: Tensor) -> tuple[torch.device, torch.dtype]:
    """The validation the steps run (public, for callers that validate once and pass ``checked=True``)."""
    return _check(lists, names, stats)


def _check(lists: list[list], names: list[str], stats: Tensor) -> tuple[torch.device, torch.dtype]:
    """Validate one group: ValueError for malformed calls, NotImplementedError for what the kernel does not
    serve (a device or dtype Triton does not serve, and what ``optim_steps.check_tensors`` refuses).
    ``lists[0]`` are the params; entries of the other lists may be None only where unused (the caller passes
    None lists for unused states)."""
    n = optim_steps.check_lengths(lists, names)
    if n == 0:
        return None, None
    params = lists[0]
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _triton_dtypes():
        raise NotImplementedError(f"the fused Triton step does not serve {dtype} tensors")
    why = serves("triton", device)
    if why is not None:
        raise NotImplementedError(why)
    if not isinstance(stats, Tensor) or stats.dtype != torch.float64 or tuple(stats.shape) != (n, 4):
        raise ValueError(f"stats must be the float64 [{n}, 4] tensor of triton_host.statistics for the list")
    if stats.device != device or not stats.is_contiguous():
        raise ValueError("stats must be a contiguous tensor on the params' device")
    optim_steps.check_tensors(lists, names, device, "fused Triton step")
    for i, p in enumerate(params):
        if p.dtype != dtype:
            raise NotImplementedError(f"params[{i}] is {p.dtype}; the group is {dtype}")
    return device, dtype


def _table(addrs, numels, firsts, block: int) -> tuple[list[int], int]:
    items, tensors = [], []
    chunk = block * TILES
    for row, (a, n, first) in enumerate(zip(addrs, numels, firsts)):
        if n == 0:
            continue
        t = len(tensors) // TENSOR
        tensors += (*a, n, int(first), row)
        for start in range(0, n, chunk):
            items += (t, start, min(chunk, n - start), 0)
    return items + tensors, len(items) // ITEM


def _plan_for(device, dtype, addrs, numels, firsts, first_key) -> Plan:
    block = block_for(dtype)
    key = (device, dtype, block, addrs, numels, first_key)
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    table, num_items = _table(addrs, numels, firsts, block)
    meta, host = device_table(table, device)
    plan = Plan(
        meta=meta,
        num_items=num_items,
        aligned=all(x % ALIGNMENT == 0 for a in addrs for x in a),
        numels=numels,
        host=host,
    )
    _plans[key] = plan
    if len(_plans) > PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


def _prepare(plan: Plan, device: torch.device) -> None:
    """Keep the table alive for every stream (and every captured graph) that reads it."""
    if device.type != "cuda":
        return
    if torch.cuda.is_current_stream_capturing():
        if not plan.captured:
            plan.captured = True
            _captured_plans.append(plan)
        return
    stream = _stream_of(device)
    if stream not in plan.streams:
        plan.streams.add(stream)
        plan.meta.record_stream(torch.cuda.current_stream(device))


def _device_scalar(x: Tensor | None, device: torch.device, name: str, dtype=None) -> Tensor | None:
    if x is None:
        return None
    if not isinstance(x, Tensor) or x.numel() != 1:
        raise ValueError(f"{name} must be a 1-element tensor")
    return x.to(device=device, dtype=dtype or x.dtype, non_blocking=True)


def _zeros(n: int):
    return itertools.repeat(0, n)


@functools.cache
def _vec(dtype: torch.dtype) -> int:
    return ALIGNMENT // torch.empty((), dtype=dtype).element_size()


def _common_constants(dtype, aligned, has_scale, has_found_inf, maximize, weight_decay, write_grad) -> dict:
    tl_dtype, tl_acc = _triton_dtypes()[dtype]
    return {
        "DTYPE": tl_dtype, "ACC": tl_acc, "BLOCK": block_for(dtype), "VEC": _vec(dtype), "ALIGNED": aligned,
        "HAS_SCALE": has_scale, "HAS_FOUND_INF": has_found_inf, "MAXIMIZE": maximize,
        "WEIGHT_DECAY": weight_decay, "WRITE_GRAD": write_grad,
    }  # fmt: skip


def _launch(kernel, device, plan, stats, grad_scale, found_inf, pre: tuple, scalars: tuple, constants: dict):
    def go():
        _prepare(plan, device)
        scale = _device_scalar(grad_scale, device, "grad_scale", torch.float32)
        inf = _device_scalar(found_inf, device, "found_inf")
        args = (
            plan.meta,
            stats,
            stats if scale is None else scale,
            stats if inf is None else inf,
            *pre,
            plan.num_items,
            *map(_bits, scalars),
        )
        launcher = launcher_for(kernel)
        # Triton's binding of ~20 arguments per step is host time the fused step exists to save.
        # constants: a dict of _sgd_constants or _adam_constants, cached for good (its id is never reused).
        key = (device.index, id(constants))
        launcher((plan.num_items,), _stream_of(device), args, key, **constants, **OPTIONS)

    _on_device(device, go)


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    stats: Tensor,
    *,
    first: list[bool],
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    write_grad: bool = False,
    checked: bool = False,
) -> None:
    """torch.optim.SGD's step on z-scores of the gradients (one (device, dtype) group, one launch).
    ``checked=True``: the caller has validated these very lists with ``check`` (skips it).

    ``momentum_buffers[i]``: the parameter's momentum buffer (unused, may be None, when momentum is 0); where
    ``first[i]`` is True it is a buffer the caller just allocated, which becomes d as torch's first step
    makes it (its old contents are not read)."""
    lr, momentum, dampening, weight_decay = optim_steps.scalars(
        "fused Triton step", lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    use_momentum = momentum != 0
    lists = [params, grads] + ([momentum_buffers] if use_momentum else [])
    names = ["params", "grads"] + (["momentum_buffers"] if use_momentum else [])
    if len(first) != len(params):
        raise ValueError(f"first has {len(first)} entries for {len(params)} params")
    device, dtype = _checked_group(lists, names, stats) if checked else _check(lists, names, stats)
    if device is None:
        return
    plan, mode = sgd_plan(lists, first, device, dtype)
    sgd_launch(
        plan, mode, device, dtype, stats, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
        weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
        write_grad=write_grad,
    )  # fmt: skip


def sgd_plan(lists: list[list[Tensor]], first, device, dtype) -> tuple[Plan, int]:
    """(plan, FIRST mode) of validated SGD lists ([params, grads] or [params, grads, momentum_buffers]):
    what ``sgd_launch`` needs that depends on the tensors' addresses and sizes only (a caller that knows
    them unchanged keeps it)."""
    use_momentum = len(lists) == 3
    n = len(lists[0])
    firsts = tuple(map(bool, first)) if use_momentum else (False,) * n
    mode = 1 if all(firsts) else 0 if not any(firsts) else 2
    if use_momentum:
        addrs = tuple(zip(*(map(Tensor.data_ptr, lst) for lst in lists), _zeros(n), _zeros(n)))
    else:
        addrs = tuple(zip(*(map(Tensor.data_ptr, lst) for lst in lists), _zeros(n), _zeros(n), _zeros(n)))
    numels = tuple(p.numel() for p in lists[0])
    return _plan_for(device, dtype, addrs, numels, firsts, firsts if mode == 2 else mode), mode


def sgd_launch(
    plan: Plan,
    mode: int,
    device,
    dtype,
    stats: Tensor,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    write_grad: bool = False,
) -> None:
    """The SGD update launch of a plan from ``sgd_plan`` (the hyperparameters already Python floats)."""
    if plan.num_items == 0:
        return
    from .triton_optim_kernels import znorm_sgd_kernel

    constants = _sgd_constants(
        dtype, plan.aligned, grad_scale is not None, found_inf is not None, bool(maximize), weight_decay != 0,
        bool(write_grad), momentum != 0, bool(nesterov), mode,
    )  # fmt: skip
    scalars = (lr, momentum, 1 - dampening, weight_decay)
    _launch(znorm_sgd_kernel, device, plan, stats, grad_scale, found_inf, (), scalars, constants)


@functools.cache
def _sgd_constants(dtype, aligned, has_scale, has_found_inf, maximize, weight_decay, write_grad, momentum,
                   nesterov, mode) -> dict:  # fmt: skip
    constants = _common_constants(
        dtype, aligned, has_scale, has_found_inf, maximize, weight_decay, write_grad
    )
    constants.update(MOMENTUM=momentum, NESTEROV=nesterov, FIRST=mode)
    return constants


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor | None],
    stats: Tensor,
    *,
    step_size: list[float],
    bias_correction2_sqrt: list[float],
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    write_grad: bool = False,
    checked: bool = False,
) -> None:
    """torch.optim.Adam's (``decoupled=False``) or AdamW's (``decoupled=True``) non-capturable step on
    z-scores of the gradients (one (device, dtype) group, one launch). The caller has incremented the step
    counters and passes, per tensor, ``step_size = lr / (1 - beta1**step)`` and ``bias_correction2_sqrt =
    (1 - beta2**step) ** 0.5`` in Python floats, as torch's single-tensor code computes them.
    ``max_exp_avg_sqs`` is read only with amsgrad (entries may be None otherwise). ``checked``: as for
    ``sgd_step_``."""
    beta1, beta2, lr, weight_decay, eps = optim_steps.scalars(
        "fused Triton step", beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps
    )
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if amsgrad else [])
    n = len(params)
    if len(step_size) != n or len(bias_correction2_sqrt) != n:
        raise ValueError("step_size and bias_correction2_sqrt need one entry per param")
    device, dtype = _checked_group(lists, names, stats) if checked else _check(lists, names, stats)
    if device is None:
        return
    plan = adam_plan(lists, device, dtype)
    numels = plan.numels
    live = [i for i in range(n) if numels[i]]
    sizes = {float(step_size[i]) for i in live}
    bc2s = {float(bias_correction2_sqrt[i]) for i in live}
    if len(sizes) > 1 or len(bc2s) > 1:
        step_size = list(map(float, step_size))
        bias_correction2_sqrt = list(map(float, bias_correction2_sqrt))
    else:
        step_size, bias_correction2_sqrt = (sizes.pop(), bc2s.pop()) if live else (0.0, 0.0)
    adam_launch(
        plan, device, dtype, stats, step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt,
        amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
        maximize=maximize, decoupled=decoupled, grad_scale=grad_scale, found_inf=found_inf,
        write_grad=write_grad,
    )  # fmt: skip


def adam_plan(lists: list[list[Tensor]], device, dtype) -> Plan:
    """The plan of validated Adam lists ([params, grads, exp_avgs, exp_avg_sqs] and max_exp_avg_sqs with
    amsgrad): what ``adam_launch`` needs that depends on the tensors' addresses and sizes only."""
    n = len(lists[0])
    if len(lists) == 5:
        addrs = tuple(zip(*(map(Tensor.data_ptr, lst) for lst in lists)))
    else:
        addrs = tuple(zip(*(map(Tensor.data_ptr, lst) for lst in lists), _zeros(n)))
    numels = tuple(p.numel() for p in lists[0])
    return _plan_for(device, dtype, addrs, numels, (False,) * n, 0)


def adam_launch(
    plan: Plan,
    device,
    dtype,
    stats: Tensor,
    *,
    step_size: float | list[float],
    bias_correction2_sqrt: float | list[float],
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    write_grad: bool = False,
) -> None:
    """The Adam/AdamW update launch of a plan from ``adam_plan``: ``step_size`` and
    ``bias_correction2_sqrt`` one float for every tensor, or lists of floats (one per tensor: the per-tensor
    table, not capturable); the hyperparameters already Python floats."""
    if plan.num_items == 0:
        return
    per_tensor = isinstance(step_size, list)
    if per_tensor:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise NotImplementedError("per-tensor Adam step sizes cannot be captured in a CUDA graph")
        host = torch.tensor(list(zip(step_size, bias_correction2_sqrt)), dtype=torch.float64)
        steps = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        one_size = one_bc2 = 0.0
    else:
        steps = stats  # never read
        one_size, one_bc2 = step_size, bias_correction2_sqrt
    from .triton_optim_kernels import znorm_adam_kernel

    constants = _adam_constants(
        dtype, plan.aligned, grad_scale is not None, found_inf is not None, bool(maximize), weight_decay != 0,
        bool(write_grad), bool(decoupled), bool(amsgrad), per_tensor,
    )  # fmt: skip
    scalars = (1 - beta1, beta2, 1 - beta2, weight_decay, 1 - lr * weight_decay, eps, one_size, one_bc2)
    _launch(znorm_adam_kernel, device, plan, stats, grad_scale, found_inf, (steps,), scalars, constants)


@functools.cache
def _adam_constants(dtype, aligned, has_scale, has_found_inf, maximize, weight_decay, write_grad, decoupled,
                    amsgrad, per_tensor) -> dict:  # fmt: skip
    constants = _common_constants(
        dtype, aligned, has_scale, has_found_inf, maximize, weight_decay, write_grad
    )
    constants.update(DECOUPLED=decoupled, AMSGRAD=amsgrad, PER_TENSOR=per_tensor)
    return constants


# Ahead-of-time compilation (no GPU needed), for CI and register reports: see triton_host.compile_for_target.

_COMMON_SIGNATURE = {"meta_ptr": "*i64", "stats_ptr": "*fp64", "scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}


def compile_sgd_for_target(
    dtype: torch.dtype,
    arch: int = 90,
    *,
    aligned: bool = True,
    has_scale: bool = True,
    has_found_inf: bool = True,
    maximize: bool = False,
    weight_decay: bool = True,
    momentum: bool = True,
    nesterov: bool = False,
    first: int = 2,
    write_grad: bool = False,
):
    """The SGD kernel compiled for a CUDA architecture; ``.asm["ptx"]`` holds its PTX."""
    from .triton_optim_kernels import znorm_sgd_kernel

    signature = dict(_COMMON_SIGNATURE)
    signature.update(
        num_items="i32", lr_bits="i64", momentum_bits="i64", one_minus_dampening_bits="i64",
        weight_decay_bits="i64",
    )  # fmt: skip
    constants = _common_constants(
        dtype, aligned, has_scale, has_found_inf, maximize, weight_decay, write_grad
    )
    constants.update(MOMENTUM=momentum, NESTEROV=nesterov, FIRST=first)
    return compile_ahead(znorm_sgd_kernel, signature, constants, arch, OPTIONS)


def compile_adam_for_target(
    dtype: torch.dtype,
    arch: int = 90,
    *,
    aligned: bool = True,
    has_scale: bool = True,
    has_found_inf: bool = True,
    maximize: bool = False,
    weight_decay: bool = True,
    decoupled: bool = False,
    amsgrad: bool = True,
    per_tensor: bool = False,
    write_grad: bool = False,
):
    """The Adam/AdamW kernel compiled for a CUDA architecture; ``.asm["ptx"]`` holds its PTX."""
    from .triton_optim_kernels import znorm_adam_kernel

    signature = dict(_COMMON_SIGNATURE)
    signature["steps_ptr"] = "*fp64"
    signature["num_items"] = "i32"
    for name in (
        "lerp_weight_bits", "beta2_bits", "one_minus_beta2_bits", "weight_decay_bits", "decay_factor_bits",
        "eps_bits", "step_size_bits", "bc2_sqrt_bits",
    ):  # fmt: skip
        signature[name] = "i64"
    constants = _common_constants(
        dtype, aligned, has_scale, has_found_inf, maximize, weight_decay, write_grad
    )
    constants.update(DECOUPLED=decoupled, AMSGRAD=amsgrad, PER_TENSOR=per_tensor)
    return compile_ahead(znorm_adam_kernel, signature, constants, arch, OPTIONS)

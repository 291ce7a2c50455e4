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

The table of work items is a plan (triton_optim_plan.py). Hyperparameters (``optim_steps.SgdArgs``,
``AdamArgs``) are kernel arguments (float64 bit patterns), so an optimizer step captured in a graph replays
with the values it was captured with, as torch's non-capturable optimizers would; Adam's per-tensor step
sizes, when they differ between tensors, travel in a small per-call table and raise NotImplementedError under
capture. The two update families (SGD; Adam and AdamW) are entries of one table, ``KERNELS``: their kernel,
pointer and scalar arguments and constexpr flags; the tiles are ``tiles.UpdateTiles``; triton_aot.py
compiles them ahead of time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..transfer import to_device
from . import optim_steps
from .optim_steps import AdamArgs, SgdArgs
from .tiles import UpdateTiles
from .triton_common import ALIGNMENT, element_size, f64_bits, on_device, stream_of, triton_dtypes
from .triton_host import serves
from .triton_launch import launcher_for
from .triton_optim_plan import Plan, keep_table, update_plan

__all__ = [
    "adam_launch",
    "adam_plan",
    "adam_step_",
    "check",
    "kernel",
    "sgd_launch",
    "sgd_plan",
    "sgd_step_",
    "steady_launch",
    "steady_plan",
    "update_plan",
]


@dataclass(frozen=True)
class UpdateKernel:
    """One family of fused updates: its kernel in triton_optim_kernels.py, the pointer arguments it takes
    after the common four, its float64 scalar arguments, and its own constexpr flags (in signature order)."""

    kernel: str
    pointers: tuple[str, ...]
    scalars: tuple[str, ...]
    flags: tuple[str, ...]


KERNELS = {
    "sgd": UpdateKernel(
        "znorm_sgd_kernel", (), ("lr", "momentum", "one_minus_dampening", "weight_decay"),
        ("MOMENTUM", "NESTEROV", "FIRST"),
    ),
    "adam": UpdateKernel(
        "znorm_adam_kernel", ("steps",),
        ("lerp_weight", "beta2", "one_minus_beta2", "weight_decay", "decay_factor", "eps", "step_size",
         "bc2_sqrt"),
        ("DECOUPLED", "AMSGRAD", "PER_TENSOR"),
    ),
}  # fmt: skip


def _checked_group(lists: list[list], names: list[str]) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of lists the caller validated with ``check`` (lengths still compared: cheap)."""
    n = optim_steps.check_lengths(lists, names)
    return (lists[0][0].device, lists[0][0].dtype) if n else (None, None)


def check(lists: list[list], names: list[str], stats: Tensor) -> tuple[torch.device, torch.dtype]:
    """Validate one group: ValueError for malformed calls, NotImplementedError for what the kernel does not
    serve (a device or dtype Triton does not serve, and what ``optim_steps.check_tensors`` refuses).
    ``lists[0]`` are the params; entries of the other lists may be None only where unused. Returns the
    group's (device, dtype), (None, None) for empty lists."""
    n = optim_steps.check_lengths(lists, names)
    if n == 0:
        return None, None
    params = lists[0]
    device, dtype = params[0].device, params[0].dtype
    if dtype not in triton_dtypes():
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


def _device_scalar(x: Tensor | None, device: torch.device, name: str, dtype=None) -> Tensor | None:
    if x is None:
        return None
    if not isinstance(x, Tensor) or x.numel() != 1:
        raise ValueError(f"{name} must be a 1-element tensor")
    return to_device(x, device, dtype)


@functools.cache
def constants(kind: str, dtype, tiles: UpdateTiles, aligned, has_scale, has_found_inf, maximize, weight_decay,
              write_grad, flags: tuple) -> dict:  # fmt: skip
    """The constexprs of one specialization (``flags``: the kind's own, in KERNELS' order). Cached for good:
    a dict's id then identifies the specialization (the direct launcher's key)."""
    tl_dtype, tl_acc = triton_dtypes()[dtype]
    return {
        "DTYPE": tl_dtype, "ACC": tl_acc, "BLOCK": tiles.block, "VEC": ALIGNMENT // element_size(dtype),
        "ALIGNED": aligned, "HAS_SCALE": has_scale, "HAS_FOUND_INF": has_found_inf, "MAXIMIZE": maximize,
        "WEIGHT_DECAY": weight_decay, "WRITE_GRAD": write_grad, **dict(zip(KERNELS[kind].flags, flags)),
    }  # fmt: skip


@functools.cache
def compile_options(tiles: UpdateTiles) -> dict:
    # As triton_host: no FMA contraction, so every operation rounds as under the interpreter and in torch.
    return {"num_warps": tiles.num_warps, "enable_fp_fusion": False}


def kernel(kind: str):
    from . import triton_optim_kernels

    return getattr(triton_optim_kernels, KERNELS[kind].kernel)


def _launch(kind: str, plan: Plan, device, dtype, stats, grad_scale, found_inf, pointers: tuple,
            scalars: tuple, maximize, weight_decay, write_grad, flags: tuple) -> None:  # fmt: skip
    if plan.num_items == 0:
        return
    consts = constants(
        kind, dtype, plan.tiles, plan.aligned, grad_scale is not None, found_inf is not None, bool(maximize),
        weight_decay != 0, bool(write_grad), flags,
    )  # fmt: skip

    def go():
        keep_table(plan, device)
        scale = _device_scalar(grad_scale, device, "grad_scale", torch.float32)
        inf = _device_scalar(found_inf, device, "found_inf")
        args = (
            plan.meta, stats, stats if scale is None else scale, stats if inf is None else inf, *pointers,
            plan.num_items, *map(f64_bits, scalars),
        )  # fmt: skip
        # Triton's binding of ~20 arguments per step is host time the fused step exists to save.
        key = (device.index, id(consts))
        launcher_for(kernel(kind))((plan.num_items,), stream_of(device), args, key, **consts,
                                    **compile_options(plan.tiles))  # fmt: skip

    on_device(device, go)


# --- SGD ---


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    stats: Tensor,
    args: SgdArgs,
    *,
    first: list[bool],
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    write_grad: bool = False,
    checked: bool = False,
    tiles: UpdateTiles | None = None,
) -> None:
    """torch.optim.SGD's step on z-scores of the gradients (one (device, dtype) group, one launch), with the
    hyperparameters ``args`` (``optim_steps.SgdArgs``). ``checked=True``: the caller has validated these very
    lists with ``check`` (skips it).

    ``momentum_buffers[i]``: the parameter's momentum buffer (unused, may be None, when momentum is 0); where
    ``first[i]`` is True it is a buffer the caller just allocated, which becomes d as torch's first step
    makes it (its old contents are not read)."""
    lists = [params, grads] + ([momentum_buffers] if args.momentum != 0 else [])
    names = optim_steps.list_names("sgd", len(lists))
    if len(first) != len(params):
        raise ValueError(f"first has {len(first)} entries for {len(params)} params")
    device, dtype = _checked_group(lists, names) if checked else check(lists, names, stats)
    if device is None:
        return
    plan, mode = sgd_plan(lists, first, device, dtype, tiles)
    sgd_launch(plan, mode, device, dtype, stats, args, grad_scale=grad_scale, found_inf=found_inf,
               write_grad=write_grad)  # fmt: skip


def sgd_plan(
    lists: list[list[Tensor]], first, device, dtype, tiles: UpdateTiles | None = None
) -> tuple[Plan, int]:
    """(plan, FIRST mode) of validated SGD lists ([params, grads] or [params, grads, momentum_buffers])."""
    n = len(lists[0])
    firsts = tuple(map(bool, first)) if len(lists) == 3 else (False,) * n
    mode = 1 if all(firsts) else 0 if not any(firsts) else 2
    return update_plan(lists, firsts, firsts if mode == 2 else mode, device, dtype, tiles), mode


def sgd_launch(plan: Plan, mode: int, device, dtype, stats: Tensor, args: SgdArgs, *,
               grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
               write_grad: bool = False) -> None:  # fmt: skip
    """The SGD update launch of a plan from ``sgd_plan``."""
    scalars = (args.lr, args.momentum, 1 - args.dampening, args.weight_decay)
    _launch(
        "sgd", plan, device, dtype, stats, grad_scale, found_inf, (), scalars, args.maximize,
        args.weight_decay, write_grad, (args.momentum != 0, args.nesterov, mode),
    )  # fmt: skip


# --- Adam and AdamW ---


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor | None],
    stats: Tensor,
    args: AdamArgs,
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    write_grad: bool = False,
    checked: bool = False,
    tiles: UpdateTiles | None = None,
) -> None:
    """torch.optim.Adam's (``args.decoupled`` False) or AdamW's (True) non-capturable step on z-scores of the
    gradients (one (device, dtype) group, one launch), with the hyperparameters ``args``
    (``optim_steps.AdamArgs``; here ``step_size`` and ``bias_correction2_sqrt`` are lists, one entry per
    tensor). ``max_exp_avg_sqs`` is read only with amsgrad (entries may be None otherwise). ``checked``: as
    for ``sgd_step_``."""
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if args.amsgrad else [])
    names = optim_steps.list_names("adam", len(lists))
    n = len(params)
    step_size, bias_correction2_sqrt = args.step_size, args.bias_correction2_sqrt
    if len(step_size) != n or len(bias_correction2_sqrt) != n:
        raise ValueError("step_size and bias_correction2_sqrt need one entry per param")
    device, dtype = _checked_group(lists, names) if checked else check(lists, names, stats)
    if device is None:
        return
    plan = adam_plan(lists, device, dtype, tiles)
    live = [i for i in range(n) if plan.numels[i]]
    sizes = {float(step_size[i]) for i in live}
    bc2s = {float(bias_correction2_sqrt[i]) for i in live}
    if len(sizes) > 1 or len(bc2s) > 1:
        step_size = list(map(float, step_size))
        bias_correction2_sqrt = list(map(float, bias_correction2_sqrt))
    else:
        step_size, bias_correction2_sqrt = (sizes.pop(), bc2s.pop()) if live else (0.0, 0.0)
    args = replace(args, step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt)
    adam_launch(plan, device, dtype, stats, args, grad_scale=grad_scale, found_inf=found_inf,
                write_grad=write_grad)  # fmt: skip


def adam_plan(lists: list[list[Tensor]], device, dtype, tiles: UpdateTiles | None = None) -> Plan:
    """The plan of validated Adam lists ([params, grads, exp_avgs, exp_avg_sqs] and max_exp_avg_sqs with
    amsgrad)."""
    return update_plan(lists, (False,) * len(lists[0]), 0, device, dtype, tiles)


def adam_launch(plan: Plan, device, dtype, stats: Tensor, args: AdamArgs, *, grad_scale: Tensor | None = None,
                found_inf: Tensor | None = None, write_grad: bool = False) -> None:  # fmt: skip
    """The Adam/AdamW update launch of a plan from ``adam_plan``: ``args.step_size`` and
    ``args.bias_correction2_sqrt`` one float for every tensor, or lists of floats (one per tensor: a per-call
    table, not capturable)."""
    if plan.num_items == 0:
        return
    per_tensor = isinstance(args.step_size, list)
    if per_tensor:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise NotImplementedError("per-tensor Adam step sizes cannot be captured in a CUDA graph")
        host = torch.tensor(list(zip(args.step_size, args.bias_correction2_sqrt)), dtype=torch.float64)
        steps = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        one_size = one_bc2 = 0.0
    else:
        steps = stats  # never read
        one_size, one_bc2 = args.step_size, args.bias_correction2_sqrt
    beta1, beta2, lr, weight_decay = args.beta1, args.beta2, args.lr, args.weight_decay
    scalars = (1 - beta1, beta2, 1 - beta2, weight_decay, 1 - lr * weight_decay, args.eps, one_size, one_bc2)
    _launch(
        "adam", plan, device, dtype, stats, grad_scale, found_inf, (steps,), scalars, args.maximize,
        weight_decay, write_grad, (args.decoupled, args.amsgrad, per_tensor),
    )  # fmt: skip


# --- by family (the fused optimizer step's table, optim/updates.py, names the family) ---


def steady_plan(lists: list[list[Tensor]], device, dtype) -> Plan:
    """The plan of a step that creates no state (every SGD momentum buffer exists): any family."""
    return update_plan(lists, (False,) * len(lists[0]), 0, device, dtype)


def _sgd_steady_launch(plan: Plan, device, dtype, stats: Tensor, args: SgdArgs, **kwargs) -> None:
    sgd_launch(plan, 0, device, dtype, stats, args, **kwargs)


STEPS = {"sgd": sgd_step_, "adam": adam_step_}
STEADY_LAUNCHES = {"sgd": _sgd_steady_launch, "adam": adam_launch}


def steady_launch(family: str, plan: Plan, device, dtype, stats: Tensor, args: SgdArgs | AdamArgs,
                  **kwargs) -> None:  # fmt: skip
    """The update launch of a ``steady_plan``, with the family's Args."""
    STEADY_LAUNCHES[family](plan, device, dtype, stats, args, **kwargs)

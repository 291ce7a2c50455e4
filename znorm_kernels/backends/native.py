"""The "cpu" and "cuda" backends: the C++/CUDA extension ``znorm_kernels._C`` (sources in csrc/).

Importing ``znorm_kernels._C`` registers the op ``torch.ops.znorm_kernels_C.znorm_`` (schema
``znorm_(Tensor(a!)[] tensors, float eps, float correction, Tensor? grad_scale, Tensor(b!)? stats=None)
-> ()``) with a CPU kernel and, when built with CUDA, a CUDA kernel; this module adds the op's fake (meta)
implementation, so torch.compile sees an opaque in-place op. One call of the op normalizes a whole list of
tensors.

``stats``, when given, is a contiguous float64 tensor of shape ``[len(tensors), 2]`` on the tensors' device,
written in place: row i receives tensor i's mean and standard deviation as the normalization used them (of
the values as given, so of the scaled ones under ``grad_scale``; the standard deviation with ``correction``,
before ``eps``; 0 for a constant tensor; non-finite for a tensor holding NaN or Inf). The kernels compute
them anyway, so they cost no extra pass over the data. Rows of tensors of fewer than 2 elements (left
unchanged) receive NaN. A bad ``stats`` tensor raises before anything is modified.

The CUDA kernel caches the device table of its tensors' addresses and sizes (16 lists, least recently used
out), so an optimizer's step after step allocates and copies nothing but two small workspaces; tables used
inside CUDA-graph capture are kept for the life of the process. ``table_cache_stats()`` reads its counters.

The fused optimizer steps (CPU kernels, and CUDA kernels in a CUDA build): ``sgd_step_`` and ``adam_step_``
wrap the ops ``znorm_kernels_C::znorm_sgd_step_`` and ``znorm_adam_step_``. One call per (dtype) group
computes, per tensor, the statistics as ``znorm_`` does on that device (bitwise the same mean and multiplier,
so z is bitwise what the "cpu" or "cuda" backend writes into the gradient), then makes ONE pass over the
gradient, the parameter and its states applying torch.optim.SGD's or Adam/AdamW's update to z, with the
formulas (operation by operation, in float32, float64 for float64 tensors, no FMA, correctly rounded division
and square root, each stored value rounded once) of the fused Triton step (triton_optim.py). On the CPU
parallel over tensors and chunks; on CUDA three launches per dtype (znorm_'s statistics and finalize kernels
over a cached table, then one update kernel), no host synchronization, on the current stream. Both
deterministic. Under CUDA-graph capture the host values of the call (learning rate, Adam's per-tensor step
sizes) are captured: a replay repeats the captured step's values, as any captured kernel argument.

This module always imports; when the extension is missing, ``unavailable`` says why and how to build it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from . import optim_steps

__all__ = [
    "ADAM_OP_NAME",
    "BUILD_HINT",
    "OP_NAME",
    "SGD_OP_NAME",
    "TABLE_CACHE_FIELDS",
    "adam_step_",
    "check_step",
    "group_fn",
    "has_cuda_kernel",
    "has_optim_kernels",
    "load",
    "serves",
    "sgd_step_",
    "table_cache_stats",
    "unavailable",
]

OP_NAME = "znorm_kernels_C::znorm_"
SGD_OP_NAME = "znorm_kernels_C::znorm_sgd_step_"
ADAM_OP_NAME = "znorm_kernels_C::znorm_adam_step_"
BUILD_HINT = (
    "build it with `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` in the repository "
    "(set ZNORM_BUILD_CUDA=1 to insist on the CUDA kernel, ZNORM_CUDA_ARCHS to pick the GPU architectures)"
)


def _import_extension() -> ModuleType:
    # Indirection so tests can simulate a missing build.
    return importlib.import_module("znorm_kernels._C")


@functools.cache
def _loaded() -> tuple[ModuleType | None, str | None]:
    """(the extension module, None) or (None, why it cannot be loaded)."""
    try:
        module = _import_extension()
    except ImportError as err:
        return None, f"the native extension znorm_kernels._C is not built ({err}); {BUILD_HINT}"
    _register_fake()
    return module, None


def load() -> ModuleType:
    """The extension module; raises RuntimeError with build instructions when it is missing."""
    module, why = _loaded()
    if module is None:
        raise RuntimeError(why)
    return module


def _register_fake() -> None:
    if getattr(_register_fake, "done", False):
        return

    @torch.library.register_fake(OP_NAME)
    def _(
        tensors: list[Tensor],
        eps: float,
        correction: float,
        grad_scale: Tensor | None,
        stats: Tensor | None = None,
    ) -> None:
        return None  # in place (the tensors, and stats when given): nothing to allocate, shapes unchanged

    if _has_cpu_kernel(SGD_OP_NAME):

        @torch.library.register_fake(SGD_OP_NAME)
        def _(params, grads, momentum_buffers, treated, first, *args, stats=None) -> None:
            return None  # in place

    if _has_cpu_kernel(ADAM_OP_NAME):

        @torch.library.register_fake(ADAM_OP_NAME)
        def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, treated, *args, stats=None) -> None:
            return None  # in place

    _register_fake.done = True


def _has_cpu_kernel(name: str) -> bool:
    return _has_kernel(name, "CPU")


def _has_kernel(name: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    except RuntimeError:  # an extension built before the op existed
        return False


def has_optim_kernels(device: str = "cpu") -> bool:
    """Whether the built extension holds the kernels of the fused optimizer steps for ``device`` ("cpu" or
    "cuda", or a torch.device of that type)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return (
        key is not None
        and _loaded()[0] is not None
        and _has_kernel(SGD_OP_NAME, key)
        and _has_kernel(ADAM_OP_NAME, key)
    )


def has_cuda_kernel() -> bool:
    """Whether the built extension holds the CUDA kernel (it was compiled with CUDA)."""
    return _loaded()[0] is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")


# The counters of the CUDA kernel's table cache, in the order torch.ops.znorm_kernels_C.table_cache_stats()
# returns them (csrc/znorm_cuda.cu): cache hits, tables built outside capture, evictions, tables cached now,
# tables built during CUDA-graph capture, tables kept for captured graphs (never freed), and streams recorded
# on cached tables besides the one each was built on.
TABLE_CACHE_FIELDS = (
    "hits",
    "builds",
    "evictions",
    "entries",
    "graph_builds",
    "graph_tables",
    "stream_records",
)


def table_cache_stats() -> dict[str, int] | None:
    """The CUDA kernel's table cache counters (TABLE_CACHE_FIELDS), or None without the CUDA kernel. For tests
    and debugging; reading them touches no device."""
    if not has_cuda_kernel():
        return None
    return dict(zip(TABLE_CACHE_FIELDS, torch.ops.znorm_kernels_C.table_cache_stats(), strict=True))


def unavailable(name: str) -> str | None:
    """None when backend ``name`` ("cpu" or "cuda") can run in this process, else the reason."""
    _, why = _loaded()
    if why is not None:
        return why
    if name == "cuda":
        if not has_cuda_kernel():
            return (
                "the native extension was built without CUDA (torch without CUDA, nvcc not found, or "
                f"ZNORM_BUILD_CUDA=0); {BUILD_HINT}"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


def serves(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` takes tensors on ``device``, else the reason."""
    if device.type != name:
        return f"the {name!r} backend only takes {'CPU' if name == 'cpu' else 'CUDA'} tensors"
    return None


def _run(
    tensors: list[Tensor],
    eps: float,
    correction: float,
    grad_scale: Tensor | None,
    *,
    stats: Tensor | None = None,
) -> None:
    if grad_scale is not None:
        # The op dispatches on every tensor argument: keep the scale on the tensors' device (no sync on CUDA,
        # and on the CPU a scale already there costs nothing).
        grad_scale = grad_scale.detach().to(tensors[0].device, non_blocking=True)
    with torch.no_grad():  # gradients and leaves that require grad are normalized in place like the reference
        torch.ops.znorm_kernels_C.znorm_(tensors, eps, correction, grad_scale, stats)


def group_fn(name: str) -> Callable[..., None]:
    """The function the dispatcher calls with a validated list of same-device, same-dtype tensors:
    ``fn(tensors, eps, correction, grad_scale, *, stats=None)``. ``stats``, when given, is a contiguous
    float64 ``[len(tensors), 2]`` tensor on the tensors' device that receives each tensor's (mean, std), as
    the op's ``stats`` argument does (see the module's docstring); it is not divided by ``grad_scale``."""
    load()
    return _run


# --- the fused optimizer steps (CPU and CUDA) ---


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
    *,
    treated: list[bool],
    first: list[bool],
    znorm_eps: float,
    correction: float,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    write_grad: bool = False,
    stats_out: Tensor | None = None,
    checked: bool = False,
) -> None:
    """torch.optim.SGD's step on the z-scores of the gradients, for CPU or CUDA tensors, in one op call (the
    arguments of ``triton_optim.sgd_step_``, with ``treated``, ``znorm_eps`` and ``correction`` for its stats
    tensor).

    ``treated[i]``: whether tensor i gets ZNorm (else, and for tensors of fewer than 2 elements, z = g).
    ``momentum_buffers[i]`` is unused (may be None) when momentum is 0; where ``first[i]`` is True it is a
    buffer the caller just allocated, which becomes d as torch's first step makes it. ``write_grad`` stores z
    into the gradient. ``stats_out``: an optional float64 ``[len(params), 2]`` tensor on the tensors' device
    (contiguous) that receives each
    treated tensor's (mean, std), as ``znorm_``'s ``stats`` (NaN rows elsewhere). ``checked=True``: the
    caller has validated these very lists with ``check_step`` (skips it; the op checks them again in C++
    before writing anything, raising RuntimeError)."""
    lr, momentum, dampening, weight_decay = optim_steps.scalars(
        "native fused step", lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    use_momentum = momentum != 0
    lists = [params, grads] + ([momentum_buffers] if use_momentum else [])
    if not checked:
        check_step(lists, ["params", "grads", "momentum_buffers"][: len(lists)])
    n = len(params)
    treated, first = _flags("treated", treated, n), _flags("first", first, n)
    if n == 0:
        return
    with torch.no_grad():
        torch.ops.znorm_kernels_C.znorm_sgd_step_(
            params, grads, momentum_buffers if use_momentum else [], treated, first, float(znorm_eps),
            float(correction), lr, momentum, dampening, bool(nesterov), weight_decay, bool(maximize),
            bool(write_grad), stats_out,
        )  # fmt: skip


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor | None],
    *,
    treated: list[bool],
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
    znorm_eps: float,
    correction: float,
    write_grad: bool = False,
    stats_out: Tensor | None = None,
    checked: bool = False,
) -> None:
    """torch.optim.Adam's (``decoupled=False``) or AdamW's (``decoupled=True``) non-capturable step on the
    z-scores of the gradients, for CPU or CUDA tensors, in one op call (the arguments of
    ``triton_optim.adam_step_``, with ``treated``, ``znorm_eps`` and ``correction`` for its stats tensor;
    ``eps`` is Adam's). The caller
    has incremented the step counters and passes, per tensor, ``step_size = lr / (1 - beta1**step)`` and
    ``bias_correction2_sqrt = (1 - beta2**step) ** 0.5``. ``max_exp_avg_sqs`` is read only with amsgrad.
    ``treated``, ``write_grad``, ``stats_out`` and ``checked`` as for ``sgd_step_``."""
    beta1, beta2, lr, weight_decay, eps = optim_steps.scalars(
        "native fused step", beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps
    )
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    if not checked:
        check_step(lists, ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"][: len(lists)])
    n = len(params)
    treated = _flags("treated", treated, n)
    if len(step_size) != n or len(bias_correction2_sqrt) != n:
        raise ValueError("step_size and bias_correction2_sqrt need one entry per param")
    if n == 0:
        return
    with torch.no_grad():
        torch.ops.znorm_kernels_C.znorm_adam_step_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], treated,
            [float(x) for x in step_size], [float(x) for x in bias_correction2_sqrt], float(znorm_eps),
            float(correction), bool(amsgrad), beta1, beta2, lr, weight_decay, eps, bool(maximize),
            bool(decoupled), bool(write_grad), stats_out,
        )  # fmt: skip

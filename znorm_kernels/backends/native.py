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
The extension's fused optimizer steps are wrapped by ``native_optim``.

This module always imports; when the extension is missing, ``unavailable`` says why and how to build it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from ..memory import is_dense
from ..tensor_types import PLAIN_TYPES
from ..transfer import to_device

__all__ = [
    "ADAM_OP_NAME",
    "BUILD_HINT",
    "OP_NAME",
    "SGD_OP_NAME",
    "TABLE_CACHE_FIELDS",
    "group_fn",
    "has_cuda_kernel",
    "has_kernel",
    "has_optim_kernels",
    "load",
    "loaded",
    "serves",
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
def loaded() -> tuple[ModuleType | None, str | None]:
    """(the extension module, None) or (None, why it cannot be loaded)."""
    try:
        module = _import_extension()
    except ImportError as err:
        return None, f"the native extension znorm_kernels._C is not built ({err}); {BUILD_HINT}"
    _register_fake()
    return module, None


def load() -> ModuleType:
    """The extension module; raises RuntimeError with build instructions when it is missing."""
    module, why = loaded()
    if module is None:
        raise RuntimeError(why)
    return module


def _register_fake() -> None:
    if getattr(_register_fake, "done", False):
        return

    @torch.library.register_fake(OP_NAME)
    def _(tensors, eps, correction, grad_scale, stats=None) -> None:
        return None  # in place (the tensors, and stats when given): nothing to allocate, shapes unchanged

    if has_kernel(SGD_OP_NAME, "CPU"):

        @torch.library.register_fake(SGD_OP_NAME)
        def _(params, grads, momentum_buffers, treated, first, *args, stats=None) -> None:
            return None  # in place

    if has_kernel(ADAM_OP_NAME, "CPU"):

        @torch.library.register_fake(ADAM_OP_NAME)
        def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, treated, *args, stats=None) -> None:
            return None  # in place

    _register_fake.done = True


def has_kernel(name: str, key: str) -> bool:
    """Whether op ``name`` has a kernel for dispatch key ``key`` ("CPU", "CUDA") in this build."""
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
        and loaded()[0] is not None
        and has_kernel(SGD_OP_NAME, key)
        and has_kernel(ADAM_OP_NAME, key)
    )


def has_cuda_kernel() -> bool:
    """Whether the built extension holds the CUDA kernel (it was compiled with CUDA)."""
    return loaded()[0] is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")


# The counters of the CUDA kernel's table cache, in the order torch.ops.znorm_kernels_C.table_cache_stats()
# returns them (csrc/cuda_table_cache.cpp): cache hits, tables built outside capture, evictions, tables
# cached now, tables built during CUDA-graph capture, tables kept for captured graphs (never freed), and
# streams recorded on cached tables besides the one each was built on.
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
    _, why = loaded()
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
        grad_scale = to_device(grad_scale.detach(), tensors[0].device)
    with torch.no_grad():  # gradients and leaves that require grad are normalized in place like the reference
        try:
            torch.ops.znorm_kernels_C.znorm_(tensors, eps, correction, grad_scale, stats)
        except RuntimeError as err:
            # torch's fallback for lazily negated views (``_neg_view``) refuses them in a mutable list, before
            # anything runs: they are normalized as materialized copies, written back through the view.
            negated = [t.is_neg() for t in tensors]
            if "negation" not in str(err) or not any(negated):
                raise
            plain = [t.resolve_neg() if n else t for t, n in zip(tensors, negated)]
            torch.ops.znorm_kernels_C.znorm_(plain, eps, correction, grad_scale, stats)
            for t, p, n in zip(tensors, plain, negated):
                if n:
                    t.copy_(p)


# The hook's native steady path (znorm_kernels.grad_watch) calls the op itself on the tensors of groups whose
# function is this one: exactly what _run does (under no_grad, the scale moved to the tensors' device).
_run.native_op = OP_NAME


def bind(tensors: list[Tensor]) -> Callable[..., None]:
    """A group function tied to these tensors' addresses, for callers that know the next lists hold tensors at
    the same addresses with the same sizes, layouts and dtypes (the hook and the dispatcher's check cache
    do): for a list of dense CPU tensors a ``torch.classes.znorm_kernels_C.CpuList``, which holds their
    addresses (not the tensors) and runs the CPU kernel there with no tensor passed (nothing boxed or
    checked per tensor; the same bits as the op). Anything else, and calls with ``stats``, take ``_run``."""
    if not tensors or tensors[0].device.type != "cpu" or not all(map(is_dense, tensors)):
        return _run
    if not PLAIN_TYPES.issuperset(map(type, tensors)):  # a subclass's __torch_function__ sees every op call
        return _run
    try:
        handle = torch.classes.znorm_kernels_C.CpuList(tensors)
    except (RuntimeError, AttributeError):  # an extension built before CpuList, or a list the op refuses
        return _run

    def run(tensors, eps, correction, grad_scale=None, *, stats=None):  # the group function's signature
        if stats is not None or _modes():
            return _run(tensors, eps, correction, grad_scale, stats=stats)
        handle.run(eps, correction, grad_scale)

    run.rebind = lambda others, addrs=None: bind(others)
    return run


_run.bind = bind


def _modes() -> bool:
    """Whether a TorchDispatchMode or TorchFunctionMode is active (FakeTensorMode, make_fx, a logging mode):
    they must see the op, which a bound list would not call."""
    return bool(torch._C._len_torch_dispatch_stack()) or torch._C._is_torch_function_mode_enabled()


def group_fn(name: str) -> Callable[..., None]:
    """The function the dispatcher calls with a validated list of same-device, same-dtype tensors:
    ``fn(tensors, eps, correction, grad_scale, *, stats=None)``. ``stats``, when given, is a contiguous
    float64 ``[len(tensors), 2]`` tensor on the tensors' device that receives each tensor's (mean, std), as
    the op's ``stats`` argument does (see the module's docstring); it is not divided by ``grad_scale``."""
    load()
    return _run

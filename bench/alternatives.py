"""What ZNorm is measured against, and our own backends, as interchangeable "methods".

A ``Method`` normalizes one fixed list of gradient tensors in place when called. The alternatives are what a
user would write without this library:

- ``eager``: the loop ``s, m = torch.std_mean(g, correction=0); g.sub_(m).div_(s + eps)`` per tensor;
- ``compiled``: ``torch.compile`` of that loop (default mode, ``dynamic=False``), compiled once per
  (list, dtype, device) and cached for the process;
- ``eager+graph`` and ``compiled+graph`` (CUDA only): each captured once in a CUDA graph and replayed;

and ours: one method per backend of ``znorm_kernels`` that is available and can serve the device (triton is
never timed on CPU tensors: under TRITON_INTERPRET=1 that is the interpreter, whose timings mean nothing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import znorm_kernels
from znorm_kernels.registry import resolve_backend

__all__ = [
    "EPS",
    "Method",
    "compiled_loop",
    "eager_loop",
    "graphed",
    "loop_pre_hook",
    "our_backends",
    "our_method",
]

EPS = 1e-10
ALTERNATIVES = ("eager", "compiled", "eager+graph", "compiled+graph")


def eager_loop(grads: list[Tensor], eps: float = EPS) -> None:
    """The loop users write: per tensor, population std and mean, then subtract and divide in place."""
    for g in grads:
        s, m = torch.std_mean(g, correction=0)
        g.sub_(m).div_(s + eps)


def loop_pre_hook(fn: Callable[[list[Tensor]], None] = eager_loop):
    """The step pre-hook a user writes around a loop ``fn``: ``fn`` on every gradient of the optimizer."""

    def pre_hook(opt: torch.optim.Optimizer, args, kwargs) -> None:
        with torch.no_grad():
            fn([p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None])

    return pre_hook


_COMPILED: dict[tuple, Callable[[list[Tensor]], None]] = {}


def compiled_loop(key: tuple) -> Callable[[list[Tensor]], None]:
    """``torch.compile`` of the eager loop, one compiled function per ``key`` (e.g. (list, dtype, device)),
    cached for the life of the process. Compilation happens on the first call."""
    if key not in _COMPILED:
        import torch._dynamo

        # One compiled graph per list/dtype: raise the recompile limit so a run over many lists keeps all.
        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, attr):
                setattr(torch._dynamo.config, attr, max(64, getattr(torch._dynamo.config, attr)))
        _COMPILED[key] = torch.compile(eager_loop, dynamic=False)
    return _COMPILED[key]


def graphed(fn: Callable[[list[Tensor]], None], grads: list[Tensor]) -> Callable[[], None]:
    """Capture ``fn(grads)`` once in a CUDA graph (after warm-up on a side stream); returns its replay.
    Runs under no_grad, as every other call of ``fn`` does (a compiled fn would recompile on a change)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            fn(grads)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        fn(grads)
    torch.cuda.synchronize()
    return graph.replay


@dataclass
class Method:
    """One way of normalizing the fixed list ``grads``: ``run()`` does it once.

    ``ours`` marks our backends; ``hook(optimizer)`` installs the method as a step pre-hook (ours through
    ``znorm_kernels.register``, the alternatives as the pre-hook a user would write) and returns its handle.
    """

    name: str
    ours: bool
    run: Callable[[], None]
    hook: Callable[[torch.optim.Optimizer], object]
    note: str = ""


def our_backends(device: torch.device | str) -> dict[str, str]:
    """Every backend of ours, mapped to None if it will be timed on ``device`` or to why not."""
    device = torch.device(device)
    out: dict[str, str] = {}
    available = znorm_kernels.available_backends()
    for name in ("triton", "cuda", "cpu", "reference"):
        if name not in available:
            out[name] = "not available in this process"
            continue
        if name == "triton" and device.type == "cpu":
            interp = os.environ.get("TRITON_INTERPRET") == "1"
            out[name] = "not timed on CPU tensors" + (" (TRITON_INTERPRET=1: interpreter)" if interp else "")
            continue
        try:
            resolve_backend(name, device)
        except RuntimeError as err:
            out[name] = str(err)
            continue
        out[name] = ""
    return out


def our_method(backend: str, grads: list[Tensor]) -> Method:
    """Our backend ``backend`` on ``grads`` (through the public ``znorm_kernels.znorm_``)."""

    def run() -> None:
        znorm_kernels.znorm_(grads, eps=EPS, backend=backend)

    return Method(backend, True, run, lambda opt: znorm_kernels.register(opt, eps=EPS, backend=backend))


def alternative_method(name: str, grads: list[Tensor], key: tuple) -> Method:
    """The alternative ``name`` (one of ALTERNATIVES) on ``grads``; graph capture and compilation happen here
    (so the first call of a compiled method is not its compilation)."""
    if name not in ALTERNATIVES:
        raise ValueError(f"unknown alternative {name!r}")
    fn: Callable[[list[Tensor]], None] = eager_loop
    if name.startswith("compiled"):
        fn = compiled_loop(key)
        with torch.no_grad():
            fn(grads)  # compile now
    if name.endswith("+graph"):
        run = graphed(fn, grads)

        def pre_hook(opt, args, kwargs) -> None:
            run()  # the captured tensors are the optimizer's .grad tensors themselves
    else:

        def run() -> None:
            with torch.no_grad():
                fn(grads)

        pre_hook = loop_pre_hook(fn)

    return Method(name, False, run, lambda opt: opt.register_step_pre_hook(pre_hook))

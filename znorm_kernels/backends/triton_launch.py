"""Launching a Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` makes Triton bind every argument, derive its specialization (a tensor's
dtype and 16-byte alignment, an integer's width and value class), build a cache key and look the compiled
kernel up, on every call: most of a hook call's host time on a GPU host (bench/log/2026-11-27-h100-run1.md).
``DirectLauncher`` lets the first call of each specialization go through Triton (which compiles the kernel),
keeps the ``CompiledKernel`` it returns, and launches it directly through its own launcher
(``compiled[grid](*all_args, stream=...)``, the call Triton's ``run`` ends with) while the specialization
stays the same.

The key is at least as fine as Triton's own specialization of the runtime arguments, so a kept kernel is only
reused where Triton would pick the same one: per tensor its dtype and whether its address is 16-byte aligned;
per integer whether it fits 32 bits, needs unsigned 64, equals 1 or is divisible by 16 (the value classes
Triton specializes on where ``do_not_specialize`` does not drop them); per other value its type. Constexprs
and compile options are the caller's part of the key. Where Triton would do more per launch (launch or
pre-run hooks, debug or instrumentation mode) every launch goes through Triton.
``ZNORM_TRITON_DIRECT_LAUNCH=0`` turns it off, and so does any error of the direct call, once, with a
warning. Not seen by a kept kernel: a changed global that the kernel reads as a constant (Triton's run()
would raise).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Hashable, Sequence

import torch

__all__ = ["DirectLauncher", "launcher_for", "spec_key"]

_enabled = os.environ.get("ZNORM_TRITON_DIRECT_LAUNCH", "1") != "0"


def _plain(fn) -> bool:
    """Whether Triton's run() would do nothing here beyond binding, looking up and launching: no launch
    hooks (a profiler's), no pre-run hooks, no debug or instrumentation mode. Otherwise every launch goes
    through Triton, which honours them (and may compile another variant for them)."""
    try:
        from triton import knobs

        runtime = knobs.runtime
        for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
            if hook is not None and getattr(hook, "calls", True):  # an empty HookChain does nothing
                return False
        if runtime.debug or knobs.compilation.instrumentation_mode:
            return False
    except (ImportError, AttributeError):  # a Triton without these knobs: nothing known, nothing skipped
        return False
    return not getattr(fn, "pre_run_hooks", None)


def spec_key(args: Sequence[object]) -> tuple:
    """What Triton specializes a launch on, for the runtime (non-constexpr) arguments ``args``."""
    out: list[object] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):
            out.append(("bool", a))
        elif isinstance(a, int):
            out.append(("int", -(2**31) <= a < 2**31, a >= 2**63, a == 1, a % 16 == 0))
        else:
            out.append(type(a))
    return tuple(out)


@functools.cache
def launcher_for(fn) -> DirectLauncher:
    """The one DirectLauncher of a kernel function, so that every caller shares its kept kernels."""
    return DirectLauncher(fn)


class DirectLauncher:
    """Launches ``fn`` (a ``triton.jit`` function) with runtime arguments ``args`` (its leading parameters,
    in order) and keyword constexprs and options; see the module docstring."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.kept: dict[tuple, tuple[object, tuple]] = {}

    def __call__(self, grid: tuple[int, ...], stream: int, args: Sequence[object], key: Hashable, **kwargs):
        """Launch on the current device and ``stream`` (a raw CUDA stream handle); ``key`` must identify the
        constexprs, options and device. Returns Triton's ``CompiledKernel``."""
        if not self.enabled():
            return self.fn[grid](*args, **kwargs)
        full_key = (key, spec_key(args))
        kept = self.kept.get(full_key)
        if kept is None:
            compiled = self.fn[grid](*args, **kwargs)
            if compiled is None:  # e.g. under TRITON_INTERPRET=1: nothing to keep
                return None
            # The constexprs follow the runtime arguments in the kernel's signature: Triton's launcher takes
            # every parameter in order (it skips the constexprs itself).
            names = self.fn.arg_names[len(args) :]
            if all(n in kwargs for n in names):
                self.kept[full_key] = (compiled, tuple(kwargs[n] for n in names))
            return compiled
        if self.direct(kept, grid, stream, args):
            return kept[0]
        return self.fn[grid](*args, **kwargs)

    def kept_for(self, args: Sequence[object], key: Hashable) -> tuple[object, tuple] | None:
        """The kept (compiled kernel, constexprs) for ``key`` and the specialization of ``args``, or None
        (none kept yet, or every launch must go through Triton now)."""
        if not self.enabled():
            return None
        return self.kept.get((key, spec_key(args)))

    def direct(self, kept: tuple[object, tuple], grid: tuple[int, ...], stream: int, args: Sequence[object]):
        """Launch ``kept`` (from ``kept_for`` with these arguments' specialization) directly. False where that
        failed before launching: direct launches are then off for good, and the caller launches through
        Triton. Callers that keep ``kept`` check ``kept_for`` (or ``enabled``) again before each launch."""
        global _enabled
        compiled, constexprs = kept
        try:
            compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *constexprs, stream=stream)
        except (TypeError, AttributeError, ValueError) as err:
            # A Triton whose CompiledKernel is called differently. With no launch hooks (_plain) nothing runs
            # after the launch, so the error came before it: launching through Triton does it once.
            _enabled = False
            self.kept.clear()
            warnings.warn(
                f"znorm_kernels: launching the kept Triton kernel directly failed ({type(err).__name__}: "
                f"{err}); every launch now goes through Triton's own binding",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True

    def enabled(self) -> bool:
        """Whether kept kernels may be launched directly now (no launch hooks, debug mode, or earlier
        failure)."""
        return _enabled and _plain(self.fn)

"""The backend registry: which backends exist, which this process can use, and which one ``backend="auto"``
picks for a device.

``BACKENDS`` is the one table of backends, fastest first; each entry names the module of
``znorm_kernels.backends`` that implements it, imported only when first asked about. A backend module
provides ``unavailable(name)``, ``serves(name, device)`` and ``group_fn(name)`` (one module may implement
several backends, told apart by name): docs/extending.md has the checklist for adding one. ``AUTO_ORDER`` is
the rule ``auto`` follows per device type (docs/contract.md).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import triton_interpret

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Backend",
    "GroupFn",
    "available_backends",
    "clear_caches",
    "group_fn",
    "resolve",
    "resolve_backend",
    "unavailable",
]

# A backend's group function: (tensors of one device and dtype, eps, correction, grad_scale or None, *,
# stats=None).
GroupFn = Callable[[list[Tensor], float, float, "Tensor | None"], None]


@dataclass(frozen=True)
class Backend:
    """A way to compute ZNorm. ``unavailable()`` says why it cannot run in this process (None: it can);
    ``serves(device)`` says why it cannot take tensors on that device (None: it can); ``load()`` returns its
    group function."""

    name: str
    unavailable: Callable[[], str | None]
    serves: Callable[[torch.device], str | None]
    load: Callable[[], GroupFn]


def module_backend(name: str, module: str) -> Backend:
    """A backend implemented in ``znorm_kernels.backends.<module>``, imported only when first asked about."""
    package = f"{__package__}.backends.{module}"

    def get():
        return importlib.import_module(package)

    def unavailable() -> str | None:
        try:
            return get().unavailable(name)
        except ImportError as err:
            if err.name == package:
                return f"it is not part of this version (no module {package})"
            return f"{package} cannot be imported ({err})"  # e.g. a dependency is missing

    return Backend(
        name=name,
        unavailable=unavailable,
        serves=lambda device: get().serves(name, device),
        load=lambda: get().group_fn(name),
    )


# Fastest first.
BACKENDS: dict[str, Backend] = {
    "triton": module_backend("triton", "triton_host"),
    "cuda": module_backend("cuda", "native"),
    "cpu": module_backend("cpu", "native"),
    "reference": module_backend("reference", "reference"),
}

# Which backends "auto" may choose for a device type, in order of preference (docs/contract.md).
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run in this process, or None (cached; TRITON_INTERPRET read each call)."""
    return _unavailable(name, triton_interpret())


@functools.cache
def _unavailable(name: str, interpret: bool) -> str | None:
    return BACKENDS[name].unavailable()


@functools.cache
def group_fn(name: str) -> GroupFn:
    """The group function of an available backend (loaded once)."""
    return BACKENDS[name].load()


def clear_caches() -> None:
    """Forget what was learned about the backends (tests that change the environment call it)."""
    _unavailable.cache_clear()
    group_fn.cache_clear()
    _resolve.cache_clear()


def available_backends() -> list[str]:
    """The backends usable in this process, fastest first ("reference" is always there)."""
    return [name for name in BACKENDS if unavailable(name) is None]


_fallback_warned = False


def _warn_fallback_once(device_type: str) -> None:
    """One warning per process when "auto" runs the slow reference because the native extension is missing."""
    global _fallback_warned
    missing = [n for n in AUTO_ORDER.get(device_type, ()) if n in ("cpu", "cuda") and unavailable(n)]
    if missing and not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"znorm_kernels: backend='auto' falls back to the pure-PyTorch reference for {device_type} "
            f"tensors, because backend {missing[0]!r} is unavailable: {unavailable(missing[0])}",
            RuntimeWarning,
            stacklevel=4,
        )


def unknown_backend(backend: str) -> ValueError:
    known = ", ".join([*BACKENDS, "auto"])
    return ValueError(f"unknown ZNorm backend {backend!r}; known backends: {known}")


def resolve(backend: str, device_type: str) -> str:
    """The concrete backend that ``backend`` (a name or "auto") means for tensors of ``device_type``."""
    return _resolve(backend, device_type, triton_interpret())


@functools.cache
def _resolve(backend: str, device_type: str, interpret: bool) -> str:
    device = torch.device(device_type)
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            if unavailable(name) is None and BACKENDS[name].serves(device) is None:
                if name == "reference":
                    _warn_fallback_once(device_type)
                return name
        return "reference"
    if backend not in BACKENDS:
        raise unknown_backend(backend)
    why = unavailable(backend)
    if why is None:
        why = BACKENDS[backend].serves(device)
    if why is not None:
        raise RuntimeError(f"ZNorm backend {backend!r} cannot serve tensors on {device_type}: {why}")
    return backend


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend that ``backend`` (a name or "auto") means for tensors on ``device``.
    Raises ValueError for an unknown name, RuntimeError when that backend cannot serve the device."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return resolve(backend, torch.device(device).type)

"""The scalar options of every entry point (``znorm_``, ``register``, the optimizers, the callbacks), checked
with a clear error before any tensor is touched."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .registry import BACKENDS, unknown_backend

__all__ = ["as_scale", "check_backend_name", "check_min_ndim", "check_options"]

# Options already accepted, as (type, value) pairs: the common call skips the checks (NaN never matches).
_accepted: set[tuple] = set()


def check_options(eps: float, correction: float, backend: str) -> None:
    """Reject bad ``eps``, ``correction`` or ``backend`` (ValueError; TypeError for a backend that is not a
    string)."""
    key = (type(eps), eps, type(correction), correction, type(backend), backend)
    try:
        if key in _accepted:
            return
    except TypeError:  # unhashable: the checks say what is wrong with it
        key = None
    _check_number("eps", eps)
    _check_number("correction", correction)
    check_backend_name(backend)
    if key is not None and len(_accepted) < 64:
        _accepted.add(key)


def _check_number(name: str, x: object) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")


def check_backend_name(backend: object) -> None:
    """A backend name this version knows, or "auto"."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise unknown_backend(backend)


def check_min_ndim(min_ndim: object) -> None:
    """``min_ndim`` of the hook, the optimizers and the callbacks: an int >= 0."""
    if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 0:
        raise ValueError(f"min_ndim must be an int >= 0, got {min_ndim!r}")


def as_scale(grad_scale: Tensor | float | None) -> Tensor | None:
    """A GradScaler scale as the 0-d tensor the backends take (a plain number is accepted too)."""
    if grad_scale is None or isinstance(grad_scale, Tensor):
        return grad_scale
    return torch.tensor(float(grad_scale))

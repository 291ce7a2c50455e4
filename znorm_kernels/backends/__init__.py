"""The backends that compute ZNorm, each a module the dispatcher imports only when first asked about:

- ``reference``: the pure-PyTorch oracle (float64 statistics, one tensor at a time);
- ``triton_host`` + ``triton_kernels``: the "triton" backend, one launch per (device, dtype) group;
- ``native``: the "cpu" and "cuda" backends, the loader of the C++/CUDA extension ``znorm_kernels._C``;
- ``triton_optim`` + ``triton_optim_kernels``: the fused optimizer step on Triton (``native`` has the CPU and
  CUDA one); ``optim_steps``: what the two fused steps' host sides share.

Each backend module provides ``unavailable(name)``, ``serves(name, device)`` and ``group_fn(name)`` (see
``znorm_kernels.dispatch``). This package imports nothing heavy itself.
"""

from __future__ import annotations

import os

from torch import Tensor

__all__ = ["is_dense", "triton_interpret"]


def triton_interpret() -> bool:
    """Whether TRITON_INTERPRET=1 is set now. It decides whether Triton can serve without a GPU, and a process
    (or a test) may set it after importing this package, so callers read it at each call."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: its elements fill [data_ptr, data_ptr + numel) in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True

"""The backends that compute ZNorm, each a module the registry (``znorm_kernels.registry``) imports only when
first asked about, and each providing ``unavailable(name)``, ``serves(name, device)`` and ``group_fn(name)``:

- ``reference``: the pure-PyTorch oracle (float64 statistics, one tensor at a time);
- ``triton_host``: the "triton" backend, one launch of the queue kernel (``triton_kernels``) per (device,
  dtype) group, with its plans (``triton_plan``), grid (``triton_grid``), tiles (``tiles``) and direct
  launcher (``triton_launch``);
- ``native``: the "cpu" and "cuda" backends, the loader of the C++/CUDA extension ``znorm_kernels._C``.

The fused optimizer steps live here too: ``triton_optim`` (kernels in ``triton_optim_kernels``) and
``native_optim``, with what their host sides share in ``optim_steps``. docs/extending.md says how to add a
backend. This package imports nothing heavy itself.
"""

from __future__ import annotations

import os

__all__ = ["triton_interpret"]


def triton_interpret() -> bool:
    """Whether TRITON_INTERPRET=1 is set now. It decides whether Triton can serve without a GPU, and a process
    (or a test) may set it after importing this package, so callers read it at each call."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

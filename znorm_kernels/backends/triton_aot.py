"""Every Triton kernel of the package compiled ahead of time for a CUDA architecture, no GPU needed: CI checks
that the kernels lower to PTX and machine code (which the interpreter does not), with the memory ordering,
vector widths, registers and spills they are meant to have (tests/test_triton_compile.py,
tests/test_triton_optim.py). Each returns Triton's compiled kernel; ``.asm["ptx"]`` holds its PTX."""

from __future__ import annotations

import torch

from . import triton_host, triton_optim
from .tiles import Tiles, UpdateTiles, tiles_for, update_tiles_for
from .triton_common import compile_ahead

__all__ = [
    "compile_adam_for_target",
    "compile_for_target",
    "compile_sgd_for_target",
    "compile_update_for_target",
]


def compile_for_target(
    dtype: torch.dtype,
    arch: int = 90,
    *,
    has_scale: bool = True,
    normalize: bool = True,
    aligned: bool = True,
    given: bool = False,
    tiles: Tiles | None = None,
    timeline: bool = False,
):
    """Compile the kernel ahead of time for a CUDA architecture (e.g. 90 for H100), no GPU needed: lets CI
    check that the kernel lowers to PTX and machine code, which the interpreter does not. ``aligned`` picks
    the specialization that serves 16-byte aligned gradients (the usual case: the caching allocator aligns
    every tensor to 512 bytes); ``tiles`` defaults to the dtype's shipped tiles of a list without a large
    tensor; ``timeline``: the diagnostic variant that records each ticket with the GPU's timer. Returns
    Triton's compiled kernel (``.asm["ptx"]`` holds the PTX)."""
    from .triton_kernels import znorm_queue_kernel

    signature = {
        "meta_ptr": "*i64", "base_ptr": "*i64", "partial_ptr": "*fp64", "stats_ptr": "*fp64",
        "counter_ptr": "*i32", "scale_ptr": "*fp32", "eps_bits": "i64", "correction": "fp32", "T": "i32",
        "S": "i32", "M": "i32", "P": "i32", "NUM_PROGRAMS": "i32", "spin_limit": "i32",
        "timeline_ptr": "*i64",
    }  # fmt: skip
    tiles = tiles or tiles_for(dtype)
    consts = triton_host.constants(dtype, tiles, aligned, has_scale, normalize, True, given, int(timeline))
    return compile_ahead(znorm_queue_kernel, signature, consts, arch, triton_host.compile_options(tiles))


def compile_update_for_target(
    kind: str,
    dtype: torch.dtype,
    arch: int = 90,
    *,
    aligned: bool = True,
    has_scale: bool = True,
    has_found_inf: bool = True,
    maximize: bool = False,
    weight_decay: bool = True,
    write_grad: bool = False,
    tiles: UpdateTiles | None = None,
    **flags,
):
    """The ``kind`` ("sgd" or "adam") kernel compiled for a CUDA architecture, with its own flags as
    keywords in lower case (sgd: momentum, nesterov, first; adam: decoupled, amsgrad, per_tensor);
    ``.asm["ptx"]`` holds its PTX."""
    spec = triton_optim.KERNELS[kind]
    tiles = tiles or update_tiles_for(dtype)
    signature = {"meta_ptr": "*i64", "stats_ptr": "*fp64", "scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
    signature.update({f"{p}_ptr": "*fp64" for p in spec.pointers})
    signature["num_items"] = "i32"
    signature.update({f"{s}_bits": "i64" for s in spec.scalars})
    own = tuple(flags.pop(f.lower()) for f in spec.flags)
    if flags:
        raise TypeError(f"unknown flags for the {kind} kernel: {sorted(flags)}")
    consts = triton_optim.constants(
        kind, dtype, tiles, aligned, has_scale, has_found_inf, maximize, weight_decay, write_grad, own
    )
    return compile_ahead(
        triton_optim.kernel(kind), signature, consts, arch, triton_optim.compile_options(tiles)
    )


def compile_sgd_for_target(dtype: torch.dtype, arch: int = 90, *, momentum: bool = True,
                           nesterov: bool = False, first: int = 2, **options):  # fmt: skip
    """The SGD kernel compiled for a CUDA architecture (``compile_update_for_target("sgd", ...)``)."""
    return compile_update_for_target(
        "sgd", dtype, arch, momentum=momentum, nesterov=nesterov, first=first, **options
    )


def compile_adam_for_target(dtype: torch.dtype, arch: int = 90, *, decoupled: bool = False,
                            amsgrad: bool = True, per_tensor: bool = False, **options):  # fmt: skip
    """The Adam/AdamW kernel compiled for a CUDA architecture (``compile_update_for_target("adam", ...)``)."""
    return compile_update_for_target(
        "adam", dtype, arch, decoupled=decoupled, amsgrad=amsgrad, per_tensor=per_tensor, **options
    )

"""What the hosts of the Triton kernels share (the ZNorm queue in triton_host, the fused updates in
triton_optim): the device and stream a launch runs under, the dtypes' Triton types, int64 tables on the
device, float64 scalars passed whole, and compiling ahead of time for a GPU that is not here."""

from __future__ import annotations

import functools
import struct

import torch
from torch import Tensor

__all__ = [
    "ALIGNMENT",
    "compile_ahead",
    "device_table",
    "element_size",
    "f64_bits",
    "on_device",
    "stream_of",
    "triton_dtypes",
]

ALIGNMENT = 16  # bytes: the vector width of the kernels' aligned specializations


@functools.cache
def triton_dtypes() -> dict[torch.dtype, tuple]:
    """torch dtype -> (Triton element type, Triton accumulation type); imports Triton on first use."""
    import triton.language as tl

    return {
        torch.float32: (tl.float32, tl.float32),
        torch.float16: (tl.float16, tl.float32),
        torch.bfloat16: (tl.bfloat16, tl.float32),
        torch.float64: (tl.float64, tl.float64),
    }


@functools.cache
def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def f64_bits(x: float) -> int:
    """The int64 bit pattern of float64 x: kernels take float scalars so, to keep all of their float64 value
    (Triton would pass a Python float as float32)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def stream_of(device: torch.device) -> int:
    """The raw handle of the current stream of ``device`` (0 off CUDA)."""
    return torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0


def _current_device() -> int:
    return torch.cuda.current_device()


def _device_context(index: int):
    return torch.cuda.device(index)


def on_device(device: torch.device, fn):
    """fn() with the tensors' device current: Triton launches on the current device and its stream."""
    if device.type == "cuda" and device.index != _current_device():
        with _device_context(device.index):
            return fn()
    return fn()


def device_table(
    values: list[int] | Tensor, device: torch.device, pinned: bool = False
) -> tuple[Tensor, Tensor | None]:
    """An int64 table (a list, or a CPU tensor this takes over, already in pinned memory if ``pinned``) on
    ``device``, copied from pinned memory without blocking; and the pinned source when the copy is being
    captured in a CUDA graph (each replay reads it again: the caller keeps it), else None."""
    host = values if isinstance(values, Tensor) else torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host, None
    capturing = torch.cuda.is_current_stream_capturing()
    if not pinned:
        host = host.pin_memory()
    return host.to(device, non_blocking=True), host if capturing else None


def compile_ahead(fn, signature: dict, constants: dict, arch: int, options: dict):
    """A Triton kernel compiled ahead of time for CUDA architecture ``arch`` (no GPU needed): ``signature``
    types its runtime arguments (in order), ``constants`` its constexpr ones (after them)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    names = list(signature)
    source = ASTSource(
        fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()}
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)

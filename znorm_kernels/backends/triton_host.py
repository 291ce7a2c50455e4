"""The "triton" backend: host side of the single-launch multi-tensor ZNorm kernel (triton_kernels.py).

Per (device, dtype) group it builds a plan: the int64 table of tensor addresses, sizes and the work items,
and a workspace (chunk partials, per-tensor statistics, counters). Plans are cached while the tensors'
addresses and sizes stay the same (an optimizer's gradients usually do from step to step), so a call costs a
cache look-up and one launch. The table reaches the device through pinned memory without blocking; nothing
synchronizes. Dense tensors in any layout (channels_last, permuted) are normalized where they lie, since mean
and std do not depend on element order; non-dense views are gathered into a contiguous copy and written back.

Calls that reuse a plan must be ordered (one stream): the workspace counters are reset by each launch for the
next one.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from . import is_dense, triton_interpret

__all__ = ["group_fn", "serves", "statistics", "unavailable", "znorm_group_"]

# Elements one program holds in registers: a tensor of at most BLOCK elements is a single small item.
BLOCK = {torch.float64: 2048}
DEFAULT_BLOCK = 4096
# Tensors above this many elements use chunks of LARGE_CHUNK_TILES tiles (fewer partials, fewer tickets).
LARGE_TENSOR = 1 << 20
LARGE_CHUNK_TILES = 16
PBLOCK = 1024  # partials merged per vector step
SUB = 512  # values per step of the rare float64 paths (re-read from cache, few registers)
PLAN_CACHE_SIZE = 16
PROGRAMS_PER_SM = 2  # ptxas: 128 registers per thread at 8 warps for float32, so 2 programs fit an SM
NUM_WARPS = 8


def unavailable(name: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA device (CPU tensors run through Triton only under TRITON_INTERPRET=1)"
    return None


def serves(name: str, device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return None
    return "Triton takes CUDA tensors (and CPU tensors only under TRITON_INTERPRET=1)"


def group_fn(name: str):
    return znorm_group_


def block_for(dtype: torch.dtype) -> int:
    return BLOCK.get(dtype, DEFAULT_BLOCK)


def chunk_for(numel: int, block: int) -> int:
    """Chunk length of a large tensor: a function of its own size only, so its bits never depend on the rest
    of the list."""
    return block * (LARGE_CHUNK_TILES if numel > LARGE_TENSOR else 1)


@dataclass
class Plan:
    """Everything a launch needs for one list of tensors, on their device."""

    meta: Tensor  # int64 table (see triton_kernels)
    partials: Tensor  # float64 [4 * S]: mean, M2, min, max per statistics chunk
    stats: Tensor  # float64 [T, 4]: mean, std, inv, wide per tensor
    counters: Tensor  # int32 [2 + T]
    num_tensors: int
    num_stats_items: int
    num_small_items: int
    block: int
    programs: int


_plans: OrderedDict[tuple, Plan] = OrderedDict()


def _num_programs(device: torch.device, items: int) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: one program drains the queue
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(items, sms * PROGRAMS_PER_SM))


def _build_plan(addrs: tuple[int, ...], numels: tuple[int, ...], device: torch.device, dtype, block) -> Plan:
    t = len(addrs)
    table_addr, table_numel, table_chunk, table_first = [], [], [], []
    stats_tensor, stats_chunk, small_tensor = [], [], []
    for i, (addr, n) in enumerate(zip(addrs, numels)):
        table_addr.append(addr)
        table_numel.append(n)
        if n <= block:
            table_chunk.append(0)
            table_first.append(0)
            small_tensor.append(i)
        else:
            chunk = chunk_for(n, block)
            nchunks = -(-n // chunk)
            table_chunk.append(chunk)
            table_first.append(len(stats_chunk))
            stats_tensor.extend([i] * nchunks)
            stats_chunk.extend(range(nchunks))
    s, m = len(stats_chunk), len(small_tensor)
    host = torch.tensor(
        table_addr + table_numel + table_chunk + table_first + stats_tensor + small_tensor + stats_chunk,
        dtype=torch.int64,
    )
    meta = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    items = s + m + s
    return Plan(
        meta=meta,
        partials=torch.empty(max(4 * s, 1), dtype=torch.float64, device=device),
        stats=torch.zeros((t, 4), dtype=torch.float64, device=device),
        counters=torch.zeros(2 + t, dtype=torch.int32, device=device),
        num_tensors=t,
        num_stats_items=s,
        num_small_items=m,
        block=block,
        programs=_num_programs(device, items),
    )


def _plan_for(tensors: list[Tensor], block: int) -> Plan:
    addrs = tuple(map(Tensor.data_ptr, tensors))
    numels = tuple(map(Tensor.numel, tensors))
    first = tensors[0]
    key = (first.device, first.dtype, block, addrs, numels)
    plan = _plans.get(key)
    if plan is None:
        plan = _build_plan(addrs, numels, first.device, first.dtype, block)
        _plans[key] = plan
        if len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


@functools.cache
def _triton_dtypes() -> dict[torch.dtype, tuple]:
    """torch dtype -> (Triton element type, Triton accumulation type); imports Triton on first use."""
    import triton.language as tl

    return {
        torch.float32: (tl.float32, tl.float32),
        torch.float16: (tl.float16, tl.float32),
        torch.bfloat16: (tl.bfloat16, tl.float32),
        torch.float64: (tl.float64, tl.float64),
    }


def compile_for_target(dtype: torch.dtype, arch: int = 90, *, has_scale: bool = True, normalize: bool = True):
    """Compile the kernel ahead of time for a CUDA architecture (e.g. 90 for H100), no GPU needed: lets CI
    check that the kernel lowers to PTX and machine code, which the interpreter does not. Returns Triton's
    compiled kernel (``.asm["ptx"]`` holds the PTX)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_kernels import znorm_queue_kernel

    tl_dtype, tl_acc = _triton_dtypes()[dtype]
    signature = {
        "meta_ptr": "*i64", "partial_ptr": "*fp64", "stats_ptr": "*fp64", "counter_ptr": "*i32",
        "scale_ptr": "*fp32", "eps": "fp32", "correction": "fp32", "T": "i32", "S": "i32", "M": "i32",
        "NUM_PROGRAMS": "i32",
    }  # fmt: skip
    constants = {
        "DTYPE": tl_dtype, "ACC": tl_acc, "BLOCK": block_for(dtype), "PBLOCK": PBLOCK, "SUB": SUB,
        "HAS_SCALE": has_scale, "NORMALIZE": normalize,
    }  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    names = list(signature)
    source = ASTSource(
        fn=znorm_queue_kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})


def _launch(
    tensors: list[Tensor], eps: float, correction: float, grad_scale, normalize: bool, block, plan=None
) -> Plan:
    from . import triton_kernels  # the kernel module is imported once, then found in sys.modules

    dtype = tensors[0].dtype
    block = block or block_for(dtype)
    if plan is None:
        plan = _plan_for(tensors, block)
    device = tensors[0].device
    if grad_scale is not None:
        scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
    else:
        scale = plan.stats  # never read
    tl_dtype, tl_acc = _triton_dtypes()[dtype]
    triton_kernels.znorm_queue_kernel[(plan.programs,)](
        plan.meta,
        plan.partials,
        plan.stats,
        plan.counters,
        scale,
        eps,
        correction,
        plan.num_tensors,
        plan.num_stats_items,
        plan.num_small_items,
        plan.programs,
        DTYPE=tl_dtype,
        ACC=tl_acc,
        BLOCK=block,
        PBLOCK=PBLOCK,
        SUB=SUB,
        HAS_SCALE=grad_scale is not None,
        NORMALIZE=normalize,
        num_warps=NUM_WARPS,
    )
    return plan


def _dense_stand_ins(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors themselves where dense, contiguous copies of non-dense views (checked in C first)."""
    if all(map(Tensor.is_contiguous, tensors)):
        return tensors
    return [t if is_dense(t) else t.contiguous() for t in tensors]


def _with_dense(tensors: list[Tensor], fn):
    """Run fn on dense stand-ins: non-dense views are gathered into contiguous copies and written back."""
    dense = _dense_stand_ins(tensors)
    result = fn(dense)
    if dense is not tensors:
        for t, d in zip(tensors, dense):
            if d is not t:
                t.copy_(d)
    return result


def znorm_group_(
    tensors: list[Tensor], eps: float, correction: float, grad_scale: Tensor | None = None, *, block=None
) -> None:
    """Normalize a validated same-device, same-dtype list in place, in one kernel launch."""
    _with_dense(tensors, lambda ts: _launch(ts, eps, correction, grad_scale, True, block))


def bind(tensors: list[Tensor]):
    """A group function tied to these tensors' addresses, for callers that know the next lists sit at the
    same addresses with the same sizes (the hook's unchanged gradients): it skips the plan look-up. Lists of
    non-dense views are not bound (their stand-ins are new copies each call)."""
    if not all(map(is_dense, tensors)):
        return znorm_group_
    plan = _plan_for(tensors, block_for(tensors[0].dtype))

    def run(tensors: list[Tensor], eps: float, correction: float, grad_scale: Tensor | None = None) -> None:
        if all(map(Tensor.is_contiguous, tensors)) or all(map(is_dense, tensors)):
            _launch(tensors, eps, correction, grad_scale, True, None, plan)
        else:
            znorm_group_(tensors, eps, correction, grad_scale)

    return run


znorm_group_.bind = bind


def statistics(
    tensors: list[Tensor],
    eps: float = 1e-10,
    correction: float = 0,
    grad_scale: Tensor | None = None,
    *,
    block=None,
) -> Tensor:
    """The statistics stage alone: a float64 [T, 4] device tensor of (mean, std, inv, wide) per tensor, where
    z = (g - mean) * inv (wide is 1.0 where the kernel computes that product in float64, else 0.0). The
    tensors are not modified. (For a fused optimizer step that applies ZNorm as it loads the gradient.)
    Same-device, same-dtype tensors of at least 2 elements."""
    return _launch(_dense_stand_ins(tensors), eps, correction, grad_scale, False, block).stats.clone()

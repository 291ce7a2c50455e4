"""pytest-benchmark timings of ZNorm at a few sizes (``pytest bench/``; not part of ``make test``).

Each available backend of ours, and the eager loop users write, on: one tensor of 10 k elements, one of 1 M,
and ResNet-56's gradient list, in float32 and bfloat16, on the CPU and (when present) on CUDA. Unavailable
backends skip; triton is timed on CUDA tensors only (on the CPU it would be the interpreter). Nothing here
asserts on a timing: the figures are for comparing runs (``--benchmark-compare``). On CUDA each timed call
ends with a synchronize, so the figure is the host-observed time of the whole call.
"""

from __future__ import annotations

import pytest
import torch

import znorm_kernels
from bench.alternatives import EPS, eager_loop, our_backends
from bench.param_lists import get_list
from bench.suite import make_grads
from bench.timing import sync

SIZES = {"10k": [(10_000,)], "1M": [(1_000_000,)], "resnet56": list(get_list("resnet56").shapes)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
METHODS = ["eager", "triton", "cuda", "cpu", "reference"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
def test_znorm_speed(benchmark, device: str, method: str, size: str, dtype: torch.dtype) -> None:
    if method != "eager":
        why = our_backends(device)[method]
        if why:
            pytest.skip(f"backend {method}: {why}")
    grads = make_grads(SIZES[size], device, dtype)
    elements = sum(g.numel() for g in grads)

    if method == "eager":

        def fn() -> None:
            with torch.no_grad():
                eager_loop(grads)
            sync(device)
    else:

        def fn() -> None:
            znorm_kernels.znorm_(grads, eps=EPS, backend=method)
            sync(device)

    benchmark.extra_info.update(
        {"elements": elements, "tensors": len(grads), "bytes_needed": 3 * grads[0].element_size() * elements}
    )
    benchmark.pedantic(fn, warmup_rounds=1, rounds=10 if device == "cpu" else 50)
    # Not a timing assertion: the normalized values are still z-scores after repeated calls.
    assert all(torch.isfinite(g).all() for g in grads)

"""`make bench`: ZNorm through the optimizer hook on ResNet-56's gradient list, on the best device present.

Every available backend is first checked against the float64 formula on the same gradients (a benchmark of a
wrong kernel is worthless), then timed: median of device-event times on CUDA, of wall-clock times on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import znorm_kernels
from bench.param_lists import resnet_cifar_shapes
from znorm_kernels.dispatch import resolve_backend


def make_grads(shapes, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 0.01 + 0.001).to(device=device, dtype=dtype) for s in shapes]


def max_z_error(grads, inputs, eps=1e-10):
    worst = 0.0
    for g, x in zip(grads, inputs):
        v = x.double()
        z = (v - v.mean()) / (v.std(correction=0) + eps)
        worst = max(worst, float((g.double() - z).abs().max()))
    return worst


def time_hook(backend, shapes, device, dtype, repeats):
    params = [torch.nn.Parameter(torch.zeros(s, device=device, dtype=dtype)) for s in shapes]
    opt = torch.optim.SGD(params, lr=0.0)
    znorm_kernels.register(opt, backend=backend)
    inputs = make_grads(shapes, device, dtype)
    for p, x in zip(params, inputs):
        p.grad = x.clone()
    opt.step()
    err = max_z_error([p.grad for p in params], inputs)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return err, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    shapes = resnet_cifar_shapes(56)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"ZNorm of ResNet-56's gradients ({len(shapes)} tensors, {n / 1e6:.2f} M elements)", end="")
    print(f" on {args.device}")
    print(f"torch {torch.__version__}; available backends: {', '.join(znorm_kernels.available_backends())}\n")
    print("| backend | dtype | max abs z error vs float64 | median ms per optimizer step (hook) |")
    print("|---|---|---|---|")
    for backend in znorm_kernels.available_backends():
        try:
            resolve_backend(backend, args.device)
        except RuntimeError:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            err, t = time_hook(backend, shapes, args.device, dtype, args.repeats)
            print(f"| {backend} | {str(dtype).removeprefix('torch.')} | {err:.2e} | {t * 1e3:.3f} |")


if __name__ == "__main__":
    main()

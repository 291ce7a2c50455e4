"""Where the hook's host time goes, on a real device: cProfile of many hook calls per backend.

`python -m bench.host_profile --device cuda` registers the hook on a do-nothing optimizer over a parameter
list's gradients (ResNet-56 by default), warms it up, then profiles ``--calls`` steps per backend and prints
the median host time per call (no profiler) and the functions with the most own time under the profiler.
The profiler inflates Python-heavy paths, so read its table for where the time goes, not for how much.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats

import torch

import znorm_kernels
from bench.param_lists import get_list
from bench.suite import NullStepOptimizer, make_grads
from bench.timing import host_time, sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--list", default="resnet56")
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = get_list(args.list).shapes
    for backend in args.backends.split(","):
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for p, g in zip(params, make_grads(shapes, device, torch.float32)):
            p.grad = g
        opt = NullStepOptimizer(params)
        handle = znorm_kernels.register(opt, backend=backend)
        for _ in range(5):
            opt.step()
        sync(device)
        _, seconds = host_time(opt.step, device, reps=args.calls, max_s=5.0)
        direct = functools.partial(znorm_kernels.znorm_, [p.grad for p in params], backend=backend)
        _, direct_s = host_time(direct, device, reps=args.calls)
        print(
            f"\n## {backend}: {args.list} ({len(shapes)} tensors) on {device}: hook {seconds * 1e6:.1f} µs, "
            f"znorm_ direct {direct_s * 1e6:.1f} µs host per call (median enqueue time)"
        )
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            opt.step()
        prof.disable()
        sync(device)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
        handle.remove()


if __name__ == "__main__":
    main()

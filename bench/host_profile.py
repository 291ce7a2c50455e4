"""Where the hook's host time goes, on a real device: cProfile of many hook calls per backend.

`python -m bench.host_profile --device cuda` registers the hook on a do-nothing optimizer over a parameter
list's gradients (ResNet-56 by default), warms it up, then profiles ``--calls`` steps per backend and prints
the median host time per call (no profiler) and the functions with the most own time under the profiler.
The profiler inflates Python-heavy paths, so read its table for where the time goes, not for how much.
For the triton backend it also times the hook with the direct launch of kept kernels switched off (Triton's
own launch, ``triton_launch._enabled = False``), in alternating rounds with it on: the direct launch's saving,
side by side.
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
        if backend == "triton":
            _direct_launch_side_by_side(opt, device, args.calls)
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


def _direct_launch_side_by_side(opt, device: torch.device, calls: int, rounds: int = 3) -> None:
    """The hook's host time with the direct launch on and off, in alternating rounds (median per round)."""
    from znorm_kernels.backends import triton_launch

    times: dict[bool, list[float]] = {True: [], False: []}
    saved = triton_launch._enabled
    try:
        for _ in range(rounds):
            for on in (True, False):
                triton_launch._enabled = on
                opt.step()  # the first call after a switch may compile or keep a kernel: not timed
                sync(device)
                _, s = host_time(opt.step, device, reps=calls, max_s=3.0)
                times[on].append(s * 1e6)
    finally:
        triton_launch._enabled = saved
    fmt = ", ".join
    print(
        f"hook host µs per round, direct launch on: {fmt(f'{t:.1f}' for t in times[True])}; "
        f"off (Triton's launch): {fmt(f'{t:.1f}' for t in times[False])}"
    )


if __name__ == "__main__":
    main()

"""Host cost of the ZNorm optimizers' fused step, with the kernels replaced by no-ops.

`python -m bench.optim_host [--list resnet56] [--profile]` runs on any machine: under TRITON_INTERPRET=1 the
Triton backend serves CPU tensors, and its launches (the statistics stage and the SGD/Adam update kernels)
are stubbed out, so what is timed is the library's own Python work per ``opt.step()`` (state look-ups, the
layout and validation caches, per-parameter scalars, plan look-ups, the launchers' arguments). The "cpu"
rows do the same for the native path, its C++ op replaced by a no-op. Side by side, in one round-robin run:

- torch's own step (foreach) over as many 1-element CPU tensors: its dispatch and Python work, next to no
  arithmetic (on a GPU each of its foreach launches costs a few µs more; meta tensors would not do: their
  foreach ops take a slow path, 30x slower);
- the hook (``register(torch optimizer)``, Triton backend, launch stubbed): the hook call alone (its torch
  step comes on top);
- the ZNorm optimizer's fused step on Triton (same gradient objects every step, and new gradient objects at
  the same addresses every step, as after ``zero_grad(set_to_none=True)``: that row is (assignment + step)
  minus the assignment alone), and on the native CPU path.

``--profile`` then prints cProfile's functions with the most own time for the fused Triton steps (the
profiler inflates Python-heavy paths: read it for where the time goes, not how much).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernel modules are imported

import torch

import znorm_kernels
from bench.host_overhead import NoLaunch
from bench.optim_step import OPTIMIZERS
from bench.param_lists import get_list
from bench.timing import host_times
from znorm_kernels.backends import native, triton_kernels, triton_optim_kernels


def stub_launches() -> None:
    """Every kernel this bench reaches becomes a no-op (Triton's, and the native optimizer ops)."""
    triton_kernels.znorm_queue_kernel = NoLaunch()
    triton_optim_kernels.znorm_sgd_kernel = NoLaunch()
    triton_optim_kernels.znorm_adam_kernel = NoLaunch()
    ops = torch.ops.znorm_kernels_C
    for name in ("znorm_sgd_step_", "znorm_adam_step_", "znorm_"):
        setattr(ops, name, lambda *args, **kwargs: None)


def _params(shapes, device="cpu"):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    return params, grads


def rows_for(name: str, shapes) -> dict:
    """label -> (feed or None, call): the timed call, and what it includes that is subtracted."""
    torch_cls, znorm_cls, kwargs = OPTIMIZERS[name]
    rows = {}
    params, _ = _params([(1,)] * len(shapes))
    opt = torch_cls(params, foreach=True, **kwargs)
    rows[f"{name}: torch step, foreach, 1-element tensors"] = (None, opt.step)
    params, _ = _params(shapes)
    opt = torch_cls(params, **kwargs)
    hook = opt._optimizer_step_pre_hooks[znorm_kernels.register(opt, backend="triton").id]
    rows[f"{name}: hook call, triton"] = (None, lambda hook=hook, opt=opt: hook(opt, (), {}))
    for backend in ("triton", "cpu"):
        params, _ = _params(shapes)
        opt = znorm_cls(params, backend=backend, **kwargs)
        rows[f"{name}: ZNorm optimizer, {backend}"] = (None, opt.step)
    params, grads = _params(shapes)
    opt = znorm_cls(params, backend="triton", **kwargs)

    def feed(params=params, grads=grads):
        for p, g in zip(params, grads):
            p.grad = g.detach()  # a new tensor object at g's address

    def both(feed=feed, opt=opt):
        feed()
        opt.step()

    rows[f"{name}: ZNorm optimizer, triton, new .grad objects"] = (feed, both)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--list", default="resnet56")
    parser.add_argument("--optimizers", default="sgd-momentum,adam")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    stub_launches()
    shapes = get_list(args.list).shapes
    rows = {}
    for name in args.optimizers.split(","):
        rows.update(rows_for(name, shapes))
    fns = []
    for feed, call in rows.values():
        for _ in range(3):  # warm up: state made, caches filled
            call()
        fns += [call] + ([feed] if feed is not None else [])
    times = host_times(fns, "cpu", reps=args.repeats, max_s=float("inf"))
    print(f"{args.list}: {len(shapes)} tensors; torch {torch.__version__}; median of {args.repeats} rounds")
    print("| step | host µs per step |\n|---|---|")
    k = 0
    for label, (feed, _) in rows.items():
        us = times[k][0] * 1e6
        k += 1
        if feed is not None:
            us -= times[k][0] * 1e6
            k += 1
        print(f"| {label} | {us:.1f} |")
    if args.profile:
        for label, (_, call) in rows.items():
            if "ZNorm optimizer, triton" not in label or "new" in label:
                continue
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                call()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
            print(f"\n### {label}: cProfile of 200 steps, by own time\n")
            print(out.getvalue())


if __name__ == "__main__":
    assert native.has_optim_kernels(), "the native extension's optimizer kernels are needed for the cpu rows"
    main()

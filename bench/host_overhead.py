"""Host cost of the hook's Python path for the Triton backend, with the kernel launch replaced by a no-op.

`python -m bench.host_overhead` runs on any machine (the Triton kernel never runs: under TRITON_INTERPRET=1
the backend serves CPU tensors, and the launch is stubbed out), so the library's own host work per hook call
(parameter selection, checks, grouping, plan look-up) can be tracked where no GPU is at hand. Triton's own
launch cost comes on top; on a GPU, `python -m bench` measures the whole of it ("hook host µs").
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernel module is imported

import torch

import znorm_kernels
from bench.param_lists import get_list
from bench.timing import host_time
from znorm_kernels import dispatch
from znorm_kernels.backends import triton_kernels


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--list", default="resnet56")
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    triton_kernels.znorm_queue_kernel = _NoLaunch()
    shapes = get_list(args.list).shapes
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(params, lr=0.0)
    handle = znorm_kernels.register(opt, backend="triton")
    hook = opt._optimizer_step_pre_hooks[handle.id]
    grads = [p.grad for p in params]
    # A second optimizer over the same shapes, every 10th gradient None (unused parameters, or
    # zero_grad(set_to_none=True) before a step that does not reach them).
    sparse_params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for i, p in enumerate(sparse_params):
        p.grad = None if i % 10 == 0 else torch.randn_like(p)
    sparse_opt = torch.optim.SGD(sparse_params, lr=0.0)
    sparse_handle = znorm_kernels.register(sparse_opt, backend="triton")
    sparse_hook = sparse_opt._optimizer_step_pre_hooks[sparse_handle.id]
    rows = {
        "hook call (unchanged gradients)": lambda: hook(opt, (), {}),
        "hook call (some gradients None)": lambda: sparse_hook(sparse_opt, (), {}),
        "znorm_(grads, backend='triton')": lambda: znorm_kernels.znorm_(grads, backend="triton"),
        "input checks and grouping alone": lambda: dispatch.collect_indices(grads),
        # the same without the cache of recent checks (new tensor objects each call, or a first call)
        "znorm_(grads, backend='triton'), checks uncached": lambda: (
            dispatch._checked.clear(),
            znorm_kernels.znorm_(grads, backend="triton"),
        ),
        "input checks and grouping alone, uncached": lambda: dispatch.check_and_group(grads, None, "znorm_"),
    }
    for fn in rows.values():  # warm up: plans built, caches filled
        fn()
    print(f"{args.list}: {len(params)} tensors; torch {torch.__version__}; median of {args.repeats} calls")
    print("| path | host µs per call |\n|---|---|")
    for name, fn in rows.items():
        seconds, _ = host_time(fn, "cpu", reps=args.repeats, max_s=float("inf"))
        print(f"| {name} | {seconds * 1e6:.1f} |")


if __name__ == "__main__":
    main()

"""Optimizer step with ZNorm, three ways, side by side on one gradient list: torch's optimizer alone (no
ZNorm), ``register(torch optimizer)`` (the hook, then torch's step), and the ZNorm optimizers of
``znorm_kernels.optim``.

`python -m bench.optim_step [--device cpu|cuda] [--lists resnet56,llm-d512]` prints a markdown table of
median step times (round-robin on the CPU, so load drift hits all alike; CUDA events on a GPU) and each
one's ratio to torch's optimizer alone. The parameters and gradients are random tensors of the list's shapes;
the gradients are restored before each step, so every step does the same work.
"""

from __future__ import annotations

import argparse

import torch

import znorm_kernels
from bench.param_lists import get_list
from bench.timing import device_times
from znorm_kernels.optim import ZNormAdam, ZNormSGD

OPTIMIZERS = {
    "sgd-momentum": (torch.optim.SGD, ZNormSGD, dict(lr=1e-3, momentum=0.9)),
    "adam": (torch.optim.Adam, ZNormAdam, dict(lr=1e-3)),
}


def make(shapes, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    return params, grads


def steppers(name: str, shapes, device, dtype, foreach: bool | None, fused: bool | None):
    torch_cls, znorm_cls, kwargs = OPTIMIZERS[name]
    rows = {}
    for label in ("torch alone", "hook + torch", "ZNorm optimizer"):
        params, grads = make(shapes, device, dtype)
        opts = dict(kwargs, foreach=foreach, fused=fused)
        if label == "ZNorm optimizer":
            # Never torch's fused=True: that would route it through torch's fused update; its own fused step
            # (Triton) serves where it can, else foreach.
            opt = znorm_cls(params, **dict(kwargs, foreach=True))
        else:
            opt = torch_cls(params, **opts)
            if label == "hook + torch":
                znorm_kernels.register(opt)

        def step(params=params, grads=grads, opt=opt):
            for p, g in zip(params, grads):
                p.grad = g  # the same raw gradients every step (the hook normalizes them in place)
            opt.step()

        rows[label] = step
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lists", default="resnet56,llm-d512")
    parser.add_argument("--optimizers", default="sgd-momentum,adam")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--fused", action="store_true", help="torch's fused update (for torch alone and hook + torch)"
    )
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=3.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    foreach, fused = (None, True) if args.fused else (True, None)
    print(
        f"device {device}; torch {torch.__version__}; {args.dtype}; torch update "
        f"{'fused' if args.fused else 'foreach'}; threads {torch.get_num_threads()}; "
        f"backend for ZNorm: {znorm_kernels.registry.resolve_backend('auto', device)}"
    )
    print("| list | optimizer | torch alone (ms) | hook + torch (ms) | ZNorm optimizer (ms) | hook / alone | "
          "ZNorm optimizer / alone |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for list_name in args.lists.split(","):
        plist = get_list(list_name)
        for name in args.optimizers.split(","):
            rows = steppers(name, plist.shapes, device, dtype, foreach, fused)
            times = device_times(list(rows.values()), device, reps=args.reps, max_s=args.max_seconds)
            alone, hook, ours = (t * 1e3 for t in times)
            print(
                f"| {list_name} ({plist.tensors} tensors, {plist.elements / 1e6:.1f} M) | {name} | "
                f"{alone:.2f} | {hook:.2f} | {ours:.2f} | {hook / alone:.2f} | {ours / alone:.2f} |"
            )


if __name__ == "__main__":
    main()

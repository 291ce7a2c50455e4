"""The training-step view: one ResNet-56 (CIFAR) training step with no ZNorm, with the eager loop as a step
pre-hook, and with our hook, and the overhead of each.

SGD with momentum 0.9; on CUDA batch 256, bf16 autocast and channels_last; on the CPU float32 and a smaller
batch. The variants share one model and optimizer and are interleaved (one step of each in turn, round after
round), so drift of a shared machine hits them alike; the figure is the median step time, device
synchronized after each step. The data are random (timing only).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import znorm_kernels
from bench.alternatives import EPS, eager_loop
from bench.timing import sync
from znorm_kernels.cifar.models import cifar_resnet

__all__ = ["time_training_step"]


def time_training_step(
    device: torch.device, batch: int, steps: int, rounds: int | None = None, backend: str = "auto"
) -> dict:
    """Median ms per step for each variant, and the set-up used: ``steps`` timed steps per variant in
    ``rounds`` rounds (default: one step per variant per round, the finest interleaving), after a warm-up
    round of 2 steps each."""
    rounds = rounds or steps
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = cifar_resnet(56).to(device=device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    def eager_hook(o, args, kwargs) -> None:
        with torch.no_grad():
            eager_loop([p.grad for g in o.param_groups for p in g["params"] if p.grad is not None])

    resolved = znorm_kernels.dispatch.resolve_backend(backend, device)
    variants: dict[str, Callable[[], object]] = {
        "no ZNorm": lambda: None,
        "eager loop (step pre-hook)": lambda: opt.register_step_pre_hook(eager_hook),
        f"znorm_kernels.register (backend {resolved})": lambda: znorm_kernels.register(
            opt, eps=EPS, backend=backend
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):  # round 0 is warm-up (compilation, caches), not recorded
        for name, install in variants.items():
            handle = install()
            for _ in range(max(1, steps // rounds) if r else 2):
                sync(device)
                start = time.perf_counter()
                step()
                sync(device)
                if r:
                    times[name].append(time.perf_counter() - start)
            if handle is not None:
                handle.remove()
    return {
        "batch": batch,
        "steps": sum(len(t) for t in times.values()) // len(times),
        "precision": "bf16 autocast" if cuda else "float32",
        "memory_format": "channels_last" if cuda else "contiguous",
        "variants": {name: statistics.median(t) * 1e3 for name, t in times.items()},
    }

"""The training-step view: one ResNet-56 (CIFAR) training step with no ZNorm, with the eager loop as a step
pre-hook, and with our hook, and the overhead of each.

SGD with momentum 0.9; on CUDA batch 256, bf16 autocast and channels_last; on the CPU float32 and a smaller
batch. The variants share one model and optimizer and are interleaved (one step of each in turn, round after
round), so drift of a shared machine hits them alike. Each variant is installed for two steps per round and
the second is timed: the steady state a training loop sees, not a hook's first call. The figure is the
median step time, device synchronized after each step. The data are random (timing only).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import znorm_kernels
from bench.alternatives import EPS, eager_loop, loop_pre_hook
from bench.timing import sync
from znorm_kernels.cifar.models import cifar_resnet

__all__ = ["time_training_step"]


def time_training_step(device: torch.device, batch: int, steps: int, backend: str = "auto") -> dict:
    """Median ms per step for each variant, and the set-up used: ``steps`` timed steps per variant, one step
    of each variant per round (the finest interleaving), after a warm-up round of 2 steps each."""
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

    resolved = znorm_kernels.dispatch.resolve_backend(backend, device)
    variants: dict[str, Callable[[], object]] = {
        "no ZNorm": lambda: None,
        "eager loop (step pre-hook)": lambda: opt.register_step_pre_hook(loop_pre_hook(eager_loop)),
        f"znorm_kernels.register (backend {resolved})": lambda: znorm_kernels.register(
            opt, eps=EPS, backend=backend
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    hook_times: dict[str, list[float]] = {name: [] for name in variants}
    # The host time of the treatment itself inside the step: pre-hooks around it (they run in the order
    # registered) read the clock.
    clock: list[float] = []
    with _PathCounter() as paths:
        for r in range(steps + 1):  # round 0 is warm-up (compilation, caches), not recorded
            for name, install in variants.items():
                before = opt.register_step_pre_hook(lambda *_: clock.append(time.perf_counter()))
                handle = install()
                after = opt.register_step_pre_hook(lambda *_: clock.append(time.perf_counter()))
                # The first step after installing is never timed: a hook's first call builds its caches
                # (selection, checks, plans), which a training loop pays once, not every step. (Until
                # 2026-11-27 every timed step of the hook was its first: the first two GPU runs' +5.5% and
                # +9.4% include it.)
                for k in range(2 if r else 3):
                    timed = bool(r and k == 1)
                    paths.counting = timed and name.startswith("znorm_kernels")
                    clock.clear()
                    sync(device)
                    start = time.perf_counter()
                    step()
                    sync(device)
                    if timed:
                        times[name].append(time.perf_counter() - start)
                        hook_times[name].append(clock[1] - clock[0])
                paths.counting = False
                for h in (before, handle, after):
                    if h is not None:
                        h.remove()
    return {
        "batch": batch,
        "steps": sum(len(t) for t in times.values()) // len(times),
        "precision": "bf16 autocast" if cuda else "float32",
        "memory_format": "channels_last" if cuda else "contiguous",
        "variants": {name: statistics.median(t) * 1e3 for name, t in times.items()},
        "hook_host_us": {name: statistics.median(t) * 1e6 for name, t in hook_times.items()},
        "hook_paths": dict(paths.counts),
    }


class _PathCounter:
    """Counts, while ``counting`` is set, which path our hook took (GradientGroups: the full checks, or
    gradients that moved to other addresses and were bound again; otherwise the same addresses) and how
    many Triton plans (a new table copied to the device) were built. Patches the classes for the duration."""

    def __init__(self) -> None:
        self.counting = False
        self.counts = {"full checks": 0, "moved": 0, "plans built": 0}

    def __enter__(self) -> _PathCounter:
        from znorm_kernels import dispatch

        self._saved = [(dispatch.GradientGroups, "_check"), (dispatch.GradientGroups, "_moved")]
        wrap = {"_check": "full checks", "_moved": "moved"}
        try:
            from znorm_kernels.backends import triton_host

            self._saved.append((triton_host, "_build_plan"))
            wrap["_build_plan"] = "plans built"
        except ImportError:  # no Triton: nothing to count there
            pass
        self._saved = [(owner, attr, getattr(owner, attr)) for owner, attr in self._saved]
        for owner, attr, fn in self._saved:
            setattr(owner, attr, self._counted(fn, wrap[attr]))
        return self

    def _counted(self, fn, what: str):
        def counted(*args, **kwargs):
            result = fn(*args, **kwargs)
            if self.counting and (what != "moved" or result):
                self.counts[what] += 1
            return result

        return counted

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in self._saved:
            setattr(owner, attr, fn)

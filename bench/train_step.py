"""The training-step view: one ResNet-56 (CIFAR) training step with no ZNorm, with the eager loop as a step
pre-hook, and with our hook, and the overhead of each.

SGD with momentum 0.9; on CUDA batch 256, bf16 autocast and channels_last; on the CPU float32 and a smaller
batch. The variants share one model and optimizer and are interleaved (one step of each in turn, round after
round), so drift of a shared machine hits them alike. Each variant is installed for two steps per round and
the second is timed: the steady state a training loop sees, not a hook's first call. The figure is the
median step time, device synchronized after each step; on CUDA also the pipelined step time (steps back to
back, one synchronization at the end), and the step captured in a CUDA graph and replayed
(znorm_kernels.cifar.steps.GraphedStep, the training script's ``--graph``), with no ZNorm and with our hook
inside the graph (each its own model): pipelined the same way, in the same rounds as the eager variants.
The data are random (timing only).

    python -m bench.train_step --device cuda                 # the table alone (as `python -m bench` has it)
    python -m bench.train_step --device cuda --profile OUT   # torch.profiler over pipelined steps of each
                                                             # variant: where the time of a step goes
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import znorm_kernels
from bench.alternatives import EPS, eager_loop, loop_pre_hook
from bench.timing import sync
from znorm_kernels.cifar.models import cifar_resnet

__all__ = ["profile_training_step", "time_training_step"]


def _model_and_batch(device: torch.device, batch: int):
    """ResNet-56 (seed 0; channels_last on CUDA), SGD with momentum on it, and a random batch (x, y)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = cifar_resnet(56).to(device=device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, opt, x, y


def _setup(device: torch.device, batch: int, backend: str):
    """The model, optimizer and data of the step; returns (step, variants): ``step()`` runs one training step,
    ``variants`` maps each variant's name to a function that installs it (returning its handle or None)."""
    cuda = device.type == "cuda"
    model, opt, x, y = _model_and_batch(device, batch)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    resolved = znorm_kernels.registry.resolve_backend(backend, device)
    variants: dict[str, Callable[[], object]] = {
        "no ZNorm": lambda: None,
        "eager loop (step pre-hook)": lambda: opt.register_step_pre_hook(loop_pre_hook(eager_loop)),
        f"znorm_kernels.register (backend {resolved})": lambda: znorm_kernels.register(
            opt, eps=EPS, backend=backend
        ),
    }
    return step, opt, variants


def _graphed_runs(device: torch.device, batch: int, backend: str) -> dict:
    """The step captured in a CUDA graph, with no ZNorm and with our hook inside: per variant its own model
    and optimizer (the same seed) and a GraphedStep warmed up and captured, with its batch."""
    from znorm_kernels.cifar.steps import GraphedStep

    resolved = znorm_kernels.registry.resolve_backend(backend, device)
    runs = {}
    for name in ("no ZNorm", f"znorm_kernels.register (backend {resolved})"):
        model, opt, x, y = _model_and_batch(device, batch)
        if name != "no ZNorm":
            znorm_kernels.register(opt, eps=EPS, backend=backend)
        step = GraphedStep(model, opt, device, torch.bfloat16)
        for _ in range(GraphedStep.WARMUP + 2):  # eager warm-up steps, the capture, one replay
            step(x, y)
        runs[name] = (step, x, y)
    return runs


def time_training_step(
    device: torch.device,
    batch: int,
    steps: int,
    backend: str = "auto",
    *,
    pipelined_rounds: int = 5,
    pipelined_steps: int = 10,
) -> dict:
    """Median ms per step for each variant, and the set-up used: ``steps`` timed steps per variant, one step
    of each variant per round (the finest interleaving), after a warm-up round of 2 steps each. On CUDA also
    the pipelined figure a training loop sees: ``pipelined_steps`` steps back to back with one synchronization
    at the end, median over ``pipelined_rounds`` rounds (variants in turn)."""
    cuda = device.type == "cuda"
    step, opt, variants = _setup(device, batch, backend)
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
    pipelined = graphed = None
    if cuda and pipelined_rounds > 0:
        runs: dict[str, list[float]] = {name: [] for name in variants}
        graphed_runs = _graphed_runs(device, batch, backend)
        replays: dict[str, list[float]] = {name: [] for name in graphed_runs}
        for _ in range(pipelined_rounds):  # the eager and the graphed variants in turn, round after round
            for name, install in variants.items():
                handle = install()
                step()  # the first step after installing (caches) is not timed
                sync(device)
                start = time.perf_counter()
                for _ in range(pipelined_steps):
                    step()
                sync(device)
                runs[name].append((time.perf_counter() - start) / pipelined_steps)
                if handle is not None:
                    handle.remove()
            for name, (graphed_step, x, y) in graphed_runs.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(pipelined_steps):
                    graphed_step(x, y)
                sync(device)
                replays[name].append((time.perf_counter() - start) / pipelined_steps)
        pipelined = {name: statistics.median(t) * 1e3 for name, t in runs.items()}
        graphed = {name: statistics.median(t) * 1e3 for name, t in replays.items()}
    return {
        "batch": batch,
        "steps": sum(len(t) for t in times.values()) // len(times),
        "precision": "bf16 autocast" if cuda else "float32",
        "memory_format": "channels_last" if cuda else "contiguous",
        "variants": {name: statistics.median(t) * 1e3 for name, t in times.items()},
        "hook_host_us": {name: statistics.median(t) * 1e6 for name, t in hook_times.items()},
        "hook_paths": dict(paths.counts),
        "pipelined": pipelined,
        "graphed": graphed,
        "pipelined_steps": pipelined_steps,
        "pipelined_rounds": pipelined_rounds,
    }


class _PathCounter:
    """Counts, while ``counting`` is set, which path our hook took (GradientGroups: the full checks, or
    gradients that moved to other addresses and were bound again, by the Python path or the native watch;
    otherwise the same addresses) and how many Triton plans were built (a table copied to the device) or
    moved (their address table rewritten) (``triton_plan.counts``). Patches the cache's class for the
    duration."""

    def __init__(self) -> None:
        self._counting = False
        self._built_at = (0, 0)
        self.counts = {"full checks": 0, "moved": 0, "plans built": 0, "plans moved": 0}

    @property
    def counting(self) -> bool:
        return self._counting

    @counting.setter
    def counting(self, on: bool) -> None:
        built = self._plans_built()
        if self._counting and not on:
            self.counts["plans built"] += built[0] - self._built_at[0]
            self.counts["plans moved"] += built[1] - self._built_at[1]
        self._built_at, self._counting = built, on

    @staticmethod
    def _plans_built() -> tuple[int, int]:
        try:
            from znorm_kernels.backends import triton_plan
        except ImportError:  # no Triton: nothing to count there
            return 0, 0
        return triton_plan.counts.built, triton_plan.counts.rebased

    def __enter__(self) -> _PathCounter:
        from znorm_kernels import step_cache

        # (the moves: _rebind, the Python path's after _moved found them disjoint and the watch's where it
        # hands back the gradients; _rebase, the watch's where every group is a launch)
        wrap = {"_check": "full checks", "_rebind": "moved", "_rebase": "moved"}
        self._saved = [
            (step_cache.GradientGroups, attr, getattr(step_cache.GradientGroups, attr)) for attr in wrap
        ]
        for owner, attr, fn in self._saved:
            setattr(owner, attr, self._counted(fn, wrap[attr]))
        return self

    def _counted(self, fn, what: str):
        def counted(*args, **kwargs):
            result = fn(*args, **kwargs)
            if self._counting:
                self.counts[what] += 1
            return result

        return counted

    def __exit__(self, *exc) -> None:
        self.counting = False
        for owner, attr, fn in self._saved:
            setattr(owner, attr, fn)


def profile_training_step(
    device: torch.device, batch: int, out: Path, steps: int = 5, backend: str = "auto"
) -> str:
    """torch.profiler (CPU and CUDA) over ``steps`` pipelined steps of each variant, after 3 warm-up steps:
    per variant the step's wall time under the profiler, the device kernels per step and their summed time,
    the time the device spent idle between them, and the operators with the most self time on each side.
    Writes OUT/train_profile.md (returned) and a gzipped Chrome trace per variant."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    step, _, variants = _setup(device, batch, backend)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    text = [
        f"# Training-step profile: ResNet-56, batch {batch}, {steps} pipelined steps per variant",
        "",
        "| variant | wall ms per step | kernels per step | kernel ms per step | device idle ms per step |",
        "|---|---|---|---|---|",
    ]
    tables = []
    for k, (name, install) in enumerate(variants.items()):
        handle = install()
        for _ in range(3):
            step()
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            wall = (time.perf_counter() - start) / steps
        if handle is not None:
            handle.remove()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps  # kernels, memcpys, memsets
        idle = ""
        if kernels:
            first = min(e.time_range.start for e in kernels)
            last = max(e.time_range.end for e in kernels)
            idle = f"{((last - first) / 1e3 - busy * steps) / steps:.2f}"
        text.append(f"| {name} | {wall * 1e3:.2f} | {len(kernels) / steps:.0f} | {busy:.2f} | {idle} |")
        averages = prof.key_averages()
        tables.append(f"## {name}\n")
        keys = [("self_cpu_time_total", "self CPU time")]
        if kernels:
            keys.insert(0, ("self_device_time_total", "self device time"))
        for key, what in keys:
            tables += [
                f"Top 15 by {what} (all {steps} steps):",
                "",
                "```",
                averages.table(sort_by=key, row_limit=15, max_name_column_width=60),
                "```",
                "",
            ]
        trace = out / f"trace_{k}.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
            dst.write(src.read())
        trace.unlink()
    text += ["", "Device idle: the span from the first kernel to the last, minus their summed time.", ""]
    doc = "\n".join(text + tables) + "\n"
    (out / "train_profile.md").write_text(doc)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="default 256 on CUDA, 32 on the CPU")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (the table)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--profile", type=Path, metavar="OUT", help="profile instead of timing; results in OUT"
    )
    parser.add_argument("--profile-steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 32)
    if args.profile:
        doc = profile_training_step(device, batch, args.profile, args.profile_steps, args.backend)
        print(doc.split("\n## ", 1)[0])
        return
    from bench.report import train_markdown

    print(train_markdown(time_training_step(device, batch, args.steps, args.backend)))


if __name__ == "__main__":
    main()

"""Host cost of the hook's Python path for the Triton backend, with the kernel launch replaced by a no-op.

`python -m bench.host_overhead` runs on any machine (the Triton kernel never runs: under TRITON_INTERPRET=1
the backend serves CPU tensors, and the launch is stubbed out), so the library's own host work per hook call
(parameter selection, checks, grouping, plan look-up) can be tracked where no GPU is at hand. Triton's own
launch cost comes on top; on a GPU, `python -m bench` measures the whole of it ("hook host µs").

The "training path" rows give the hook NEW gradient objects before every call, as a training loop with
``opt.zero_grad(set_to_none=True)`` does: at the same addresses (the caching allocator hands the same blocks
back), cycling between two sets of addresses, or at addresses not seen in the last 64 calls. Assigning the
``.grad`` attributes costs time of its own: those rows are (assignment + hook) minus the assignment alone,
measured round-robin. The "cpu" rows run the native backend, whose kernel runs synchronously on the CPU and
would swamp the host cost on the real list: they take as many tensors as the list, of 2 elements each, and
the op alone on those tensors is timed beside them (the hook's native steady path calls the op from C++,
where no Python stub can stand in for it). The last two rows time a
hook's first and second call after ``register()``: its caches are built on the first. The "caches evicted"
rows time the hook (on the first 1, 20 and all tensors of the list) right after touching EVICT_BYTES of
memory, as a training step's forward and backward passes on this CPU do, beside the same calls warm: what a
cold call costs for the list's size and what it costs whatever the size (the call path's code and objects).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernel module is imported

import torch

import znorm_kernels
from bench.param_lists import get_list
from bench.suite import NullStepOptimizer
from bench.timing import host_time, host_times
from znorm_kernels import validation
from znorm_kernels.backends import triton_kernels
from znorm_kernels.check_cache import recent_checks

EVICT_BYTES = 64 << 20  # above the development CPU's L2 and L3 together (2 + 32 MiB)


class _NoCompiled:
    """Stands in for Triton's ``CompiledKernel``: ``compiled[grid](*args, stream=...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches nothing. Given the real kernel, it
    returns a compiled kernel that launches nothing either, which the direct launcher keeps as it keeps
    Triton's on a GPU (``triton_launch``), so the host path timed is the one a GPU host takes after the
    first launch; without it, None, as under the interpreter (every launch through the kernel object)."""

    def __init__(self, kernel=None) -> None:
        if kernel is not None:
            self.arg_names = kernel.arg_names
        self.compiled = _NoCompiled() if kernel is not None else None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.compiled


class _Feed:
    """New gradient objects for ``params`` at every call: aliases of one of ``sets`` (lists of storages, one
    per parameter), taken in turn; each call makes new tensor objects, like autograd after
    ``zero_grad(set_to_none=True)``."""

    def __init__(self, params: list[torch.nn.Parameter], sets: list[list[torch.Tensor]]) -> None:
        self.params, self.sets, self.calls = params, sets, 0

    def __call__(self) -> None:
        source = self.sets[self.calls % len(self.sets)]
        self.calls += 1
        for p, g in zip(self.params, source):
            p.grad = g.detach()  # a new tensor object at g's address, with g's sizes and strides


def _shifted_sets(shapes: list, count: int) -> list[list[torch.Tensor]]:
    """``count`` sets of gradients, each set at addresses no other set uses: views of one flat buffer
    at offsets shifted by 512 bytes per set (the allocator's alignment)."""
    sizes = [max(1, torch.Size(s).numel()) for s in shapes]
    padded = [-(-n // 128) * 128 for n in sizes]  # 512-byte aligned slots
    total = sum(padded)
    flat = torch.randn(total + 128 * count)
    sets = []
    for k in range(count):
        offset, views = 128 * k, []
        for s, n, pad in zip(shapes, sizes, padded):
            views.append(flat[offset : offset + n].view(s))
            offset += pad
        sets.append(views)
    return sets


def _training_rows(shapes: list, backend: str) -> dict:
    """(feed, feed + hook) pairs: the hook on new gradient objects every call (see the module docstring)."""
    rows = {}
    for name, count in (("same addresses", 1), ("2 sets of addresses in turn", 2), ("new addresses", 64)):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = torch.optim.SGD(params, lr=0.0)
        handle = znorm_kernels.register(opt, backend=backend)
        hook = opt._optimizer_step_pre_hooks[handle.id]
        sets = _shifted_sets(shapes, count)
        feed = _Feed(params, sets)
        feed_then_hook = _Feed(params, sets)  # its own turn of the sets (the two calls alternate)

        def both(feed=feed_then_hook, hook=hook, opt=opt):
            feed()
            hook(opt, (), {})

        rows[f"hook call, {backend}, new gradient objects: {name}"] = (feed, both)
    return rows


def _count_rows(shapes: list, counts: tuple[int, ...] = (20, 1000)) -> dict:
    """The hook on unchanged gradients of lists of ``counts`` tensors (the list's shapes over and over): how
    its cost grows with the number of tensors."""
    rows = {}
    for count in counts:
        params = [torch.nn.Parameter(torch.zeros(shapes[i % len(shapes)])) for i in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.SGD(params, lr=0.0)
        hook = opt._optimizer_step_pre_hooks[znorm_kernels.register(opt, backend="triton").id]
        rows[f"hook call, triton, {count} tensors (unchanged gradients)"] = lambda hook=hook, opt=opt: hook(
            opt, (), {}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--list", default="resnet56")
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    triton_kernels.znorm_queue_kernel = NoLaunch(triton_kernels.znorm_queue_kernel)
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
        "input checks and grouping alone": lambda: validation.collect_indices(grads),
        # the same without the cache of recent checks (new tensor objects each call, or a first call)
        "znorm_(grads, backend='triton'), checks uncached": lambda: (
            recent_checks.clear(),
            znorm_kernels.znorm_(grads, backend="triton"),
        ),
        "input checks and grouping alone, uncached": lambda: validation.check_and_group(
            grads, None, "znorm_"
        ),
    }
    # The native CPU backend on as many tensors of 2 elements (see the module docstring).
    tiny = [(2,)] * len(shapes)
    cpu_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(s)) for s in tiny], lr=0.0)
    for p in cpu_opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    cpu_grads = [p.grad for p in cpu_opt.param_groups[0]["params"]]
    cpu_hook = cpu_opt._optimizer_step_pre_hooks[znorm_kernels.register(cpu_opt, backend="cpu").id]
    rows[f"hook call, cpu, {len(tiny)} tensors of 2 elements (unchanged gradients)"] = lambda: cpu_hook(
        cpu_opt, (), {}
    )
    rows["(the cpu op alone on those tensors)"] = lambda: torch.ops.znorm_kernels_C.znorm_(
        cpu_grads, 1e-10, 0.0, None, None
    )
    rows.update(_count_rows(shapes))
    training = {**_training_rows(shapes, "triton"), **_training_rows(tiny, "cpu")}
    for fn in rows.values():  # warm up: plans built, caches filled
        fn()
    print(f"{args.list}: {len(params)} tensors; torch {torch.__version__}; median of {args.repeats} calls")
    print("| path | host µs per call |\n|---|---|")
    for name, fn in rows.items():
        seconds, _ = host_time(fn, "cpu", reps=args.repeats, max_s=float("inf"))
        print(f"| {name} | {seconds * 1e6:.1f} |")
    for name, (feed, both) in training.items():
        for _ in range(3):  # warm up: plans built for the first sets
            both()
        (feed_s, _), (both_s, _) = host_times([feed, both], "cpu", reps=args.repeats, max_s=float("inf"))
        print(f"| {name} | {(both_s - feed_s) * 1e6:.1f} |")
    print(f"| (assigning the .grad of {len(shapes)} parameters, subtracted above) | {feed_s * 1e6:.1f} |")
    first, second = _first_calls(shapes, max(5, args.repeats // 50))
    print(f"| hook call, triton, first after register() (cold caches) | {first:.1f} |")
    print(f"| hook call, triton, second after register() | {second:.1f} |")
    for k, (warm, cold) in _evicted_rows(shapes, args.repeats).items():
        what = f"hook call, triton, first {k} tensors" if k else "no hook (torch's step wrapper alone)"
        print(f"| {what}: warm / caches evicted | {warm:.1f} / {cold:.1f} |")


def _evicted_rows(shapes: list, repeats: int) -> dict[int, tuple[float, float]]:
    """Median µs of a hook call (a step of an optimizer that does nothing else) on the first k tensors of
    the list, warm (calls back to back) and with the caches evicted before each call (EVICT_BYTES touched);
    k = 0: the same optimizer's step with no hook, over one tensor."""
    buf = torch.zeros(EVICT_BYTES, dtype=torch.uint8)
    out = {}
    for k in sorted({0, 1, min(20, len(shapes)), len(shapes)}):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes[: max(k, 1)]]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = NullStepOptimizer(params)
        handle = znorm_kernels.register(opt, backend="triton") if k else None
        for _ in range(5):
            opt.step()
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):
            for evict, into in ((False, times[0]), (True, times[1])):
                if evict:
                    buf.add_(1)
                start = time.perf_counter()
                opt.step()
                into.append((time.perf_counter() - start) * 1e6)
        if handle is not None:
            handle.remove()
        out[k] = (statistics.median(times[0]), statistics.median(times[1]))
    return out


def _first_calls(shapes: list, rounds: int) -> tuple[float, float]:
    """Median µs of a hook's first and second call after ``register()`` (new gradient objects each call):
    what a training loop pays once, and what a benchmark that re-registers every step would pay each time."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = torch.optim.SGD(params, lr=0.0)
    feed = _Feed(params, _shifted_sets(shapes, 1))
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds + 1):  # the first round also fills process-wide caches (plans): not counted
        handle = znorm_kernels.register(opt, backend="triton")
        hook = opt._optimizer_step_pre_hooks[handle.id]
        for k in range(2):
            feed()
            start = time.perf_counter()
            hook(opt, (), {})
            times[k].append((time.perf_counter() - start) * 1e6)
        handle.remove()
    return statistics.median(times[0][1:]), statistics.median(times[1][1:])


if __name__ == "__main__":
    main()

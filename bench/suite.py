"""The measurement of one (parameter list, dtype, device) case: accuracy check, then every method timed.

``run_case`` makes the gradients (random, a different scale and offset per tensor, never zeros), checks each
of our backends against the float64 formula (raising ``AccuracyError`` when one is off: a benchmark of a
wrong kernel is worthless), then times every requested method on the same tensors: device time (on CUDA twice:
``do_bench``'s, and with the GPU kept busy ahead of the call, bench.timing.device_time_gpu_bound), host time
per ``optimizer.step()`` through the hook, launches per call. It returns one dict per method (a "row"); the
derived columns (GB/s, fraction of copy bandwidth, speed-ups) are filled in by bench/report.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.alternatives import EPS, Method, alternative_method, our_method
from bench.param_lists import ParamList
from bench.timing import count_launches, device_time_gpu_bound, device_times, host_time, host_times, sync
from znorm_kernels.accuracy import AccuracyError, z_error, z_float64

__all__ = ["CaseOptions", "NullStepOptimizer", "make_grads", "run_case"]


class NullStepOptimizer(torch.optim.Optimizer):
    """An optimizer whose ``step()`` does nothing but run its step pre-hooks (through torch's own hook
    machinery): timing its ``step()`` gives a hook's cost without the update's own work."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure=None) -> None:  # type: ignore[override]
        return None


def make_grads(
    shapes: Iterable[tuple[int, ...]], device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> list[Tensor]:
    """Random gradients, each tensor with its own scale (1e-4..1e-1) and offset (a fraction of its scale)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for shape in shapes:
        scale = 10 ** (-4 + 3 * torch.rand((), generator=gen, device=device))
        offset = 0.2 * scale * torch.randn((), generator=gen, device=device)
        x = torch.randn(shape, generator=gen, device=device) * scale + offset
        out.append(x.to(dtype))
    return out


@dataclass
class CaseOptions:
    reps: int = 50  # upper bound on timed repeats per measurement (CPU wall clock, host time)
    max_s: float = 2.0  # time cap per measurement on the CPU
    check: bool = True
    seed: int = 0
    progress: Callable[[str], None] = field(default=lambda text: None)
    checked: dict = field(default_factory=dict)  # (list, dtype, backend) -> max abs error of the check pass
    deadline: float | None = None  # time.monotonic() after which optional (compiled) methods are skipped
    # Count launches inside each case (torch.profiler). On CUDA the bench counts them in a last pass instead
    # (run_case(count_only=True)): once the profiler has traced CUDA, Kineto keeps CUPTI subscribed for the
    # life of the process (pytorch/pytorch#144455), which slows every later launch, so host times and the
    # training step measured after it would be inflated.
    count_launches: bool = True
    # CUDA only: the second device time, with the GPU busy ahead of each call (device_time_gpu_bound), per
    # method and for the copy: at most ``reps`` calls and about this many seconds of GPU time (0: not taken).
    busy_max_s: float = 0.25


def _row(plist: ParamList, dtype: torch.dtype, device: torch.device, method: str, ours: bool) -> dict:
    return {
        "list": plist.name,
        "label": plist.label,
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": plist.tensors,
        "elements": plist.elements,
        "device": device.type,
        "method": method,
        "ours": ours,
        "device_us": None,
        "device_busy_us": None,  # CUDA: device_time_gpu_bound's median
        "busy_reps": None,
        "busy_starved": None,  # of busy_reps, the calls the GPU reached before the host had enqueued them
        "hook_us": None,
        "hook_host_us": None,
        "hook_host_alone_us": None,  # CUDA, our native backends: repeats of this hook alone (warm caches)
        "launches": None,
        "launches_what": "",
        "max_err": None,
        "error": None,
    }


def _error_text(err: BaseException, prefix: str = "") -> str:
    """A row's error cell: the exception's type and first line, kept short."""
    return f"{prefix}{type(err).__name__}: {err}".splitlines()[0][:300]


def run_case(
    plist: ParamList,
    dtype: torch.dtype,
    device: torch.device,
    methods: list[str],
    backends: list[str],
    opts: CaseOptions,
    check_only: bool = False,
    copy_into: dict | None = None,
    count_only: bool = False,
) -> list[dict]:
    """Rows for the alternatives ``methods`` and our ``backends`` on ``plist`` in ``dtype`` on ``device``.

    Our backends are checked first (AccuracyError if one is outside contract rule 10's tolerance; with
    ``check_only`` nothing else is done); an alternative that fails to build (e.g. compilation) gets a row
    with its error instead of times. With ``copy_into``, a ``copy_`` of the same bytes between two buffers is
    timed alongside the methods (round-robin with them on the CPU) and its figures stored there. With
    ``count_only`` the methods are built (not checked, not timed) and only their launches counted.
    """
    inputs = make_grads(plist.shapes, device, dtype, opts.seed)
    grads = [x.clone() for x in inputs]

    def restore() -> None:
        with torch.no_grad():
            for g, x in zip(grads, inputs):
                g.copy_(x)

    key = (plist.name, str(dtype), str(device))
    dtype_name = str(dtype).removeprefix("torch.")
    rows = []
    built: list[tuple[dict, Method]] = []
    expected: list[Tensor] = []

    def error_of_result() -> tuple[float, float]:
        if not expected:  # computed once per case, shared by every method checked
            expected.extend(z_float64(x, EPS) for x in inputs)
        return z_error(grads, expected)

    for name in backends:
        row = _row(plist, dtype, device, name, True)
        m = our_method(name, grads)
        row["max_err"] = opts.checked.get((plist.name, dtype_name, name))
        if opts.check and row["max_err"] is None and not count_only:
            opts.progress(f"{plist.name} {row['dtype']} check {name}")
            restore()
            m.run()
            sync(device)
            err, excess = error_of_result()
            row["max_err"] = opts.checked[(plist.name, dtype_name, name)] = err
            if not excess <= 0:
                raise AccuracyError(
                    f"backend {name!r} on {plist.name} ({row['dtype']}, {device.type}): max abs z error "
                    f"{err:.3g} exceeds contract rule 10's tolerance by {excess:.3g}"
                )
        built.append((row, m))
    if check_only:
        return [row for row, _ in built]
    for name in methods:
        row = _row(plist, dtype, device, name, False)
        rows.append(row)
        if "compiled" in name and opts.deadline is not None and time.monotonic() > opts.deadline:
            row["error"] = "skipped: time budget spent"
            continue
        opts.progress(f"{plist.name} {row['dtype']} build {name}")
        try:
            restore()
            m = alternative_method(name, grads, key)
            restore()
            m.run()
            sync(device)
            if not count_only:
                row["max_err"] = error_of_result()[0]
        except Exception as err:
            row["error"] = _error_text(err)
            continue
        built.append((row, m))
    rows += [row for row, _ in built if row["ours"]]
    expected.clear()  # free the float64 copies before timing

    if not built:
        return rows
    if count_only:
        for row, m in built:
            row["launches"], row["launches_what"] = count_launches(m.run, device, warm=False)
        return rows
    opts.progress(f"{plist.name} {dtype_name} time {', '.join(row['method'] for row, _ in built)}")
    fns = [m.run for _, m in built]
    if copy_into is not None:
        n = max(1, plist.elements * inputs[0].element_size() // 4)
        src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
        fns.insert(0, lambda: dst.copy_(src))
    busy: list = [None] * len(fns)
    if device.type == "cuda":  # one at a time: a failure costs only that method's figures
        times: list[float | Exception] = []
        for i, fn in enumerate(fns):
            try:
                times.append(device_times([fn], device, reps=opts.reps, max_s=opts.max_s)[0])
            except Exception as err:
                times.append(err)
                continue
            if opts.busy_max_s > 0:
                try:
                    busy[i] = device_time_gpu_bound(fn, device, reps=opts.reps, max_s=opts.busy_max_s)
                except Exception as err:  # keep do_bench's figure; say why the second one is missing
                    busy[i] = err
    else:  # round-robin, so that a shared machine's load hits every method alike
        try:
            times = list(device_times(fns, device, reps=opts.reps, max_s=opts.max_s))
        except Exception as err:
            times = [err] * len(fns)
    if copy_into is not None:
        t, b = times.pop(0), busy.pop(0)
        if not isinstance(t, Exception):
            copy_into.update(copy_bytes=4 * n, copy_us=t * 1e6, copy_gbps=2 * 4 * n / t / 1e9)
        if b is not None and not isinstance(b, Exception):
            copy_into.update(copy_busy_us=b.us, copy_busy_gbps=2 * 4 * n / (b.us * 1e-6) / 1e9)
        del src, dst
    for (row, _), t, b in zip(built, times, busy):
        if isinstance(t, Exception):
            row["error"] = _error_text(t)
        else:
            row["device_us"] = t * 1e6
        if isinstance(b, Exception):
            row["busy_error"] = _error_text(b)
        elif b is not None:
            row["device_busy_us"], row["busy_reps"], row["busy_starved"] = b.us, b.reps, b.starved
    built = [(row, m) for row, m in built if not row["error"]]
    if not built:
        return rows
    if opts.count_launches:
        for row, m in built:
            row["launches"], row["launches_what"] = count_launches(m.run, device, warm=False)
    opts.progress(f"{plist.name} {dtype_name} host time through the hook")
    params = [torch.nn.Parameter(torch.empty_like(x), requires_grad=True) for x in inputs]
    for p, g in zip(params, grads):
        p.grad = g  # the very tensors every method normalizes
    optimizers = [NullStepOptimizer(params) for _ in built]
    handles = [m.hook(opt) for opt, (_, m) in zip(optimizers, built)]
    try:
        # The first step of each is its warm-up only where the hook path has something to set up.
        steps = [opt.step for opt in optimizers]
        hosts = host_times(steps, device, reps=opts.reps, max_s=opts.max_s, warm=device.type == "cuda")
        for (row, _), (synced, enqueue) in zip(built, hosts):
            row["hook_us"], row["hook_host_us"] = synced * 1e6, enqueue * 1e6
        # Round-robin, each hook runs right after the others (the eager loop, the reference), which leave the
        # CPU's caches cold: a 53 µs call measured 345-444 µs so on the dev CPU. PERF.md's host time is many
        # repeats of the call: our kernels' hooks again, each in a block of its own.
        if device.type == "cuda":
            for (row, _), step in zip(built, steps):
                if row["ours"] and row["method"] in ("triton", "cuda"):
                    _, enqueue = host_time(step, device, reps=opts.reps, max_s=opts.max_s)
                    row["hook_host_alone_us"] = enqueue * 1e6
    except Exception as err:
        for row, _ in built:
            row["error"] = _error_text(err, "hook: ")
    finally:
        for handle in handles:
            handle.remove()
    return rows

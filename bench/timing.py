"""Timing utilities shared by the benchmarks: device time, host time, copy bandwidth, launch counts.

- ``device_time``: on CUDA the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs;
  CUDA events directly when Triton is missing); on the CPU the median wall clock of repeated calls.
- ``device_time_gpu_bound`` (CUDA only): CUDA events around the call with the GPU kept busy ahead of it, so
  the events time the device work alone, not a GPU waiting for a slow host. Per timed call: the 256 MB L2
  flush that ``do_bench`` does, then ``torch.cuda._sleep`` long enough to cover the call's host time (twice
  the median enqueue time of 3 calls, plus 50 µs), the start event, the call, the end event; nothing waits in
  between, so the GPU falls ever further behind the host. Median over the calls. A call whose start event the
  GPU had already passed when the end event was enqueued is counted as "starved" (the host may still have
  been on the critical path there: e.g. a call that synchronizes, or more launches than the queue holds).
- ``host_time``: wall clock around a call with the device synchronized before; returns the median with the
  device synchronized after too ("synced": what the caller waits for) and without ("enqueue": the host's own
  cost; on the CPU, where work is synchronous, the two are the same measurement).
- ``count_launches``: one call under torch.profiler; on CUDA the kernels (and memsets/memcpys) it runs, on
  the CPU the aten operators it dispatches at top level (the CPU has no launches).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "FLUSH_BYTES",
    "CudaLayer",
    "GpuBound",
    "count_launches",
    "device_time",
    "device_time_gpu_bound",
    "device_times",
    "host_time",
    "host_times",
    "sync",
]


_OP_NAME = re.compile(r"^\w+::\w+")


def sync(device: torch.device | str) -> None:
    """Wait for all queued work on ``device`` (nothing to do on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _wall_median(fn: Callable[[], object], reps: int, max_s: float, min_reps: int = 3) -> float:
    fn()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + max_s
    while len(times) < reps and (len(times) < min_reps or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_time(
    fn: Callable[[], object], device: torch.device | str, *, reps: int = 50, max_s: float = 2.0
) -> float:
    """Median seconds of device work per call of ``fn`` (see the module docstring for how)."""
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_median(fn, reps)
        return do_bench(fn, return_mode="median") * 1e-3
    return _wall_median(fn, reps, max_s)


def _cuda_event_median(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


FLUSH_BYTES = 256 * 1024 * 1024  # what triton.testing.do_bench zeroes before each timed call


class CudaLayer:
    """The CUDA operations ``device_time_gpu_bound`` uses (tests pass a simulated GPU with the same methods):
    ``clock()`` host seconds, ``current()`` a context that makes the device current (the sleep and the events
    act on the current device's stream), ``sleep(cycles)``, ``flush_l2()``, ``event()`` (``record()``,
    ``query()``, ``synchronize()``, ``elapsed_time(end)`` in ms), ``synchronize()``."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._flush: torch.Tensor | None = None

    def current(self):
        return torch.cuda.device(self.device)

    def sleep(self, cycles: int) -> None:
        torch.cuda._sleep(int(cycles))

    def flush_l2(self) -> None:
        if self._flush is None:
            self._flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=self.device)
        self._flush.zero_()

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


@dataclass
class GpuBound:
    """``device_time_gpu_bound``'s result; times in µs."""

    us: float  # median of the timed calls
    min_us: float
    host_us: float  # median host time of the call's enqueue inside the timed loop
    reps: int
    starved: int  # timed calls whose start event the GPU had passed before their end event was enqueued
    sleep_us: float  # the sleep enqueued before each call


def _cycles_per_us(layer) -> float:
    """GPU clock cycles per µs of ``sleep``, read now (the clock follows the load)."""
    start, end = layer.event(), layer.event()
    layer.sleep(1000)
    start.record()
    layer.sleep(1_000_000)
    end.record()
    end.synchronize()
    return 1_000_000 / max(1.0, start.elapsed_time(end) * 1e3)


def device_time_gpu_bound(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    reps: int = 50,
    max_s: float = 0.25,
    min_reps: int = 3,
    layer=None,
) -> GpuBound:
    """Device time of ``fn`` with the GPU kept busy ahead of each call (see the module docstring).

    Bounded: at most ``reps`` timed calls, and no more than the estimated GPU time per call (sleep + flush +
    one synchronized call) fits in ``max_s`` seconds, but at least ``min_reps``; the host loop also stops at
    ``max_s``. Before them: one warm-up call, 3 synchronized calls (their enqueue time sets the sleep), the
    sleep's clock rate and one flush timed. ``layer``: the CUDA operations (default ``CudaLayer(device)``).
    Everything runs with ``device`` current, whichever device is current when it is called."""
    layer = CudaLayer(device) if layer is None else layer
    with layer.current():
        return _gpu_bound(fn, layer, reps, max_s, min_reps)


def _gpu_bound(fn: Callable[[], object], layer, reps: int, max_s: float, min_reps: int) -> GpuBound:
    clock = layer.clock
    fn()
    layer.synchronize()
    enqueue, synced = [], []
    for _ in range(3):
        t0 = clock()
        fn()
        enqueue.append(clock() - t0)
        layer.synchronize()
        synced.append(clock() - t0)
    # Twice the enqueue time: the clock rate read now may still rise, and the host's time varies.
    cover_us = 2 * statistics.median(enqueue) * 1e6 + 50
    cycles = int(cover_us * _cycles_per_us(layer))
    start, end = layer.event(), layer.event()
    start.record()
    layer.flush_l2()
    end.record()
    end.synchronize()
    flush_us = start.elapsed_time(end) * 1e3
    per_call_s = (cover_us + flush_us) * 1e-6 + statistics.median(synced)
    planned = max(min_reps, min(reps, int(max_s / max(per_call_s, 1e-9))))
    starts, ends, host, starved = [], [], [], 0
    deadline = clock() + max_s
    while len(starts) < planned and (len(starts) < min_reps or clock() < deadline):
        s, e = layer.event(), layer.event()
        layer.flush_l2()
        layer.sleep(cycles)
        s.record()
        t0 = clock()
        fn()
        host.append(clock() - t0)
        e.record()
        starved += bool(s.query())  # the GPU got to the start before the host had enqueued the whole call
        starts.append(s)
        ends.append(e)
    layer.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return GpuBound(
        us=statistics.median(times),
        min_us=min(times),
        host_us=statistics.median(host) * 1e6,
        reps=len(times),
        starved=starved,
        sleep_us=cover_us,
    )


def host_time(
    fn: Callable[[], object], device: torch.device | str, *, reps: int = 100, max_s: float = 2.0
) -> tuple[float, float]:
    """(synced, enqueue): median wall-clock seconds per call of ``fn``, device synchronized before each
    call, and after it (synced) or not (enqueue). On the CPU both are the same number."""
    return host_times([fn], device, reps=reps, max_s=max_s)[0]


def _interleaved(
    fns: list[Callable[[], object]], device: torch.device | str, reps: int, max_s: float, warm: bool = True
) -> list[tuple[float, float]]:
    """Round-robin timing: each round times one call of every fn in turn, so drift in a shared machine's
    load hits all alike. Returns (synced, enqueue) medians per fn."""
    if warm:
        for fn in fns:
            fn()
    sync(device)
    synced: list[list[float]] = [[] for _ in fns]
    enqueue: list[list[float]] = [[] for _ in fns]
    deadline = time.perf_counter() + max_s * len(fns)
    rounds = 0
    while rounds < reps and (rounds < 3 or time.perf_counter() < deadline):
        for i, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            fn()
            mid = time.perf_counter()
            sync(device)
            end = time.perf_counter()
            enqueue[i].append(mid - start)
            synced[i].append(end - start)
        rounds += 1
    return [(statistics.median(s), statistics.median(e)) for s, e in zip(synced, enqueue)]


def device_times(
    fns: list[Callable[[], object]], device: torch.device | str, *, reps: int = 50, max_s: float = 2.0
) -> list[float]:
    """``device_time`` of each fn; on the CPU measured round-robin (see ``host_times``)."""
    if torch.device(device).type == "cuda":
        return [device_time(fn, device, reps=reps, max_s=max_s) for fn in fns]
    return [synced for synced, _ in _interleaved(fns, device, reps, max_s)]


def host_times(
    fns: list[Callable[[], object]],
    device: torch.device | str,
    *,
    reps: int = 100,
    max_s: float = 2.0,
    warm: bool = True,
) -> list[tuple[float, float]]:
    """``host_time`` of each fn, measured round-robin: each round times one call of every fn in turn (so a
    shared machine's changing load hits all alike), at most ``reps`` rounds or about ``max_s`` seconds per
    fn (at least 3 rounds), after one warm-up call of each unless ``warm`` is False. On the CPU synced and
    enqueue are the same measurement."""
    out = _interleaved(fns, device, reps, max_s, warm)
    if torch.device(device).type != "cuda":
        return [(synced, synced) for synced, _ in out]
    return out


def count_launches(
    fn: Callable[[], object], device: torch.device | str, warm: bool = True
) -> tuple[int | None, str]:
    """(count, what was counted) for one call of ``fn`` under torch.profiler; (None, reason) if it fails.

    CUDA: kernels plus memsets and memcpys on the device; when the call replays CUDA graphs the text says
    how many graph launches issued them. CPU: dispatcher operators (``aten::*``, or an extension's registered
    ``ns::op``) called at top level, not from inside another operator; code compiled by Inductor calls its
    own C++ loops, which are no operators and count 0.
    """
    from torch.profiler import ProfilerActivity, profile

    is_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
    try:
        if warm:
            fn()
        sync(device)
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        events = prof.events()
    except Exception as err:  # the profiler is optional here: report, do not fail the run
        return None, f"profiler failed: {type(err).__name__}: {err}"
    if is_cuda:
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        graphs = sum(1 for e in events if e.name == "cudaGraphLaunch")
        what = "on CUDA: device kernels, memsets and memcpys per call"
        if graphs:
            what += f" from {graphs} CUDA graph launch(es)"
        return kernels, what
    ops = 0
    for e in events:
        if not _OP_NAME.match(e.name):
            continue
        parent = e.cpu_parent
        while parent is not None and not _OP_NAME.match(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            ops += 1
    return ops, "on the CPU: top-level dispatcher ops (aten::* or an extension's ns::op) per call"

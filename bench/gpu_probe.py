"""`python -m bench.gpu_probe --out DIR`: why is the Triton kernel slower than the CUDA backend? A short,
budgeted sweep of the Triton kernel's two launch knobs, for one lease of a GPU machine.

The first H100 run (bench/RESULTS.md, "First GPU run") measured the Triton kernel at 72.6 µs on ResNet-56's
167 float32 gradients (CUDA backend 36.2 µs, copy floor 15.2 µs) and at 57% of the copy rate on the 707 M
LLM-shaped list in bfloat16 (CUDA backend 81%). Per parameter list and dtype this times, on the same
gradients and in the same process:

- ``copy``: ``dst.copy_(src)`` of the list's bytes (the copy rate that "% copy" divides by, as bench/report.py
  computes it: 3 passes of the list's bytes are needed, a copy moves 2);
- the CUDA backend (``native.group_fn("cuda")``; on the CPU the "cpu" backend stands in);
- ``triton shipped``: ``triton_host.znorm_group_`` as it ships (``tiles_for(dtype, numels)``, and the grid
  the host picks from the occupancy the compiled kernel allows);
- ``triton b<block> u<unroll> p<programs>``: the same call with a tile configuration of its own
  (``tiles=Tiles(...)``): the block (elements a program holds in registers, and the chunk unit of large
  tensors), the unroll (tiles whose loads a large tensor's chunk issues together) and a fixed number of
  programs (the persistent grid). Unrolls: --unrolls (default 1, 2, 4); with unroll 1 also the next tile
  loaded while one is reduced (``Tiles.prefetch``, `` pf`` in the name; --prefetch, default both). Blocks:
  powers of two holding 1 to 8 16-byte vectors per thread at the kernel's warps (float32 1024-8192, bfloat16
  2048-16384). Programs: 1-4 per SM, and on lists of at most --few-programs-max-elements elements also fixed
  counts under the SM count (default 32, 66, 132). Optional: --warps (num_warps), --layouts (ticket layouts,
  LAYOUTS), and --mid-chunk-tiles (tiles per chunk of the tensors between the block and 2**20 elements, 1 as
  shipped; the name gets `` m<tiles>`` where it differs). Each triton row records the chunks
  (``extra.partials``) and the statistics tickets (``extra.stats_items``, runs of chunks cut for the variant's
  programs, tiles.ticket_runs) its plan had: the chunking in effect.

Nothing of the library is patched: a variant is a ``Tiles`` value, each with its own plans and its own kept
kernel, and what a launch did (its plan, its grid, the compiled kernel's registers, spills and shared memory,
and the programs per SM they allow, ``triton_grid.occupancy``) is read from ``triton_host.last_launch()``.

Every variant (backends included) is first run on fresh copies of the inputs and checked against the
float64 z-scores (znorm_kernels.accuracy.z_error, contract rule 10's tolerance), and on CUDA run again from
the same inputs and required to give the same bits (the kernels are deterministic; a difference means a
race): a variant that fails or raises is reported with its error and not timed.

Times, on CUDA, each the median over repeated calls:
- ``do_bench µs``: ``triton.testing.do_bench`` (L2 flushed before each call), as bench/timing.py measures the
  device times in bench/RESULTS.md;
- ``backlog µs``: CUDA events around the call with the GPU kept busy (the same 256 MB L2 flush, then
  ``torch.cuda._sleep`` long enough to cover the host's enqueue time) before each timed call, so that the
  events time the device work alone, not a GPU waiting for a slow host: bench.timing.device_time_gpu_bound,
  the bench's "device µs (GPU busy ahead)" (its count of "starved" calls, where the GPU still got to the
  start event first, is kept in the row's extra). If do_bench µs is well above backlog µs, the device time
  in RESULTS.md includes host time;
- ``host µs``: wall clock of the call's enqueue (no synchronization).
On the CPU (a rehearsal under TRITON_INTERPRET=1, meaningless timings) both device times are wall clock.

Budget: --budget-s (default 90) for the whole sweep. Each (list, dtype) case gets an equal share of what is
left; a case runs its references and the shipped kernel first, then the variants that differ from the
shipped ones in one knob, then the rest, and skips what its share does not cover. SIGTERM or SIGINT (e.g.
`timeout`) stops the run after writing what it has. DIR/gpu_probe.md and DIR/gpu_probe.json are rewritten
after every variant. Exit code: 0 done, 1 a check failed (the rest still ran), 2 no device, 3 stopped early.

`python -m bench.gpu_probe --ncu-target LIST DTYPE BACKEND` (for bench/gpu_profile.sh): makes the list's
gradients, calls the backend (triton or cuda, as shipped) --ncu-warmup times, synchronizes, then
--ncu-calls more times, and exits: Nsight Compute skips the warm-up launches (compilation, and the Triton
host's first launch, whose grid comes before it has read the compiled kernel's occupancy).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.param_lists import get_list
from bench.suite import make_grads
from bench.timing import CudaLayer, device_time_gpu_bound
from znorm_kernels.accuracy import z_error, z_float64
from znorm_kernels.backends.tiles import LARGE_CHUNK, Tiles, tiles_for

EPS = 1e-10  # bench.alternatives.EPS: what the benchmark normalizes with
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Ticket layouts (--layouts): "runs" as shipped since #23 (guided runs of chunks, large tensors' chunks from 8
# tiles); "chunks" the layout before it (one ticket per chunk, 32-tile chunks above 2**20 elements), so
# that one run measures what #23's layout changed, side by side.
LAYOUTS = {"runs": {}, "chunks": {"run": 1, "large_min_chunk": LARGE_CHUNK}}
CPU_FAKE_SMS = 2  # the CPU rehearsal's "SM count", so per-SM grids have something to multiply
MAX_VECTORS_PER_THREAD = 8


class Stop(Exception):
    """SIGTERM/SIGINT, or the budget: save what there is and stop."""


@dataclass
class Variant:
    name: str
    kind: str  # "copy", "native", "triton"
    block: int | None = None  # None: as shipped
    programs: int | None = None  # None: as shipped
    warps: int | None = None  # None: as shipped
    per_sm: int | None = None  # when programs was chosen as a multiple of the SM count
    unroll: int | None = None  # None: as shipped
    prefetch: bool | None = None  # None: as shipped
    mid_tiles: int | None = None  # None: as shipped (tiles_for's mid_chunk)
    layout: str = "runs"  # a name of LAYOUTS

    def tiles(self) -> Tiles | None:
        """The variant's tile configuration (None: the shipped one, tiles_for)."""
        if self.block is None:
            return None
        return Tiles(self.block, self.unroll or 1, prefetch=bool(self.prefetch),
                     mid_chunk=self.mid_tiles or 1, num_warps=self.warps or 8, programs=self.programs,
                     **LAYOUTS[self.layout])  # fmt: skip


@dataclass
class Row:
    list: str
    dtype: str
    variant: str
    kind: str
    block: int | None = None
    programs: int | None = None
    warps: int | None = None
    status: str = "pending"  # ok, FAILED CHECK, ERROR, skipped
    error: str | None = None
    max_err: float | None = None
    do_bench_us: float | None = None
    backlog_us: float | None = None
    host_us: float | None = None
    frac_copy: float | None = None  # by do_bench times, as bench/report.py
    frac_copy_backlog: float | None = None
    regs: int | None = None
    spills: int | None = None
    shared: int | None = None
    fits_per_sm: int | None = None
    shipped_programs: int | None = None  # the grid the host picked (the shipped variant)
    wall_s: float | None = None
    extra: dict = field(default_factory=dict)
    unroll: int | None = None
    prefetch: bool | None = None
    mid_tiles: int | None = None
    layout: str | None = None


# --- timing -----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """The three measurements of the module docstring, for one device. The backlog figure is
    bench.timing.device_time_gpu_bound (the L2 flush, then a sleep covering the host, before each call)."""

    def __init__(self, device: torch.device, max_s: float, reps: int) -> None:
        self.device, self.max_s, self.reps = device, max_s, reps
        self.cuda = device.type == "cuda"
        self.layer = CudaLayer(device) if self.cuda else None

    def measure(self, fn: Callable[[], object]) -> dict:
        if not self.cuda:
            return self._wall(fn)
        from triton.testing import do_bench

        rep_ms = max(5.0, 1000 * self.max_s)
        out = {"do_bench_us": do_bench(fn, warmup=rep_ms / 4, rep=rep_ms, return_mode="median") * 1e3}
        out.update(self._backlogged(fn))
        return out

    def _wall(self, fn) -> dict:
        fn()
        times = []
        deadline = time.perf_counter() + self.max_s
        while len(times) < self.reps and (len(times) < min(3, self.reps) or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times) * 1e6
        return {"do_bench_us": t, "backlog_us": t, "host_us": t, "reps": len(times)}

    def _backlogged(self, fn) -> dict:
        r = device_time_gpu_bound(
            fn, self.device, reps=self.reps, max_s=self.max_s, min_reps=min(5, self.reps), layer=self.layer
        )
        return {
            "backlog_us": r.us,
            "backlog_min_us": r.min_us,
            "host_us": r.host_us,
            "reps": r.reps,
            "starved": r.starved,
            "sleep_us": r.sleep_us,
        }


# --- the sweep --------------------------------------------------------------------------------------------


def valid_blocks(blocks: list[int], dtype: torch.dtype, warps: int) -> list[int]:
    """Powers of two with 1 to MAX_VECTORS_PER_THREAD 16-byte vectors per thread at ``warps`` warps."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    lo = 32 * warps * vec
    return [b for b in blocks if b & (b - 1) == 0 and lo <= b <= MAX_VECTORS_PER_THREAD * lo]


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_FAKE_SMS


def grid_variants(
    args,
    plist,
    dtype,
    device,
    shipped_block: int,
    shipped_programs: int | None,
    shipped_unroll: int = 1,
    shipped_mid: int = 1,
    shipped_prefetch: bool = False,
) -> list[Variant]:
    """The triton variants of this case, those that differ from the shipped kernel in one knob first."""
    sms = sm_count(device)
    out: list[Variant] = []
    for warps in args.warps:
        for block in valid_blocks(args.blocks, dtype, warps):
            seen = set()
            counts = [(p * sms, p) for p in args.per_sm]
            if plist.elements <= args.few_programs_max_elements:
                counts += [(p, None) for p in args.programs]
            for programs, per_sm in counts:
                if programs in seen:
                    continue
                seen.add(programs)
                loads = [(u, pf) for u in args.unrolls for pf in args.prefetch if u == 1 or not pf]
                for unroll, prefetch in loads:
                    for mid in args.mid_chunk_tiles or [shipped_mid]:
                        for layout in args.layouts:
                            name = f"triton b{block} u{unroll}{' pf' if prefetch else ''} p{programs}" + (
                                f" w{warps}" if warps != 8 else ""
                            )
                            name += f" m{mid}" if mid != shipped_mid else ""
                            name += f" {layout}" if layout != "runs" else ""
                            out.append(
                                Variant(
                                    name, "triton", block, programs, warps, per_sm, unroll, bool(prefetch),
                                    mid, layout,
                                )
                            )  # fmt: skip

    def distance(v: Variant) -> int:
        return (
            (v.block != shipped_block)
            + (v.programs != shipped_programs)
            + (v.warps != 8)
            + (v.unroll != shipped_unroll)
            + (v.prefetch != shipped_prefetch)
            + (v.mid_tiles != shipped_mid)
            + (v.layout != "runs")
        )

    return sorted(out, key=distance)  # stable: within a distance, the order above


def _kernel_facts(compiled, warps: int, device: torch.device) -> dict:
    if compiled is None:
        return {}
    out = {}
    for key, get in (
        ("regs", lambda k: k.n_regs),
        ("spills", lambda k: k.n_spills),
        ("shared", lambda k: k.metadata.shared),
    ):
        with contextlib.suppress(Exception):
            out[key] = int(get(compiled))
    if device.type == "cuda" and out.get("regs"):
        from znorm_kernels.backends.triton_grid import occupancy

        props = torch.cuda.get_device_properties(device)
        out["fits_per_sm"] = occupancy(out["regs"], out.get("shared", 0), warps, props)
    return out


class Probe:
    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        self.rows: list[Row] = []
        self.cases: dict[str, dict] = {}
        self.meta = environment(device)
        self.meta["argv"] = sys.argv[1:]
        self.meta["budget_s"] = args.budget_s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.stopped: str | None = None
        self.timer = Timer(device, args.max_seconds, args.reps)

    # -- output
    def save(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.meta["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.meta["stopped"] = self.stopped
        doc = {"meta": self.meta, "cases": self.cases, "rows": [asdict(r) for r in self.rows]}
        (out / "gpu_probe.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (out / "gpu_probe.md").write_text(self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [
            "# Triton kernel probe (bench/gpu_probe.py)",
            "",
            f"{m.get('device_name')}, torch {m.get('torch')}, triton {m.get('triton')}; "
            f"commit {m.get('commit')}; {m.get('date')}; {m.get('elapsed_s')} s of a "
            f"{m.get('budget_s')} s budget" + (f"; STOPPED: {self.stopped}" if self.stopped else ""),
            "",
            "do_bench µs: triton.testing.do_bench median (L2 flushed), as RESULTS.md. backlog µs: events "
            "with the GPU kept busy before the call (device work alone, no host gaps). host µs: enqueue. "
            "% copy: rate of the 3 needed passes over the copy rate of the same bytes (do_bench; backlog).",
        ]
        for key, case in self.cases.items():
            lines += [
                "",
                f"## {key}: {case['tensors']} tensors, {case['elements'] / 1e6:,.2f} M elements; copy "
                f"{_fmt(case.get('copy_do_bench_us'))} µs do_bench, {_fmt(case.get('copy_backlog_us'))} µs "
                f"backlog; floor {_fmt(case.get('floor_us'))} µs; shipped: block "
                f"{case.get('shipped_block')}, unroll {case.get('shipped_unroll')}"
                f"{' with prefetch' if case.get('shipped_prefetch') else ''}, "
                f"{case.get('shipped_programs')} programs "
                f"({case.get('sms')} SMs)",
                "",
                "| variant | do_bench µs | backlog µs | host µs | % copy | % copy (backlog) | regs/spills | "
                "fits/SM | max err | status |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in self.rows:
                if f"{r.list} {r.dtype}" != key:
                    continue
                regs = f"{r.regs}/{r.spills}" if r.regs is not None else ""
                status = r.status + (f": {r.error}" if r.error else "")
                lines.append(
                    f"| {r.variant} | {_fmt(r.do_bench_us)} | {_fmt(r.backlog_us)} | {_fmt(r.host_us)} | "
                    f"{_pct(r.frac_copy)} | {_pct(r.frac_copy_backlog)} | {regs} | {r.fits_per_sm or ''} | "
                    f"{'' if r.max_err is None else f'{r.max_err:.1e}'} | {status[:160]} |"
                )
            best = _best(self.rows, key)
            if best:
                lines += ["", f"Best triton (backlog): {best}"]
        return "\n".join(lines) + "\n"

    def check_budget(self, deadline: float) -> None:
        if self.stopped:
            raise Stop(self.stopped)
        if time.monotonic() > deadline:
            raise Stop("budget")

    # -- one case
    def run_case(self, list_name: str, dtype_name: str, case_deadline: float) -> None:
        from znorm_kernels.backends import triton_host

        args, device = self.args, self.device
        dtype = DTYPES[dtype_name]
        plist = get_list(list_name)
        key = f"{list_name} {dtype_name}"
        elsize = torch.empty((), dtype=dtype).element_size()
        case = self.cases[key] = {
            "tensors": plist.tensors,
            "elements": plist.elements,
            "bytes_needed": 3 * elsize * plist.elements,
            "sms": sm_count(device),
        }
        t_setup = time.monotonic()
        inputs = make_grads(plist.shapes, device, dtype, args.seed)
        grads = [x.clone() for x in inputs]
        expected = [z_float64(x, EPS) for x in inputs]
        n = max(1, plist.elements * elsize // 4)
        bufs = [torch.randn(n, device=device), torch.empty(n, device=device)]  # copy source, destination
        case["copy_bytes"] = 2 * 4 * n
        _sync(device)
        case["setup_s"] = round(time.monotonic() - t_setup, 2)

        def restore() -> None:
            for g, x in zip(grads, inputs):
                g.copy_(x)

        native = "cuda" if device.type == "cuda" else "cpu"

        def call_for(v: Variant) -> Callable[[], object]:
            if v.kind == "copy":
                return lambda: bufs[1].copy_(bufs[0])
            if v.kind == "native":
                from znorm_kernels.backends import native as native_mod

                fn = native_mod.group_fn(native)
                return lambda: fn(grads, EPS, 0.0, None)
            tiles = v.tiles()
            # looked up at each call, so that a test can wrap it
            return lambda: triton_host.znorm_group_(grads, EPS, 0.0, None, tiles=tiles)

        def check(v: Variant, fn: Callable[[], object], row: Row) -> bool:
            """Run the variant on fresh copies of the inputs and check it; on CUDA run it again and require
            the same bits (the kernel is deterministic: a difference is a race). Fills the row's check and
            kernel fields; False when the variant must not be timed."""
            triton = v.kind == "triton"
            restore()
            fn()
            _sync(device)
            err, excess = z_error(grads, expected)
            launch = triton_host.last_launch() if triton else None
            differ = 0
            if device.type == "cuda":  # also the call after the host has read the kernel's occupancy
                first = [g.clone() for g in grads]
                restore()
                fn()
                _sync(device)
                differ = sum(1 for a, b in zip(first, grads) if not torch.equal(a, b))
                del first
            row.max_err = err
            if launch is not None:  # the plan, grid and kernel of the check's launch
                row.extra["stats_items"] = launch.plan.num_stats_items
                row.extra["partials"] = launch.plan.num_partials
                row.extra["small_items"] = launch.plan.num_small_items
                row.extra["grid_seen"] = [launch.programs]
                row.programs = launch.programs
                if v.block is None:
                    row.shipped_programs = launch.programs
                warps = launch.plan.tiles.num_warps
                for k, val in _kernel_facts(launch.kernel, warps, device).items():
                    setattr(row, k, val)
                compiled = getattr(getattr(launch.kernel, "metadata", None), "num_warps", None)
                if compiled is not None and compiled != warps:
                    raise RuntimeError(f"asked for {warps} warps, the kernel launched has {compiled}")
            if not excess <= 0 or differ:
                row.status = "FAILED CHECK"
                row.error = (
                    f"max abs z error {err:.3g}, over the tolerance by {excess:.3g}"
                    if not excess <= 0
                    else f"not deterministic: {differ} tensors differ between two runs (a race?)"
                )
                self.meta["failed_checks"] = self.meta.get("failed_checks", 0) + 1
                return False
            return True

        def run_variant(v: Variant, deadline: float) -> Row:
            row = Row(
                list_name, dtype_name, v.name, v.kind, v.block, v.programs, v.warps, unroll=v.unroll,
                prefetch=v.prefetch, mid_tiles=v.mid_tiles, layout=v.layout,
            )  # fmt: skip
            self.rows.append(row)
            if time.monotonic() > deadline or self.stopped:
                row.status = "skipped"
                row.error = "budget spent" if not self.stopped else self.stopped
                return row
            row.status = "running"  # what the files say if this variant hangs and the run is killed
            self.save()
            t0 = time.monotonic()
            try:
                fn = call_for(v)
                if v.kind != "copy" and not check(v, fn, row):
                    return row
                # each measurement warms up first (the check call compiled and learned the occupancy)
                times = self.timer.measure(fn)
            except Stop:
                row.status, row.error = "skipped", "stopped"
                raise
            except Exception as err:  # one variant's failure must not end the sweep
                if (
                    self.stopped
                ):  # the signal arrived inside code that wrapped our exception (Triton's interpreter)
                    row.status, row.error = "skipped", "stopped"
                    raise Stop(self.stopped) from err
                row.status = "ERROR"
                row.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                return row
            finally:
                row.wall_s = round(time.monotonic() - t0, 2)
            row.do_bench_us = times.get("do_bench_us")
            row.backlog_us = times.get("backlog_us")
            row.host_us = times.get("host_us")
            row.extra.update(
                {k: v for k, v in times.items() if k not in ("do_bench_us", "backlog_us", "host_us")}
            )
            row.status = "ok"
            return row

        try:
            global_deadline = self.deadline
            copy = run_variant(Variant("copy", "copy"), global_deadline)
            if copy.status == "ok":
                case["copy_do_bench_us"], case["copy_backlog_us"] = copy.do_bench_us, copy.backlog_us
                case["copy_gbps"] = case["copy_bytes"] / (copy.do_bench_us * 1e-6) / 1e9
                case["floor_us"] = case["bytes_needed"] / (case["copy_gbps"] * 1e9) * 1e6
            self.save()
            run_variant(Variant(native, "native"), global_deadline)
            self.save()
            shipped = run_variant(Variant("triton shipped", "triton"), global_deadline)
            tiles = tiles_for(dtype, [torch.Size(s).numel() for s in plist.shapes])
            case["shipped_block"] = tiles.block
            case["shipped_unroll"] = tiles.unroll
            case["shipped_prefetch"] = tiles.prefetch
            case["shipped_programs"] = shipped.programs
            case["shipped_mid_chunk_tiles"] = tiles.mid_chunk
            self.save()
            variants = grid_variants(
                args,
                plist,
                dtype,
                device,
                case["shipped_block"],
                shipped.programs,
                case["shipped_unroll"],
                case["shipped_mid_chunk_tiles"],
                case["shipped_prefetch"],
            )
            for v in variants:
                run_variant(v, case_deadline)
                self._fill_fracs(key)
                self.save()
                if self.stopped:
                    raise Stop(self.stopped)
        finally:
            self._fill_fracs(key)
            for held in (inputs, grads, expected, bufs):
                held.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def _fill_fracs(self, key: str) -> None:
        case = self.cases[key]
        for r in self.rows:
            if f"{r.list} {r.dtype}" != key or r.kind == "copy":
                continue
            if r.do_bench_us and case.get("copy_do_bench_us"):
                r.frac_copy = (case["bytes_needed"] / r.do_bench_us) / (
                    case["copy_bytes"] / case["copy_do_bench_us"]
                )
            if r.backlog_us and case.get("copy_backlog_us"):
                r.frac_copy_backlog = (case["bytes_needed"] / r.backlog_us) / (
                    case["copy_bytes"] / case["copy_backlog_us"]
                )

    def run(self) -> int:
        combos = [(lst, dt_) for lst in self.args.lists for dt_ in self.args.dtypes]
        for i, (lst, dt_) in enumerate(combos):
            if self.stopped or time.monotonic() > self.deadline:
                self.stopped = self.stopped or "budget"
                break
            share = (self.deadline - time.monotonic()) / (len(combos) - i)
            try:
                self.run_case(lst, dt_, time.monotonic() + share)
            except Stop as why:
                self.stopped = self.stopped or str(why)
            self.save()
            print(f"[gpu_probe] {lst} {dt_} done at {time.monotonic() - self.t0:.1f} s", file=sys.stderr)
        self.save()
        print(self.markdown())
        if self.stopped:
            return 3
        return 1 if self.meta.get("failed_checks") else 0


def _best(rows: list[Row], key: str) -> str | None:
    ok = [r for r in rows if f"{r.list} {r.dtype}" == key and r.kind == "triton" and r.status == "ok"]
    if not ok:
        return None
    best = min(ok, key=lambda r: r.backlog_us or math.inf)
    return f"{best.variant} ({_fmt(best.backlog_us)} µs, do_bench {_fmt(best.do_bench_us)} µs)"


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def environment(device: torch.device) -> dict:
    out = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "host": platform.node(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, sms=props.multi_processor_count)
    else:
        out["device_name"] = (
            f"CPU ({os.cpu_count()} cores), TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
        )
    out["commit"] = os.environ.get("GPU_CHECK_COMMIT") or _git_head()
    return out


def _git_head() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        return (head or "unknown") + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- the Nsight Compute driver ----------------------------------------------------------------------------


def ncu_target(list_name: str, dtype_name: str, backend: str, device: torch.device, warmup: int, calls: int):
    """Warm up, then call ``backend`` ``calls`` times on the list's gradients (see the module docstring)."""
    plist = get_list(list_name)
    grads = make_grads(plist.shapes, device, DTYPES[dtype_name], 0)
    if backend == "triton":
        from znorm_kernels.backends import triton_host

        fn = lambda: triton_host.znorm_group_(grads, EPS, 0.0, None)
    elif backend in ("cuda", "cpu"):
        from znorm_kernels.backends import native

        group = native.group_fn(backend)
        fn = lambda: group(grads, EPS, 0.0, None)
    else:
        raise SystemExit(f"unknown backend {backend!r} (triton, cuda, cpu)")
    for _ in range(warmup):
        fn()
    _sync(device)
    for _ in range(calls):
        fn()
    _sync(device)
    bad = sum(1 for g in grads if not bool(torch.isfinite(g).all()))
    print(f"[ncu-target] {list_name} {dtype_name} {backend}: {warmup} + {calls} calls; non-finite: {bad}")
    return 0 if bad == 0 else 1


# --- command line -----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="folder for gpu_probe.md and gpu_probe.json")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--lists", type=_names, default=["resnet56", "llm"])
    p.add_argument("--dtypes", type=_names, default=["float32", "bfloat16"])
    p.add_argument("--blocks", type=_ints, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--unrolls", type=_ints, default=[1, 2, 4], help="tiles loaded together in large chunks")
    p.add_argument(
        "--prefetch", type=_ints, default=[0, 1], help="with unroll 1: 0 as built, 1 the next tile in flight"
    )
    p.add_argument("--per-sm", type=_ints, default=[1, 2, 3, 4], help="programs per SM")
    p.add_argument("--programs", type=_ints, default=[32, 66, 132], help="fixed counts, small lists only")
    p.add_argument("--few-programs-max-elements", type=int, default=16_000_000)
    p.add_argument("--warps", type=_ints, default=[8], help="num_warps values (the kernel ships with 8)")
    p.add_argument(
        "--mid-chunk-tiles",
        type=_ints,
        default=None,
        help="tiles per chunk of tensors between the block and 2**20 elements (default: as shipped)",
    )
    p.add_argument(
        "--layouts",
        type=_names,
        default=["runs"],
        help=f"ticket layouts, of {sorted(LAYOUTS)} (default: runs)",
    )
    p.add_argument("--budget-s", type=float, default=90.0, help="for the whole sweep")
    p.add_argument("--max-seconds", type=float, default=0.1, help="per measurement (do_bench rep, backlog)")
    p.add_argument("--reps", type=int, default=50, help="at most this many backlogged (or CPU) calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ncu-target", nargs=3, metavar=("LIST", "DTYPE", "BACKEND"))
    p.add_argument("--ncu-warmup", type=int, default=3)
    p.add_argument("--ncu-calls", type=int, default=2)
    args = p.parse_args(argv)
    if args.ncu_target is None and not args.out:
        p.error("--out DIR is required (or --ncu-target LIST DTYPE BACKEND)")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}")
    if not set(args.layouts) <= set(LAYOUTS):
        p.error(f"--layouts takes names of {sorted(LAYOUTS)}, got {args.layouts}")
    if args.mid_chunk_tiles is not None and not all(m >= 1 for m in args.mid_chunk_tiles):
        p.error(f"--mid-chunk-tiles takes integers >= 1, got {args.mid_chunk_tiles}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu with TRITON_INTERPRET=1 to rehearse)", file=sys.stderr)
        return 2
    device = (
        torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    )
    if args.ncu_target:
        return ncu_target(*args.ncu_target, device, args.ncu_warmup, args.ncu_calls)
    probe = Probe(args, device)

    def on_signal(signum, frame):
        probe.stopped = f"signal {signum}"
        raise Stop(probe.stopped)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return probe.run()
    except Stop:
        probe.save()
        print(probe.markdown())
        return 3
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())

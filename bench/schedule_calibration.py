"""`python -m bench.schedule_calibration`: the schedule model (bench/schedule_model.py) against what the three
H100 runs measured, and its predictions for every list and kernel design.

Calibration points: every Triton row of the probes of the second and third H100 runs (ResNet-56 and the
707 M list, float32 and bfloat16; tiles of 1024 to 16384 elements, unrolls 1, 2 and 4, grids of 32 to 528
programs) and the third run's benchmark rows (ResNet-56/110/152, ResNet-50, the 100 M tensor), each with the
kernel design of its commit (chunking, unroll, ptxas spills) and its "GPU busy ahead" device time.

`--fit` fits the machine's constants (a coordinate search on the log of each constant, minimizing the mean
squared log error over the points) and prints them; the shipped constants are ``FITTED``. Without it the
command prints the fit's residuals per point group and the predictions (``--lists``, ``--designs``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from bench.param_lists import LIST_NAMES, get_list
from bench.schedule_model import Design, Machine, simulate

__all__ = ["DESIGNS", "FITTED", "Point", "numels_of", "points", "predict", "residuals"]

RECORDED = Path(__file__).parent / "recorded"
ELSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

# The machine's constants as fitted by `--fit` (see the log of the run that fitted them).
FITTED = Machine(
    l2_bw=1.509e6,
    launch=3.888,
    lat_dram=0.5476,
    lat_l2=0.002972,
    stat_fixed=2.0,
    norm_fixed=1.905,
    small_fixed=2.0,
    stat_tile=0.3,
    norm_tile=0.08696,
    spill=0.007143,
    merge_fixed=1.5,
    merge_partial=0.01613,
    wake=0.4792,
)


def _before_runs(dtype: str, numels: tuple[int, ...], **changes) -> Design:
    """The kernel as shipped from 2f7897e until #23: tiles of 8192, chunks of 32 tiles above 2**20 elements,
    loads of 2 tiles issued together where the list holds such a tensor; spills as Triton 3.6 compiled those
    variants on the third run (ptxas, aligned: unroll 2 44 bytes, unroll 1 12 float32 / 8 bfloat16)."""
    unroll = 2 if max(numels) > 1 << 20 else 1
    spills = 44 if unroll == 2 else (12 if dtype == "float32" else 8)
    return replace(Design(block=8192, unroll=unroll, large_chunk=32, spills=spills), **changes)


# Spill bytes per thread of the 8192-element tiles as ptxas (CUDA 13.0, sm_90a) reports them for Triton 3.6,
# the GPU machine's, aligned variants (bench/log/2026-12-07-dev-cpu-tile-loop.md): per tile loop, dtype and
# the list's loads (unroll 1, unroll 2, or prefetch where the list holds a tensor above 2**20 elements).
_SPILLS_36 = {
    "before": {"float32": (40, 164), "bfloat16": (24, 184)},
    "fused": {"float32": (28, 140), "bfloat16": (8, 140)},
    "prefetch": {"float32": (28, 164), "bfloat16": (8, 100)},
}


def _item2(dtype: str, numels: tuple[int, ...], loop: str) -> Design:
    """The kernel as shipped at 5a2790f (item 1's runs and partials, 8192-element tiles, loads of 2 tiles
    issued together in lists with a tensor above 2**20 elements), and item 2's tile loops: the fused
    reductions (two reductions per tile, the same loads), and those with the next tile in flight instead of
    the unroll. Spills as Triton 3.6 compiles each; the compute per tile is the fitted one for all three
    (the model has no term for the reductions' barriers: what they save is not in these figures)."""
    large = max(numels) > 1 << 20
    spills = _SPILLS_36[loop][dtype][1 if large else 0]
    prefetch = loop == "prefetch" and large
    unroll = 2 if large and not prefetch else 1
    return Design(block=8192, unroll=unroll, large_chunk=32, spills=spills, prefetch=prefetch, **_ITEM1)


# Kernel designs to predict (issue #23): the kernel as shipped until #23; item 1 as built and shipped since
# (partials of one tile up to 2**20 elements, above that of 8 tiles doubled until the tensor has at most
# 1024, at most 32; tickets over runs of them cut by guided self-scheduling with divisor 2 in the list's
# order, a record per chunk); its variants (partials from one tile, divisors 1 and 4, largest tensor
# first); item 2's loads in flight while a group is reduced.
_ITEM1 = {"runs": 2, "max_partials": 1024, "min_partial": 8}
DESIGNS: dict[str, Callable[[str, tuple[int, ...]], Design]] = {
    "until #23": _before_runs,
    "prefetch": lambda dtype, numels: _before_runs(dtype, numels, prefetch=True),
    "partials only": lambda dtype, numels: _before_runs(dtype, numels, max_partials=1024, min_partial=8),
    "runs k=2": lambda dtype, numels: _before_runs(dtype, numels, **_ITEM1),
    "runs k=2 partials from 1 tile": lambda dtype, numels: _before_runs(
        dtype, numels, **{**_ITEM1, "min_partial": 1}
    ),
    "runs k=1": lambda dtype, numels: _before_runs(dtype, numels, **{**_ITEM1, "runs": 1}),
    "runs k=4": lambda dtype, numels: _before_runs(dtype, numels, **{**_ITEM1, "runs": 4}),
    "runs k=2 largest first": lambda dtype, numels: _before_runs(dtype, numels, **_ITEM1, largest_first=True),
    "runs k=2 + prefetch": lambda dtype, numels: _before_runs(dtype, numels, **_ITEM1, prefetch=True),
    "shipped 5a2790f": lambda dtype, numels: _item2(dtype, numels, "before"),
    "fused reductions": lambda dtype, numels: _item2(dtype, numels, "fused"),
    "fused + prefetch": lambda dtype, numels: _item2(dtype, numels, "prefetch"),
    # tiles.LARGE_LOADS: float32 unrolls, 16-bit dtypes prefetch
    "shipped now": lambda dtype, numels: _item2(dtype, numels, "fused" if dtype == "float32" else "prefetch"),
}


@dataclass(frozen=True)
class Point:
    """One measured launch: where it comes from, its list and dtype, its design and grid, its device time."""

    source: str
    list_name: str
    dtype: str
    design: Design
    programs: int
    measured: float  # µs, GPU busy ahead


def numels_of(list_name: str) -> tuple[int, ...]:
    """The tensors' element counts of a parameter list of bench/param_lists.py."""
    return tuple(math.prod(s) for s in get_list(list_name).shapes)


def points() -> list[Point]:
    """Every recorded Triton measurement with the design of its commit."""
    out: list[Point] = []
    for run, large_chunk_of in (
        ("2026-11-27-h100-run2", lambda unroll: 16),  # c63c806: chunks of 16 tiles, no unroll
        ("2026-11-27-h100-run3", lambda unroll: 16 * unroll),  # 6a7b570: 16 groups of `unroll` tiles
    ):
        probe = json.loads((RECORDED / run / "gpu_probe.json").read_text())
        cases = probe["cases"]
        for row in probe["rows"]:
            if not row["variant"].startswith("triton"):
                continue
            if row["status"] != "ok" or row.get("backlog_us") is None:
                continue
            case = cases[f"{row['list']} {row['dtype']}"]
            block = row.get("block") or case["shipped_block"]
            unroll = row.get("unroll") or case.get("shipped_unroll") or 1
            programs = row.get("programs") or case["shipped_programs"]
            spills = row["spills"] or 0
            design = Design(block=block, unroll=unroll, large_chunk=large_chunk_of(unroll), spills=spills)
            out.append(Point(run + " probe", row["list"], row["dtype"], design, programs, row["backlog_us"]))
    bench = json.loads((RECORDED / "2026-11-27-h100-run3" / "results.json").read_text())
    spills = {"float32": 16, "bfloat16": 54}  # the run's shipped variants, from its probe
    for row in bench["rows"]:
        if row["method"] != "triton" or row["list"] in ("resnet56", "llm"):
            continue  # those two are the probe's, with more variants
        unroll = 2 if row["dtype"] == "float32" else 4
        design = Design(block=4096, unroll=unroll, large_chunk=16 * unroll, spills=spills[row["dtype"]])
        source = "2026-11-27-h100-run3 bench"
        out.append(Point(source, row["list"], row["dtype"], design, 264, row["device_busy_us"]))
    return out


def predict(point: Point, machine: Machine) -> float:
    return simulate(
        numels_of(point.list_name), ELSIZE[point.dtype], point.design, machine, point.programs
    ).time


def fitting_set(pts: list[Point], machine: Machine) -> list[Point]:
    """The points the fit uses: one per distinct simulation (grids above the resident programs run as the
    resident ones), leaving out the 707 M list's tiles below 4096 elements (slow to simulate), which then
    check the fit from outside it."""
    seen: dict[tuple, Point] = {}
    for p in pts:
        if p.list_name == "llm" and p.design.block < 4096:
            continue
        seen.setdefault((p.list_name, p.dtype, p.design, min(p.programs, machine.resident)), p)
    return list(seen.values())


def loss(pts: list[Point], machine: Machine) -> float:
    return sum(math.log(predict(p, machine) / p.measured) ** 2 for p in pts) / len(pts)


FITTED_FIELDS = (
    "l2_bw", "launch", "lat_dram", "lat_l2", "stat_fixed", "norm_fixed", "small_fixed", "stat_tile",
    "norm_tile", "spill", "merge_fixed", "merge_partial", "wake",
)  # fmt: skip


def fit(pts: list[Point], machine: Machine, rounds: int = 4, budget_s: float = 1e9) -> Machine:
    """Coordinate search over the log of each fitted constant (factors 2, 1.4, 1.15, 1.05 in turn)."""
    best = loss(pts, machine)
    deadline = time.monotonic() + budget_s
    for step in (2.0, 1.4, 1.15, 1.05)[:rounds]:
        improved = True
        while improved and time.monotonic() < deadline:
            improved = False
            for name in FITTED_FIELDS:
                for factor in (step, 1 / step):
                    trial = replace(machine, **{name: getattr(machine, name) * factor})
                    value = loss(pts, trial)
                    if value < best:
                        best, machine, improved = value, trial, True
                        break
        print(f"step {step}: rms log error {math.sqrt(best):.3f}", flush=True)
    return machine


def residuals(pts: list[Point], machine: Machine) -> list[tuple[Point, float]]:
    return [(p, predict(p, machine)) for p in pts]


def predictions(machine: Machine, lists: list[str], designs: list[str]) -> list[str]:
    """Markdown rows: per list, dtype and design, the modelled µs, its share of the one-launch floor (three
    passes of the list's bytes at the model's bandwidth, plus its launch), the programs' mean busy share and
    the tail (first program's exit to the last's)."""
    rows = [
        "| list | dtype | design | model µs | % of floor | busy | tail µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in lists:
        numels = numels_of(name)
        for dtype in ("float32", "bfloat16"):
            nbytes = ELSIZE[dtype] * sum(numels)
            bw = machine.l2_bw if nbytes <= machine.l2_bytes else machine.dram_bw
            floor = 3 * nbytes / bw + machine.launch
            for label in designs:
                r = simulate(numels, ELSIZE[dtype], DESIGNS[label](dtype, numels), machine)
                rows.append(
                    f"| {name} | {dtype} | {label} | {r.time:,.1f} | {floor / r.time:.0%} | {r.busy:.0%} "
                    f"| {r.tail:,.1f} |"
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.schedule_calibration", description=__doc__)
    parser.add_argument("--fit", action="store_true", help="fit the machine's constants and print them")
    parser.add_argument("--budget-s", type=float, default=1200.0)
    parser.add_argument("--lists", default=",".join(LIST_NAMES), help="lists to predict (comma-separated)")
    parser.add_argument("--designs", default=",".join(DESIGNS), help="designs to predict (comma-separated)")
    parser.add_argument("--no-residuals", action="store_true", help="predictions only")
    parser.add_argument(
        "--stat-tile-scale", type=float, default=1.0,
        help="predictions with the fitted per-tile statistics time scaled by this (a what-if for tile loops "
        "whose reductions the model has no term for)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    pts = points()
    machine = FITTED
    if args.fit:
        machine = fit(fitting_set(pts, machine), machine, budget_s=args.budget_s)
        values = ", ".join(f"{f.name}={getattr(machine, f.name):.4g}" for f in fields(machine))
        print(f"Machine({values})")
    if not args.no_residuals:
        print("| source | list | dtype | tiles, unroll, programs, spills | measured µs | model µs | error |")
        print("|---|---|---|---|---|---|---|")
        for p, pred in residuals(pts, machine):
            d = p.design
            print(
                f"| {p.source} | {p.list_name} | {p.dtype} | {d.block}, {d.unroll}, {p.programs}, {d.spills} "
                f"| {p.measured:,.1f} | {pred:,.1f} | {pred / p.measured - 1:+.0%} |"
            )
        print()
    if args.stat_tile_scale != 1.0:
        machine = replace(machine, stat_tile=machine.stat_tile * args.stat_tile_scale)
        print(f"(stat_tile scaled by {args.stat_tile_scale}: {machine.stat_tile:.4g} µs per 1024 elements)")
    print("\n".join(predictions(machine, args.lists.split(","), args.designs.split(","))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

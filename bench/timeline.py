"""`python -m bench.timeline LIST DTYPE --out FILE.png`: a launch of the Triton queue kernel as a picture of
programs against time (issue #23, item 5), one bar per ticket, coloured by its kind (statistics, small item,
normalize), so that one look shows where a launch's time goes: a tail of few busy programs, waits for
statistics, gaps between tickets.

The spans come from the schedule model (bench/schedule_model.py, ``--design``, the default), or with
``--measured`` from a launch of the kernel's timeline variant on the list's gradients (triton_host.timeline_:
per ticket, start and end from the GPU's global timer, program, SM, polls while waiting for statistics),
drawn beside the model's for the shipped design, so that a prediction and its measurement lie side by side
(``--out`` then names the measured picture; the model's goes beside it, ``-model`` added to its name).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COLOURS", "Span", "draw", "measured_spans", "model_spans", "summary"]

COLOURS = {"stat": "tab:blue", "small": "tab:green", "norm": "tab:orange"}


@dataclass(frozen=True)
class Span:
    """One ticket as one program ran it; times in µs from the launch's first ticket."""

    program: int
    kind: str  # "stat", "small" or "norm"
    start: float
    end: float


def model_spans(list_name: str, dtype: str, design: str) -> list[Span]:
    """The schedule model's spans of one launch (bench/schedule_calibration.DESIGNS names the designs)."""
    from bench.schedule_calibration import DESIGNS, ELSIZE, FITTED, numels_of
    from bench.schedule_model import simulate

    numels = numels_of(list_name)
    result = simulate(numels, ELSIZE[dtype], DESIGNS[design](dtype, numels), FITTED, record=True)
    return [Span(p, result.queue[k].kind, start, end) for p, k, start, end in result.spans]


def spans_of(rows, kinds: Sequence[str]) -> list[Span]:
    """Spans from the timeline variant's rows (int64 [tickets, 4]: start ns, end ns, SM << 32 | program,
    polls; -1 where a ticket was never run) and each ticket's kind, in µs from the first ticket's start."""
    run = [(r, k) for r, k in zip(rows.tolist(), kinds) if r[2] >= 0]
    begin = min((r[0] for r, _ in run), default=0)
    return [Span(r[2] & 0xFFFFFFFF, k, (r[0] - begin) / 1e3, (r[1] - begin) / 1e3) for r, k in run]


def measured_spans(list_name: str, dtype: str, device: str = "cuda") -> tuple[list[Span], int]:
    """One launch of the shipped kernel's timeline variant on the list's gradients (random, as the benchmark
    makes them), after a launch that compiles it and learns its occupancy: its spans and its grid. On the CPU
    (the interpreter) every time is 0."""
    import torch

    from bench.param_lists import get_list
    from znorm_kernels.backends import triton_host

    generator = torch.Generator().manual_seed(0)
    shapes = get_list(list_name).shapes
    grads = [
        torch.randn(s, generator=generator).to(device=device, dtype=getattr(torch, dtype)) for s in shapes
    ]
    triton_host.timeline_(grads)
    recorded = triton_host.timeline_(grads)
    return spans_of(recorded.rows, recorded.kinds()), triton_host.last_launch().programs


def summary(spans: Sequence[Span], programs: int | None = None) -> dict[str, float]:
    """The launch's length, the programs' mean busy share (over ``programs``, the grid, where given: a
    program that drew no ticket is idle throughout), and the tail (the first program's last ticket end to the
    last one's), in µs."""
    if not spans:
        return {"length": 0.0, "busy": 0.0, "tail": 0.0}
    begin = min(s.start for s in spans)
    ends: dict[int, float] = {}
    busy = 0.0
    for s in spans:
        ends[s.program] = max(ends.get(s.program, begin), s.end)
        busy += s.end - s.start
    length = max(ends.values()) - begin
    return {
        "length": length,
        "busy": busy / ((programs or len(ends)) * length) if length > 0 else 1.0,
        "tail": max(ends.values()) - min(ends.values()),
    }


def draw(spans: Sequence[Span], path: Path, title: str = "", programs: int | None = None) -> Path:
    """Programs (rows) against time, one bar per ticket, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = sorted({s.program for s in spans})
    row = {p: i for i, p in enumerate(drawn)}
    fig, ax = plt.subplots(figsize=(12, max(3.0, min(12.0, 0.03 * len(drawn) + 2))))
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for s in spans:
        bars.setdefault((s.program, s.kind), []).append((s.start, s.end - s.start))
    for (program, kind), xranges in bars.items():
        ax.broken_barh(xranges, (row[program], 0.9), color=COLOURS[kind])
    ax.legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()],
        labels=["statistics", "small item", "normalize"],
        loc="upper right",
    )
    facts = summary(spans, programs)
    ax.set_xlabel("µs from the first ticket")
    ax.set_ylabel(f"program ({len(drawn)} drew tickets)")
    ax.set_title(
        f"{title}  {facts['length']:,.1f} µs, busy {facts['busy']:.0%}, tail {facts['tail']:,.1f} µs".strip()
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__)
    parser.add_argument("list_name")
    parser.add_argument("dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--design", default="runs k=2", help="a design of bench/schedule_calibration.DESIGNS")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--measured", action="store_true", help="a launch of the timeline variant (CUDA)")
    parser.add_argument("--device", default="cuda", help="with --measured: cpu rehearses it (interpreter)")
    args = parser.parse_args(argv)
    from bench.schedule_calibration import FITTED

    model_out = args.out
    if args.measured:
        spans, programs = measured_spans(args.list_name, args.dtype, args.device)
        draw(spans, args.out, f"measured: {args.list_name} {args.dtype}, shipped", programs)
        print(args.out, summary(spans, programs))
        model_out = args.out.with_name(f"{args.out.stem}-model{args.out.suffix}")
        args.design = "shipped now"
    spans = model_spans(args.list_name, args.dtype, args.design)
    draw(spans, model_out, f"model: {args.list_name} {args.dtype}, {args.design}", FITTED.resident)
    print(model_out, summary(spans, FITTED.resident))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench.timeline LIST DTYPE --out FILE.png`: a launch of the Triton queue kernel as a picture of
programs against time (issue #23, item 5), one bar per ticket, coloured by its kind (statistics, small item,
normalize), so that one look shows where a launch's time goes: a tail of few busy programs, waits for
statistics, gaps between tickets.

The spans come from the schedule model (bench/schedule_model.py, ``--design``, the default) and the same
picture serves a measured timeline (per ticket: start and end from the GPU's global timer, program; see
``Span``), so that a prediction and its measurement can be laid side by side.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COLOURS", "Span", "draw", "model_spans", "summary"]

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
    args = parser.parse_args(argv)
    from bench.schedule_calibration import FITTED

    spans = model_spans(args.list_name, args.dtype, args.design)
    draw(spans, args.out, f"model: {args.list_name} {args.dtype}, {args.design}", FITTED.resident)
    print(args.out, summary(spans, FITTED.resident))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

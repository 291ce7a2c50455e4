"""The benchmark's report: derived columns, the markdown tables, the JSON file and the PNG chart.

Derived columns, per row of one (list, dtype) case, all from figures measured in the same run:
- GB/s: the bytes ZNorm needs (3 element sizes per element: read twice, write once; 12 B for float32, 6 B
  for bfloat16) divided by the median device time;
- % copy: that rate as a fraction of the copy bandwidth measured for the same bytes in the same run;
- floor µs: the needed bytes at the copy bandwidth;
- x best alt, x eager, x compiled: the alternative's device time divided by the row's (higher is faster).
All of these use the device time from ``do_bench`` ("device µs"), as the alternatives in PERF.md were
measured. On CUDA the rows also carry "device µs (GPU busy ahead)" (``device_busy_us``,
bench.timing.device_time_gpu_bound: the device work alone, the host kept off the critical path), and
"% copy (busy)": the needed bytes over that time, as a fraction of the copy rate measured the same way. The
device-time targets are judged on the GPU-busy figure where a row has one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["derive", "markdown", "plot", "targets_markdown", "train_markdown", "write_json"]


def _case_key(row: dict) -> tuple[str, str]:
    return row["list"], row["dtype"]


def derive(rows: list[dict], cases: dict[str, dict]) -> None:
    """Fill in GB/s, % of copy and the speed-ups (in place); ``cases`` maps "list/dtype" to its copy data."""
    by_case: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_case.setdefault(_case_key(row), []).append(row)
    for (name, dtype), group in by_case.items():
        case = cases.get(f"{name}/{dtype}", {})
        size = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype]
        needed = 3 * size * group[0]["elements"]
        alt = {r["method"]: r["device_us"] for r in group if not r["ours"] and r["device_us"]}
        best = min(alt.values()) if alt else None
        for row in group:
            row["bytes_needed"] = needed
            t = row["device_us"]
            row["gbps"] = needed / (t * 1e-6) / 1e9 if t else None
            copy = case.get("copy_gbps")
            row["copy_frac"] = row["gbps"] / copy if row["gbps"] and copy else None
            row["floor_us"] = needed / (copy * 1e9) * 1e6 if copy else None
            row["x_best_alt"] = best / t if best and t else None
            row["x_eager"] = alt["eager"] / t if "eager" in alt and t else None
            row["x_compiled"] = alt["compiled"] / t if "compiled" in alt and t else None
            busy, copy_busy = row.get("device_busy_us"), case.get("copy_busy_gbps")
            row["copy_frac_busy"] = needed / (busy * 1e-6) / 1e9 / copy_busy if busy and copy_busy else None


def _f(value, fmt: str = "{:,.1f}", none: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return fmt.format(value)


def _us(value) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown(rows: list[dict], cases: dict[str, dict], device: str) -> str:
    """The results as markdown: one table of the cases, one of every method timed, notes on errors."""
    cuda = device == "cuda"
    out = [
        "| list | dtype | tensors | elements | bytes needed | copy GB/s | floor µs |",
        "|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for row in rows:
        key = f"{row['list']}/{row['dtype']}"
        if key in seen:
            continue
        seen.add(key)
        case = cases.get(key, {})
        floor = row.get("floor_us")
        out.append(
            f"| {row['label']} | {row['dtype']} | {row['tensors']} | {row['elements'] / 1e6:,.2f} M | "
            f"{row.get('bytes_needed', 0) / 1e6:,.1f} MB | {_f(case.get('copy_gbps'))} | {_us(floor)} |"
        )
    out.append("")
    head = ["list", "dtype", "method", "device µs"]
    if cuda:
        head.append("device µs (GPU busy ahead)")
    head.append("hook µs (synced)")
    if cuda:
        head += ["hook host µs", "hook host µs alone"]
    head += ["GB/s", "% copy"]
    if cuda:
        head.append("% copy (busy)")
    head += ["x best alt", "x eager", "x compiled", "launches", "max abs z err"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    notes = []
    starved: list[str] = []
    for row in rows:
        method = f"**{row['method']}**" if row["ours"] else row["method"]
        cells = [row["list"], row["dtype"], method]
        if row["error"]:
            cells += ["-"] * (len(head) - 3)
            notes.append(f"- {row['list']} {row['dtype']} {row['method']}: {row['error']}")
        else:
            cells.append(_us(row["device_us"]))
            if cuda:
                busy = _us(row.get("device_busy_us"))
                cells.append(busy + ("*" if busy and row.get("busy_starved") else ""))
            cells.append(_us(row["hook_us"]))
            if cuda:
                cells += [_us(row["hook_host_us"]), _us(row.get("hook_host_alone_us"))]
            cells += [_f(row.get("gbps")), _f(row.get("copy_frac"), "{:.0%}")]
            if cuda:
                cells.append(_f(row.get("copy_frac_busy"), "{:.0%}"))
            cells += [
                _f(row.get("x_best_alt"), "{:.2f}"),
                _f(row.get("x_eager"), "{:.2f}"),
                _f(row.get("x_compiled"), "{:.2f}"),
                _f(row["launches"], "{:,}", "n/a"),
                _f(row["max_err"], "{:.1e}"),
            ]
        out.append("| " + " | ".join(cells) + " |")
        if row.get("busy_starved"):
            starved.append(
                f"{row['list']} {row['dtype']} {row['method']} {row['busy_starved']}/{row['busy_reps']}"
            )
        if row.get("busy_error"):
            notes.append(
                f"- {row['list']} {row['dtype']} {row['method']}: GPU-busy timing: {row['busy_error']}"
            )
    if cuda:
        out.append("")
        out.append(
            "device µs: triton.testing.do_bench median (L2 flushed before each call; the host may be on the "
            "critical path). device µs (GPU busy ahead): median of CUDA events around the call, each call "
            "enqueued behind the same L2 flush and a GPU sleep longer than its host time, so the events time "
            "the device work alone. GB/s, % copy and the speed-ups use do_bench's figure; % copy (busy) uses "
            "the GPU-busy figures of the row and of the copy. hook host µs: the call's host time, each call "
            "right after the other methods' (caches cold); alone: repeats of that hook alone (caches warm)."
        )
        if starved:
            out.append(
                "\\* in some GPU-busy calls the GPU reached the start event before the call was fully "
                "enqueued (host time may be counted there), of the calls timed: " + "; ".join(starved) + "."
            )
    whats = sorted({r["launches_what"] for r in rows if r["launches_what"]})
    if whats:
        out.append("")
        out.append("launches: " + "; ".join(whats) + ".")
    if notes:
        out.append("")
        out += notes
    return "\n".join(out) + "\n"


def _overhead(name: str, ms: float | None, base: float | None) -> str:
    return "" if name == "no ZNorm" or ms is None or not base else f"{(ms - base) / base:+.1%}"


def train_markdown(train: dict) -> str:
    """The training-step table."""
    piped = train.get("pipelined") or {}
    out = [
        f"ResNet-56 training step, batch {train['batch']}, {train['precision']}, {train['memory_format']}, "
        f"SGD momentum 0.9; median of {train['steps']} steps per variant, variants interleaved (each "
        "installed for two steps per round, the second timed):",
        "",
        "| variant | ms per step | overhead vs no ZNorm | treatment host µs in the step |"
        + (" pipelined ms per step | overhead |" if piped else ""),
        "|---|---|---|---|" + ("---|---|" if piped else ""),
    ]
    base = train["variants"].get("no ZNorm")
    hook_us = train.get("hook_host_us", {})
    for name, ms in train["variants"].items():
        host = _f(hook_us.get(name), "{:,.1f}")
        line = f"| {name} | {_f(ms, '{:.2f}', 'failed')} | {_overhead(name, ms, base)} | {host} |"
        if piped:
            p = piped.get(name)
            line += f" {_f(p, '{:.2f}')} | {_overhead(name, p, piped.get('no ZNorm'))} |"
        out.append(line)
    if piped:
        out += [
            "",
            f"Pipelined: {train['pipelined_steps']} steps back to back, one synchronization at the end (as a "
            f"training loop runs), median of {train['pipelined_rounds']} rounds per variant.",
        ]
    graphed = train.get("graphed")
    if graphed:
        bare = graphed.get("no ZNorm")
        ours = next((k for k in graphed if k.startswith("znorm_kernels")), "znorm_kernels.register")
        hooked = graphed.get(ours)
        eager = piped.get("no ZNorm")
        out += [
            "",
            "The step captured in a CUDA graph and replayed (pipelined, in the same rounds; its own model):",
            "",
            "| variant | ms per step | overhead vs no ZNorm | eager pipelined / graphed |",
            "|---|---|---|---|",
            f"| no ZNorm, graphed | {_f(bare, '{:.2f}')} | | "
            f"{_f(eager / bare if eager and bare else None, '{:.2f}x')} |",
            f"| {ours}, graphed | {_f(hooked, '{:.2f}')} | {_overhead('znorm', hooked, bare)} | |",
        ]
    paths = train.get("hook_paths")
    if paths:
        out += [
            "",
            f"Our hook over its {train['steps']} timed steps: {paths['full checks']} full checks, "
            f"{paths['moved']} with the gradients at new addresses (bound again), the rest at the same "
            f"addresses; {paths['plans built']} Triton plans built (a table copied to the device), "
            f"{paths.get('plans moved', 0)} moved (their address table rewritten).",
        ]
    return "\n".join(out) + "\n"


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def plot(rows: list[dict], cases: dict[str, dict], path: Path, title: str) -> None:
    """Bar chart: device time per (list, dtype) case, one bar per method, log scale; the copy floor as a
    black tick. Ours are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys: list[tuple[str, str]] = []
    for row in rows:
        if _case_key(row) not in keys:
            keys.append(_case_key(row))
    methods: list[tuple[str, bool]] = []
    for row in rows:
        if (row["method"], row["ours"]) not in methods and row["device_us"]:
            methods.append((row["method"], row["ours"]))
    if not keys or not methods:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(keys) * max(1, len(methods)) / 4 + 3), 4.8))
    width = 0.8 / len(methods)
    lookup = {(_case_key(r), r["method"]): r for r in rows}
    colors = plt.get_cmap("tab10")
    for j, (method, ours) in enumerate(methods):
        xs, ys = [], []
        for i, key in enumerate(keys):
            row = lookup.get((key, method))
            if row and row["device_us"]:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(row["device_us"])
        ax.bar(
            xs,
            ys,
            width,
            label=method + (" (ours)" if ours else ""),
            color=colors(j % 10),
            hatch="//" if ours else None,
            edgecolor="black" if ours else None,
            linewidth=0.5,
        )
    for i, key in enumerate(keys):
        floor = next((r.get("floor_us") for r in rows if _case_key(r) == key and r.get("floor_us")), None)
        if floor:
            ax.hlines(
                floor,
                i - 0.45,
                i + 0.45,
                colors="black",
                linewidth=1.5,
                label="copy floor" if i == 0 else None,
            )
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{n}\n{d}" for n, d in keys], fontsize=8)
    ax.set_ylabel("µs per call (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The issues' targets: (device, list, our method, what is measured, threshold, row key, as text, met).
_AT_LEAST, _AT_MOST = (lambda v, t: v >= t), (lambda v, t: v <= t)
_US, _X, _PCT = "{:.1f} µs", "{:.2f}x", "{:.0%}"
TARGETS = [
    ("cpu", "resnet56", "cpu", ">= 5x the eager loop", 5.0, "x_eager", _X, _AT_LEAST),
    ("cpu", "resnet56", "cpu", ">= 1.5x torch.compile", 1.5, "x_compiled", _X, _AT_LEAST),
    ("cuda", "resnet56", "triton", "<= 12 µs device time", 12.0, "device_us", _US, _AT_MOST),
    ("cuda", "resnet56", "cuda", "<= 40 µs device time", 40.0, "device_us", _US, _AT_MOST),
    ("cuda", "resnet56", "triton", "<= 50 µs host time per hook call", 50.0, "hook_host_us", _US, _AT_MOST),
    ("cuda", "llm", "triton", ">= 90% of the copy bandwidth", 0.9, "copy_frac", _PCT, _AT_LEAST),
    ("cuda", "llm", "cuda", ">= 85% of the copy bandwidth", 0.85, "copy_frac", _PCT, _AT_LEAST),
    ("cuda", "llm", "triton", "faster than torch.compile", 1.0, "x_compiled", _X, _AT_LEAST),
    ("cuda", "llm", "cuda", "faster than torch.compile", 1.0, "x_compiled", _X, _AT_LEAST),
]
_LIST_NAMES = {"resnet56": "ResNet-56", "llm": "LLM 707 M"}


def targets_markdown(rows: list[dict], train: dict | None, device: str) -> str:
    """The issues' targets (PERF.md's figures) that this run's figures speak to, each with the measured value
    and whether it is met (empty when none applies)."""
    out: list[str] = []
    judged_busy = False

    def add(target: str, method: str, measured: str, met: bool) -> None:
        out.append(f"| {target} | {method} | {measured} | {'yes' if met else 'NO'} |")

    for row in rows:
        if not row["ours"] or row["error"] or not row["device_us"]:
            continue
        for dev, name, method, what, threshold, key, fmt, met in TARGETS:
            value = row.get(key)
            if (dev, name, method) != (device, row["list"], row["method"]) or not value:
                continue
            text = fmt.format(value)
            alone = row.get("hook_host_alone_us") if key == "hook_host_us" else None
            if alone:  # PERF.md's host time: repeats of the call (the round-robin figure has cold caches)
                text = f"{fmt.format(alone)} alone (round-robin with the other methods: {text})"
                value = alone
            busy = row.get("device_busy_us") if key == "device_us" else None
            if busy:  # the target is about the device work: judge the figure without host time in it
                text += f" (GPU-bound: {fmt.format(busy)}" + ("*" if row.get("busy_starved") else "") + ")"
                value, judged_busy = busy, True
            add(f"{_LIST_NAMES[name]} {row['dtype']}: {what}", method, text, met(value, threshold))
    if train and device == "cuda":
        for which, steps in (("", train["variants"]), (", pipelined", train.get("pipelined") or {})):
            base = steps.get("no ZNorm")
            for name, ms in steps.items():
                if name.startswith("znorm_kernels") and base and ms:
                    over = (ms - base) / base
                    add(f"ResNet-56 training step{which}: < 1% overhead", name, f"{over:+.1%}", over < 0.01)
        graphed = train.get("graphed") or {}
        ours = next((k for k in graphed if k.startswith("znorm_kernels")), "znorm_kernels.register")
        bare, hooked = graphed.get("no ZNorm"), graphed.get(ours)
        eager = (train.get("pipelined") or {}).get("no ZNorm")
        if bare and eager:
            add("ResNet-56 training step graphed: >= 3x faster than eager", "the graphed step",
                f"{eager / bare:.2f}x", eager / bare >= 3)  # fmt: skip
        if bare and hooked:
            over = (hooked - bare) / bare
            add("ResNet-56 training step graphed: ZNorm's share < 1%", ours, f"{over:+.1%}", over < 0.01)
    if not out:
        return ""
    head = [
        "PERF.md targets, from this run's figures:",
        "",
        "| target | ours | measured | met |",
        "|---|---|---|---|",
    ]
    if judged_busy:
        out += [
            "",
            "Device-time targets are judged on the GPU-bound figure (device µs with the GPU busy ahead of "
            "the call, so the host's time is not counted); the first figure is do_bench's. A * marks a "
            "GPU-bound figure some of whose calls still found the GPU waiting (see the table's note).",
        ]
    return "\n".join(head + out) + "\n"

"""The paper-style summary of finished runs, and the plots.

``python -m znorm_kernels.cifar.report RUN_DIR...`` (a run folder, or a folder of run folders such as a
grid's ``--out``): prints a markdown table (rows model x method, columns per optimizer: best and final test
accuracy, final training loss; mean ± standard deviation over seeds when there are several), then each
method against the baseline seed by seed (``paired``: mean difference and its 95% interval), and writes
them, with one figure of test accuracy against epoch for every run (a panel per model and optimizer, a line
per method, like the papers' Figure 3), to ``--out`` (default: the runs' common parent folder).

``plot_curves`` draws one run's ``curves.png`` (loss and accuracy against epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .paired import compare, paired_markdown

__all__ = ["Run", "find_runs", "main", "markdown_table", "plot_curves", "plot_test_accuracy"]

METHOD_LABELS = {"baseline": "baseline", "gc": "GC", "clip": "clipping", "znorm": "ZNorm"}
METHOD_ORDER = tuple(METHOD_LABELS)
OPTIMIZER_LABELS = {"sgdm": "SGDM", "adam": "Adam"}


def _ordered(known, present) -> list:
    """The values in ``present``, those in ``known`` first and in its order, then any others sorted."""
    present = set(present)
    return [k for k in known if k in present] + sorted(present - set(known))


@dataclass
class Run:
    path: Path
    config: dict
    metrics: list[dict]

    @property
    def key(self) -> tuple[str, str, str]:
        return self.config["model"], self.config["method"], self.config["optimizer"]

    @property
    def finished(self) -> bool:
        """Whether the run reached the epochs its config asks for, one metrics row per epoch."""
        epochs = self.config.get("epochs")
        return (
            isinstance(epochs, int)
            and len(self.metrics) == epochs
            and self.metrics[-1].get("epoch") == epochs
        )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """One run's loss and accuracy (train, val if any, test) against epoch, as a PNG."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [m["epoch"] for m in metrics]
    for split, style in (("train", "-"), ("val", ":"), ("test", "--")):
        if f"{split}_loss" in metrics[0]:
            ax_loss.plot(epochs, [m[f"{split}_loss"] for m in metrics], style, marker=".", label=split)
            ax_acc.plot(epochs, [m[f"{split}_acc"] for m in metrics], style, marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def find_runs(paths: list[str | os.PathLike]) -> list[Run]:
    """The runs in ``paths``: each a run folder (holding config.json) or a folder of run folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.json").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(d for d in p.iterdir() if (d / "config.json").is_file()))
        else:
            raise FileNotFoundError(f"{p}: not a run folder (no config.json) nor a folder of runs")
    runs = []
    for d in found:
        config = json.loads((d / "config.json").read_text())
        metrics_file = d / "metrics.jsonl"
        lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
        metrics = [json.loads(line) for line in lines if line.strip()]
        if metrics:
            runs.append(Run(d, config, metrics))
    return runs


def _fmt(values: list[float], percent: bool) -> str:
    scale = 100 if percent else 1
    vals = [v * scale for v in values]
    digits = 2 if percent else 4
    if any(not math.isfinite(v) for v in vals):
        return "nan"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _sort_key(model: str) -> tuple[int, str]:
    digits = "".join(ch for ch in model if ch.isdigit())
    return (int(digits) if digits else 0, model)


def markdown_table(runs: list[Run]) -> str:
    """Rows model x method; per optimizer: best test acc (%), final test acc (%), final train loss."""
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.key].append(r)
    models = sorted({k[0] for k in groups}, key=_sort_key)
    methods = _ordered(METHOD_ORDER, (k[1] for k in groups))
    optimizers = [o for o in OPTIMIZER_LABELS if any(k[2] == o for k in groups)]
    head = ["model", "method"]
    for o in optimizers:
        label = OPTIMIZER_LABELS[o]
        head += [f"{label} best test acc %", f"{label} final test acc %", f"{label} final train loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        for method in methods:
            if not any((model, method, o) in groups for o in optimizers):
                continue
            cells = [model, METHOD_LABELS.get(method, method)]
            for o in optimizers:
                rs = groups.get((model, method, o), [])
                if not rs:
                    cells += ["", "", ""]
                    continue
                cells += [
                    _fmt([max(m["test_acc"] for m in r.metrics) for r in rs], True),
                    _fmt([r.metrics[-1]["test_acc"] for r in rs], True),
                    _fmt([r.metrics[-1]["train_loss"] for r in rs], False),
                ]
            lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r.config.get("seed") for r in runs})
    epochs = sorted({r.metrics[-1]["epoch"] for r in runs})
    datasets = sorted({r.config.get("dataset", "?") for r in runs})
    note = (
        f"\n{len(runs)} run(s); dataset {', '.join(datasets)}; "
        f"epochs completed {', '.join(map(str, epochs))}; "
        f"seeds {', '.join(map(str, seeds))}. Best = highest test accuracy over epochs (for reference only, "
        "not a model selection); final = last epoch."
    )
    if len(seeds) > 1:
        note += " Cells with several seeds are mean ± sample standard deviation."
    return "\n".join(lines) + "\n" + note + "\n"


def plot_test_accuracy(runs: list[Run], path: str | os.PathLike) -> None:
    """Test accuracy against epoch: a panel per (model, optimizer), a line per method (mean over seeds,
    shaded between the lowest and highest seed)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    models = sorted({r.key[0] for r in runs}, key=_sort_key)
    optimizers = _ordered(OPTIMIZER_LABELS, (r.key[2] for r in runs))
    methods = _ordered(METHOD_ORDER, (r.key[1] for r in runs))
    fig, axes = plt.subplots(
        len(models),
        len(optimizers),
        figsize=(5.2 * len(optimizers), 3.8 * len(models)),
        squeeze=False,
        sharey=True,
    )
    colors = dict(zip(METHOD_ORDER, ("tab:gray", "tab:blue", "tab:orange", "tab:red")))
    for i, model in enumerate(models):
        for j, opt in enumerate(optimizers):
            ax = axes[i][j]
            for method in methods:
                rs = [r for r in runs if r.key == (model, method, opt)]
                if not rs:
                    continue
                n = min(len(r.metrics) for r in rs)
                epochs = [rs[0].metrics[k]["epoch"] for k in range(n)]
                accs = [[r.metrics[k]["test_acc"] * 100 for r in rs] for k in range(n)]
                label = METHOD_LABELS.get(method, method) + (f" ({len(rs)} seeds)" if len(rs) > 1 else "")
                line = ax.plot(
                    epochs,
                    [statistics.mean(a) for a in accs],
                    marker=".",
                    label=label,
                    color=colors.get(method),
                )[0]
                if len(rs) > 1:
                    ax.fill_between(
                        epochs,
                        [min(a) for a in accs],
                        [max(a) for a in accs],
                        alpha=0.2,
                        color=line.get_color(),
                    )
            ax.set_title(f"{model}, {OPTIMIZER_LABELS.get(opt, opt)}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("test accuracy %")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m znorm_kernels.cifar.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument(
        "--out",
        help="where to write results.md and test_accuracy.png (default: the runs' common parent folder)",
    )
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs)
    except (FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no runs with metrics found in {', '.join(args.runs)}", file=sys.stderr)
        return 2
    out = (
        Path(args.out) if args.out else Path(os.path.commonpath([str(r.path.resolve().parent) for r in runs]))
    )
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    try:
        comparison = compare(runs, lambda r: r.metrics[-1]["test_acc"] * 100)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if comparison.rows or comparison.left_out or comparison.unfinished:
        labels = {**METHOD_LABELS, **OPTIMIZER_LABELS}
        table += "\n## Against the baseline, seed by seed\n\n" + paired_markdown(comparison, labels)
    (out / "results.md").write_text(table)
    plot_test_accuracy(runs, out / "test_accuracy.png")
    print(table)
    print(f"wrote {out / 'results.md'} and {out / 'test_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

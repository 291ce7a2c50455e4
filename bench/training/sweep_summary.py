"""Summarize the learning-rate sweep of run_cpu.sh: validation (held-out TRAIN) accuracy and loss per
optimizer, method and learning rate, and the rate chosen for each (highest validation accuracy).

    .venv/bin/python bench/training/sweep_summary.py runs/fmnist-sweep-a runs/fmnist-sweep-b
"""

from __future__ import annotations

import sys

from znorm_kernels.cifar.report import METHOD_LABELS, OPTIMIZER_LABELS, find_runs


def main(paths: list[str]) -> str:
    rows = []
    for r in find_runs(paths):
        last = r.metrics[-1]
        rows.append((r.config["optimizer"], r.config["method"], r.config["_resolved"]["lr"], last))
    rows.sort(key=lambda t: (list(OPTIMIZER_LABELS).index(t[0]), list(METHOD_LABELS).index(t[1]), t[2]))
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for opt, method, lr, last in rows:
        if (opt, method) not in best or last["val_acc"] > best[(opt, method)][1]:
            best[(opt, method)] = (lr, last["val_acc"])
    lines = [
        "| optimizer | method | lr | val acc % | val loss | train loss | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for opt, method, lr, last in rows:
        chosen = "yes" if best[(opt, method)][0] == lr else ""
        lines.append(
            f"| {OPTIMIZER_LABELS[opt]} | {METHOD_LABELS[method]} | {lr:g} | {100 * last['val_acc']:.1f} | "
            f"{last['val_loss']:.3g} | {last['train_loss']:.3f} | {chosen} |"
        )
    spec = ",".join(f"{o}/{m}={lr:g}" for (o, m), (lr, _) in best.items())
    return "\n".join(lines) + f"\n\nchosen: --lr {spec}\n"


if __name__ == "__main__":
    print(main(sys.argv[1:]))

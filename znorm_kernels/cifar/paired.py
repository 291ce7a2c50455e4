"""Each method against the baseline, seed by seed: the paired differences and their confidence interval.

Runs of one seed share their batches and initial weights across methods (``data.generator``), so the
difference between a method and the baseline at the same seed removes what the seed alone does; the
seeds' spread of that difference is what says whether a method helps. For every (model, optimizer,
method) with seeds that the baseline also finished, ``paired_rows`` gives the mean difference in final
test accuracy, its sample standard deviation and a two-sided 95% Student-t interval over the seeds
(none from one seed). A group whose runs differ in a setting other than the seed (a learning rate chosen
anew in another GPU window, say) is no set of seeds of one configuration: ``mixed_groups`` names it and
its settings, and it is left out of the comparison.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import RESULT_FIELDS

__all__ = ["PairedRow", "mixed_groups", "paired_markdown", "paired_rows", "t_quantile"]

Group = tuple[str, str, str]  # (model, optimizer, method)


def _t_cdf_upper_half(x: float, df: int) -> float:
    """P(0 <= T <= x) for Student's t with ``df`` degrees of freedom: Simpson's rule on the density, whose
    smoothness makes 2,000 intervals exact to far below the digits printed."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    steps = 2000
    h = x / steps
    total = pdf(0.0) + pdf(x)
    for k in range(1, steps):
        total += (4 if k % 2 else 2) * pdf(k * h)
    return total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` >= 1 degrees of freedom, by bisection."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    target = p - 0.5
    lo, hi = 0.0, 1.0
    while _t_cdf_upper_half(hi, df) < target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if _t_cdf_upper_half(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class PairedRow:
    """One method against the baseline on one model and optimizer; differences in accuracy points."""

    model: str
    optimizer: str
    method: str
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]  # method - baseline, per seed, in seed order
    unpaired: tuple[int, ...]  # the method's seeds the baseline has not finished

    @property
    def mean(self) -> float:
        return statistics.mean(self.diffs)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.diffs) if len(self.diffs) > 1 else None

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """The two-sided Student-t confidence interval of the mean difference; None from one seed."""
        if len(self.diffs) < 2:
            return None
        half = t_quantile(0.5 + level / 2, len(self.diffs) - 1) * self.sd / math.sqrt(len(self.diffs))
        return self.mean - half, self.mean + half


def _group(run) -> Group:
    model, method, optimizer = run.key
    return model, optimizer, method


def mixed_groups(runs: Iterable) -> dict[Group, list[str]]:
    """The (model, optimizer, method) groups whose runs differ in a setting that changes what is computed
    (config.RESULT_FIELDS) other than the seed, each with the names of those settings."""
    settings: dict[Group, list[dict]] = {}
    for run in runs:
        settings.setdefault(_group(run), []).append(run.config)
    mixed = {}
    for group, configs in sorted(settings.items()):
        differ = [k for k in RESULT_FIELDS if k != "seed" and len({repr(c.get(k)) for c in configs}) > 1]
        if differ:
            mixed[group] = differ
    return mixed


def paired_rows(
    runs: Iterable, metric: Callable[[object], float], baseline: str = "baseline"
) -> list[PairedRow]:
    """The paired rows of ``runs`` (report.Run objects: ``key`` = (model, method, optimizer) and
    ``config["seed"]``), ``metric(run)`` the accuracy in points; groups that ``mixed_groups`` names, and
    methods whose baseline is one, are left out. A (model, method, optimizer, seed) found twice is an error:
    the comparison would depend on which copy is read."""
    runs = list(runs)
    mixed = mixed_groups(runs)
    by_key: dict[Group, dict[int, float]] = {}
    for run in runs:
        group = _group(run)
        seeds = by_key.setdefault(group, {})
        seed = int(run.config["seed"])
        if seed in seeds:
            raise ValueError(f"two finished runs of {', '.join(group)}, seed {seed}: keep one")
        seeds[seed] = metric(run)
    rows = []
    for (model, optimizer, method), seeds in sorted(by_key.items()):
        base = by_key.get((model, optimizer, baseline))
        if method == baseline or base is None:
            continue
        if (model, optimizer, method) in mixed or (model, optimizer, baseline) in mixed:
            continue
        paired = sorted(s for s in seeds if s in base)
        if not paired:
            continue
        rows.append(
            PairedRow(
                model,
                optimizer,
                method,
                tuple(paired),
                tuple(seeds[s] - base[s] for s in paired),
                tuple(sorted(s for s in seeds if s not in base)),
            )
        )
    return rows


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def paired_markdown(
    rows: list[PairedRow], labels: dict[str, str] | None = None, mixed: dict[Group, list[str]] | None = None
) -> str:
    """The rows as a markdown table (differences in accuracy points), with a line on how to read it and
    what was left out (``mixed``: mixed_groups' answer)."""
    labels = labels or {}
    lines = [
        "| model | optimizer | method | seeds | mean difference | sd | 95% interval | per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = r.interval()
        cells = [
            r.model,
            labels.get(r.optimizer, r.optimizer),
            labels.get(r.method, r.method),
            ", ".join(map(str, r.seeds)),
            _signed(r.mean),
            "" if r.sd is None else f"{r.sd:.2f}",
            "one seed: none" if ci is None else f"[{_signed(ci[0])}, {_signed(ci[1])}]",
            " ".join(map(_signed, r.diffs)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nFinal test accuracy, method minus baseline at the same seed (same batches, same initial weights), "
        "in points; the interval is a two-sided 95% Student-t interval over the seeds. An interval that "
        "holds 0 says these seeds cannot tell the method from the baseline."
    )
    unpaired = [
        f"{r.model}/{r.optimizer}/{r.method}: {', '.join(map(str, r.unpaired))}" for r in rows if r.unpaired
    ]
    if unpaired:
        note += " Left out, the baseline has not finished these seeds: " + "; ".join(unpaired) + "."
    if mixed:
        groups = [f"{'/'.join(g)} ({', '.join(k)})" for g, k in mixed.items()]
        note += (
            " Left out, their runs differ in more than the seed (with the baseline's, every method of that "
            "model and optimizer): " + "; ".join(groups) + "."
        )
    return "\n".join(lines) + "\n" + note + "\n"

"""Each method against the baseline, seed by seed: the paired differences and their confidence interval.

Runs of one seed share their batches and initial weights across methods (``data.generator``), so the
difference between a method and the baseline at the same seed removes what the seed alone does; the
seeds' spread of that difference is what says whether a method helps. ``compare`` gives, for every (model,
optimizer, method), the differences in final test accuracy over the seeds both it and the baseline finished,
their mean, sample standard deviation and a two-sided Student-t interval (none from one seed).

Only like is compared with like, and what is left out is named (``Comparison.left_out``): a group whose
runs differ in a result setting other than the seed (a learning rate chosen anew in another GPU window,
say) is no set of seeds of one configuration; a method whose runs differ from its baseline's in more than
the method's own settings (``METHOD_SETTINGS``: another dataset, other epochs) is no pair; unfinished runs
(fewer epochs than their config asks for) are not final results.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import RESULT_FIELDS

__all__ = [
    "METHOD_SETTINGS",
    "Comparison",
    "PairedRow",
    "compare",
    "mixed_groups",
    "paired_markdown",
    "t_quantile",
]

Group = tuple[str, str, str]  # (model, optimizer, method)

# The result settings a method's runs may set apart from its baseline's: its own learning rate and options.
METHOD_SETTINGS = ("method", "seed", "lr", "clip_norm", "znorm_backend", "znorm_optimizer", "fused")


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0, Student's t with ``df`` degrees of freedom."""
    return 1.0 - 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` >= 1 degrees of freedom, by bisection on
    the distribution function (the regularized incomplete beta function)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
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


@dataclass
class Comparison:
    """``compare``'s answer: the rows, and what was left out with why."""

    rows: list[PairedRow]
    left_out: dict[Group, str]  # whole groups, with the reason
    unfinished: list[str]  # "model/optimizer/method seed N" of runs short of their epochs


def compare(runs: Iterable, metric: Callable[[object], float], baseline: str = "baseline") -> Comparison:
    """The paired rows of ``runs`` (report.Run objects: ``key`` = (model, method, optimizer), ``config``
    with "seed", ``finished``), ``metric(run)`` the accuracy in points; see the module docstring for what is
    left out. A finished run of one configuration and seed found twice is an error: the comparison would
    depend on which copy is read."""
    runs = list(runs)
    unfinished = [f"{'/'.join(_group(r))} seed {r.config['seed']}" for r in runs if not r.finished]
    finished = [r for r in runs if r.finished]
    mixed = mixed_groups(finished)
    left: dict[Group, str] = {g: f"its runs differ in {', '.join(k)}" for g, k in mixed.items()}
    by_group: dict[Group, dict[int, float]] = {}
    config_of: dict[Group, dict] = {}
    for run in finished:
        group = _group(run)
        if group in mixed:
            continue
        seeds = by_group.setdefault(group, {})
        config_of[group] = run.config
        seed = int(run.config["seed"])
        if seed in seeds:
            raise ValueError(f"two finished runs of {', '.join(group)}, seed {seed}: keep one")
        seeds[seed] = metric(run)
    rows = []
    for group, seeds in sorted(by_group.items()):
        model, optimizer, method = group
        if method == baseline:
            continue
        base_group = (model, optimizer, baseline)
        base = by_group.get(base_group)
        if base_group in mixed:
            left[group] = "its baseline's runs differ in " + ", ".join(mixed[base_group])
            continue
        if base is None:
            left[group] = "no finished baseline run"
            continue
        differ = [
            k
            for k in RESULT_FIELDS
            if k not in METHOD_SETTINGS
            and repr(config_of[group].get(k)) != repr(config_of[base_group].get(k))
        ]
        if differ:
            left[group] = "it differs from its baseline in " + ", ".join(differ)
            continue
        paired = sorted(s for s in seeds if s in base)
        if not paired:
            left[group] = "no seed in common with its baseline"
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
    return Comparison(rows, dict(sorted(left.items())), unfinished)


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def paired_markdown(comparison: Comparison, labels: dict[str, str] | None = None) -> str:
    """The comparison as a markdown table (differences in accuracy points), with a line on how to read it and
    what was left out."""
    labels = labels or {}
    lines = [
        "| model | optimizer | method | seeds | mean difference | sd | 95% interval | per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = comparison.rows
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
    if comparison.left_out:
        groups = [f"{'/'.join(g)} ({why})" for g, why in comparison.left_out.items()]
        note += " Left out entirely: " + "; ".join(groups) + "."
    if comparison.unfinished:
        note += " Unfinished runs, not compared: " + "; ".join(comparison.unfinished) + "."
    return "\n".join(lines) + "\n" + note + "\n"

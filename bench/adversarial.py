"""Adversarial inputs for rules 3 and 10: where one element, a large offset or a tiny spread would cost every
other z-score its precision in a careless implementation. Shared by the benchmark's accuracy gate and the
tests; ``python -m bench.adversarial`` prints each backend's error next to the eager loop's.

Every case is float32 with finite z-scores. Outliers sit where block, tile and chunk boundaries are (the first
element, 8192 (the Triton tile) and 65536, the last element, several at once).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from znorm_kernels.accuracy import allowed_error, z_float64

__all__ = ["CASES", "breaches", "eager_loop_", "errors", "make_case", "methods_for", "table"]

EPS = 1e-10


def _noise(n: int, std: float, seed: int, mean: float = 0.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * std + mean).float()


def _with(x: Tensor, where: dict[int, float]) -> Tensor:
    for i, v in where.items():
        x[i] = v
    return x


def _absorbed_squares(n: int) -> Tensor:
    """32 outliers of square 2**24 first (one per lane of a 32-lane loop), then values of square 0.98, just
    under half a float unit at 2**24: a float sum that adds them to an outlier's square loses every one, and
    their share of the variance with it."""
    x = torch.full((n,), 0.98**0.5)
    x[1::2] *= -1
    x[0:32:2], x[1:32:2] = 4096.0, -4096.0
    return x


def _near_constant(n: int) -> Tensor:
    x = torch.full((n,), 0.1)
    x[n // 3] = torch.nextafter(torch.tensor(0.1), torch.tensor(1.0))
    return x


# name -> (maker of the float32 input, eps). Sizes stay small enough for Triton's interpreter on a CPU.
CASES: dict[str, tuple[Callable[[], Tensor], float]] = {
    "outlier first (1M, std 1e-3, x[0]=5)": (lambda: _with(_noise(1 << 20, 1e-3, 1), {0: 5.0}), EPS),
    "outlier at tile and chunk starts": (
        lambda: _with(_noise(150_000, 1e-3, 2), {8192: 5.0, 65536: -7.0, 131072: 3.0}),
        EPS,
    ),
    "outlier last (9000)": (lambda: _with(_noise(9000, 1e-3, 3), {8999: -50.0}), EPS),
    "several outliers (20000)": (
        lambda: _with(_noise(20000, 1e-2, 4), {0: 80.0, 1: -80.0, 8191: 1e3, 19999: 40.0}),
        EPS,
    ),
    "outlier squares absorbing the rest (16384)": (lambda: _absorbed_squares(16384), EPS),
    "mean 1, std 1e-3 (100k)": (lambda: _noise(100_000, 1e-3, 5, mean=1.0), EPS),
    "mean 1e4, std 1e-2 (10k)": (lambda: _noise(10_000, 1e-2, 6, mean=1e4), EPS),
    "near-constant, one ulp apart (5000)": (lambda: _near_constant(5000), EPS),
    "huge values (std 1e36)": (lambda: _noise(5000, 1e36, 7), EPS),
    "tiny values, eps=0 (std 1e-30)": (lambda: _noise(5000, 1e-30, 8), 0.0),
}


def make_case(name: str, device: torch.device | str = "cpu") -> tuple[Tensor, float]:
    make, eps = CASES[name]
    return make().to(device), eps


def eager_loop_(tensors: list[Tensor], eps: float) -> None:
    """The loop a user writes (the alternative the benchmark times as "eager"), float32 throughout."""
    for g in tensors:
        s, m = torch.std_mean(g, correction=0)
        g.sub_(m).div_(s + eps)


def errors(out: Tensor, x: Tensor, eps: float) -> tuple[float, float, float]:
    """(max abs error where |z| <= 10, max relative error where |z| > 10, max of error / rule 10's bound)."""
    z = z_float64(x, eps).cpu()
    got = out.double().cpu()
    err = (got - z).abs()
    small = z.abs() <= 10
    abs_err = float(err[small].max()) if small.any() else 0.0
    rel_err = float((err[~small] / z[~small].abs()).max()) if (~small).any() else 0.0
    ratio = float((err / allowed_error(z, got, out.dtype)).max())
    return abs_err, rel_err, (float("inf") if ratio != ratio else ratio)


def methods_for(backends: list[str]) -> dict[str, Callable[[list[Tensor], float], None]]:
    """The eager loop and each of our backends, as the methods ``table`` runs."""
    import znorm_kernels

    methods: dict[str, Callable[[list[Tensor], float], None]] = {"eager loop": eager_loop_}
    for b in backends:
        methods[b] = lambda ts, eps, b=b: znorm_kernels.znorm_(ts, eps=eps, backend=b)
    return methods


def breaches(rows: list[dict]) -> list[dict]:
    """The rows where one of our backends (not the eager loop) breaks rule 10."""
    return [r for r in rows if r["method"] != "eager loop" and not r["ratio"] <= 1]


def table(methods: dict[str, Callable[[list[Tensor], float], None]], device: torch.device) -> list[dict]:
    """Each method on each case: rows of {case, method, abs, rel, ratio} (ratio <= 1 meets rule 10)."""
    rows = []
    for name in CASES:
        x, eps = make_case(name, device)
        for method, fn in methods.items():
            y = x.clone()
            fn([y], eps)
            a, r, q = errors(y, x, eps)
            rows.append({"case": name, "method": method, "abs": a, "rel": r, "ratio": q})
    return rows


def markdown(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "| input (float32) | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for case in dict.fromkeys(r["case"] for r in rows):
        cells = []
        for m in methods:
            r = next(r for r in rows if r["case"] == case and r["method"] == m)
            cells.append(f"{r['abs']:.1e} / {r['rel']:.1e}{'' if r['ratio'] <= 1 else ' ✗'}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nEach cell: max abs error on |z| <= 10 / max relative error on |z| > 10 against float64; "
        "✗ marks a breach of rule 10 (1e-5 abs, 1e-6 relative).\n"
    )


def main(argv: list[str] | None = None) -> int:
    import znorm_kernels

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default="", help="comma-separated; default: every available one")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = [b for b in args.backends.split(",") if b] or znorm_kernels.available_backends()
    served = []
    for b in names:
        try:
            znorm_kernels.registry.resolve_backend(b, device)
        except RuntimeError:
            continue
        served.append(b)
    rows = table(methods_for(served), device)
    print(markdown(rows))
    return 1 if breaches(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

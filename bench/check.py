"""Accuracy against the float64 formula, as SPEC rule 10 states it, run before anything is timed.

For each tensor, z = (x - mean(x)) / (std(x) + eps) is computed in float64 from the same input values; a
result passes when |result - z| <= 1e-5 everywhere, plus, for float16 and bfloat16 results, half a unit in
the last place of the result's dtype at that value (the rounding of z into that dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ABS_TOL", "AccuracyError", "z_error", "z_float64"]

ABS_TOL = 1e-5


class AccuracyError(AssertionError):
    """A backend of ours gave z-scores outside SPEC rule 10's tolerance."""


def _half_ulp(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Half a unit in the last place of ``dtype`` at the magnitude of ``values`` (float64, elementwise)."""
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]  # including the implicit bit
    _, exponent = torch.frexp(values)  # values = m * 2**e, 0.5 <= |m| < 1
    return torch.ldexp(torch.ones_like(values), exponent - mantissa_bits)


def z_float64(x: Tensor, eps: float) -> Tensor:
    """The float64 z-scores of ``x``, flattened: (x - mean(x)) / (std(x) + eps), population std."""
    v = x.detach().double().reshape(-1)
    var, mean = torch.var_mean(v, correction=0)
    return (v - mean) / (var.sqrt() + eps)


def z_error(results: list[Tensor], expected: list[Tensor]) -> tuple[float, float]:
    """(max abs error, max of error minus allowed error) of ``results`` against ``expected``, the float64
    z-scores of the inputs (``z_float64``); the second is <= 0 when every element is within SPEC rule 10's
    tolerance."""
    worst = 0.0
    worst_excess = float("-inf")
    for out, z in zip(results, expected):
        if out.numel() < 2:
            continue
        got = out.detach().double().reshape(-1)
        err = (got - z).abs()
        allowed = torch.full_like(z, ABS_TOL)
        if out.dtype in (torch.bfloat16, torch.float16):
            allowed = allowed + _half_ulp(torch.maximum(z.abs(), got.abs()), out.dtype)
        err_max = float(err.max())
        if err_max != err_max:  # NaN in the result: never within tolerance
            return float("nan"), float("inf")
        worst = max(worst, err_max)
        worst_excess = max(worst_excess, float((err - allowed).max()))
    return worst, worst_excess

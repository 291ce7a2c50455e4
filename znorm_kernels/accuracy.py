"""Rule 10 of the contract, the accuracy the library promises, as code: results are compared with the
float64 z-scores of the same input values; a result passes when |result - z| <= 1e-5 where |z| <= 10 and
<= 1e-6 |z| beyond (an outlier's own z-score), plus, for float16 and bfloat16 results, half a unit in the last
place of the result's dtype at that value (the rounding of z into that dtype). The diagnostics' self-check,
the benchmark and the tests all judge by these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ABS_TOL", "AccuracyError", "allowed_error", "half_ulp", "z_error", "z_float64"]

ABS_TOL = 1e-5


class AccuracyError(AssertionError):
    """A backend of ours gave z-scores outside contract rule 10's tolerance."""


# Mantissa bits (without the implicit one): half an ulp of x is 2**(floor(log2|x|) - bits - 1).
_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def half_ulp(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Half a unit in the last place of ``dtype`` at each of ``values`` (float64), for rounding bounds."""
    mag = values.abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - _MANTISSA_BITS[dtype] - 1)


def allowed_error(expected: Tensor, got: Tensor, dtype: torch.dtype, atol: float = ABS_TOL) -> Tensor:
    """Rule 10's bound on |got - expected|, elementwise (float64 tensors of z-scores): ``atol`` up to |z| = 10
    and ``atol`` / 10 relative beyond, plus for float16 and bfloat16 results the rounding of the result into
    that dtype. The tests use it too."""
    bound = atol * torch.clamp(expected.abs() / 10, min=1.0)
    if dtype in (torch.float16, torch.bfloat16):
        bound = bound + half_ulp(torch.maximum(expected.abs(), got.abs()), dtype)
    return bound


def z_float64(x: Tensor, eps: float) -> Tensor:
    """The float64 z-scores of ``x``, flattened: (x - mean(x)) / (std(x) + eps), population std."""
    v = x.detach().double().reshape(-1)
    var, mean = torch.var_mean(v, correction=0)
    return (v - mean) / (var.sqrt() + eps)


def z_error(results: list[Tensor], expected: list[Tensor]) -> tuple[float, float]:
    """(max abs error, max of error minus allowed error) of ``results`` against ``expected``, the float64
    z-scores of the inputs (``z_float64``); the second is <= 0 when every element is within contract rule 10's
    tolerance."""
    worst = 0.0
    worst_excess = float("-inf")
    for out, z in zip(results, expected):
        if out.numel() < 2:
            continue
        got = out.detach().double().reshape(-1)
        err = (got - z).abs()
        allowed = allowed_error(z, got, out.dtype)
        err_max = float(err.max())
        if err_max != err_max:  # NaN in the result: never within tolerance
            return float("nan"), float("inf")
        worst = max(worst, err_max)
        worst_excess = max(worst_excess, float((err - allowed).max()))
    return worst, worst_excess

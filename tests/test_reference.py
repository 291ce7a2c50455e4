"""The reference itself: it is the oracle, so it gets checks of its own beyond the per-backend rule suite."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from tests.utils import assert_close_to_float64, float64_znorm, make_grad
from znorm_kernels import dispatch, reference


def naive_znorm_(g: torch.Tensor, eps: float = 1e-10) -> None:
    """What a user writes first; the contract rules are there because this fails them."""
    g.copy_((g - g.mean()) / (g.std(correction=0) + eps))


def one_pass_znorm_(g: torch.Tensor, eps: float = 1e-10) -> None:
    """E[x^2] - E[x]^2 in float32: cancellation."""
    m = g.mean()
    var = (g * g).mean() - m * m
    g.copy_((g - m) / (var.clamp_min(0).sqrt() + eps))


def test_constant_tensor_exact_zero_where_naive_fails():
    g = torch.full((7,), 0.1)
    naive = g.clone()
    naive_znorm_(naive)
    assert not torch.equal(naive, torch.zeros(7)), "the checker must be able to see the naive formula fail"
    reference.znorm_([g])
    assert torch.equal(g, torch.zeros(7))


def test_checker_rejects_cancellation():
    g = make_grad((10_000,), torch.float32, mean=1.0, std=1e-3)
    x = g.clone()
    bad = g.clone()
    one_pass_znorm_(bad)
    with pytest.raises(AssertionError):
        assert_close_to_float64(bad, x, atol=1e-3)
    reference.znorm_([g])
    assert_close_to_float64(g, x)


def test_no_host_read_of_values():
    # Meta tensors have no data: any .item(), .cpu() or data-dependent branch would raise here.
    grads = [
        torch.empty(s, device="meta", dtype=dt)
        for s, dt in [((64, 3, 3), torch.float32), ((1000,), torch.bfloat16), ((5,), torch.float16)]
    ]
    reference.znorm_(grads)
    reference.znorm_(grads, grad_scale=torch.tensor(8.0, device="meta"))


def test_accumulation_dtype():
    assert reference.accumulation_dtype(torch.float64) == torch.float64
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert reference.accumulation_dtype(dt) == torch.float32


def test_only_reference_backend():
    with pytest.raises(ValueError, match="reference"):
        reference.znorm_([torch.randn(3)], backend="triton")


def test_correction_beyond_size_follows_the_formula():
    # n <= correction: the variance divides by zero and std is inf as in torch.std, so z is (g - mean) / inf.
    g = torch.tensor([1.0, 2.0, 4.0])
    x = g.clone()
    reference.znorm_([g], correction=3)
    torch.testing.assert_close(g.double(), float64_znorm(x, correction=3))
    assert torch.equal(g, torch.zeros(3))


def test_public_reference_takes_a_plain_number_as_scale():
    """reference.znorm_ has the public znorm_'s signature, grad_scale as a number included."""
    x = torch.randn(50, dtype=torch.float64)
    a, b = x.clone(), x.clone()
    reference.znorm_([a], grad_scale=8.0)
    dispatch.run_znorm_([b], 1e-10, 0, "reference", torch.tensor(8.0), None)
    assert torch.equal(a, b)


def test_errors_name_the_parameter():
    # reference.znorm_ passes names through to the checks, as the public znorm_ does.
    with pytest.raises(TypeError, match=r"^znorm_: tensor at position 1 \(parameter 'fc\.weight'\)"):
        reference.znorm_([torch.randn(3), torch.zeros(3, dtype=torch.int32)], names=["fc.bias", "fc.weight"])


def _exact_mean_std(values: list[float]) -> tuple[Fraction, float]:
    xs = [Fraction(v) for v in values]
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in xs) / len(xs))


U = 2.0**-52  # one ulp of 1.0


@pytest.mark.parametrize(
    "values",
    [
        [1.0, 1.0, 1.0 + U],  # the exact mean 1 + U/3 is no float64; the deviations are a few ulps
        [1e8 + 0.001 * k for k in (0, 3, 5, 7, 11, 13, 17, 19, 23)],  # spread 1e-10 of the mean
        [1e8 + 0.25 * k for k in (0, 3, 5, 7, 11, 13, 17)],
    ],
    ids=["ulp", "offset", "offset2"],
)
@pytest.mark.parametrize("eps", [0.0, 1e-10])
def test_z_scores_and_statistics_exact_where_the_mean_is_not_representable(values, eps):
    """The corrected two-pass: z-scores within a few ulps of the exact ones, the reported mean correctly
    rounded and the std exact to float64 precision, although the spread is a few ulps (or 1e-10) of the
    mean: centring on a rounded mean, or correcting it the wrong way, is off by whole percents here."""
    mean, std = _exact_mean_std(values)
    z = [float((Fraction(v) - mean) / Fraction(std + eps)) for v in values]
    want = torch.tensor(z, dtype=torch.float64)
    g = torch.tensor(values, dtype=torch.float64)
    stats = torch.empty(2, dtype=torch.float64)
    reference.znorm_tensor_(g, eps, 0, None, stats)
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
    assert stats[0].item() == float(mean)
    assert math.isclose(stats[1].item(), std, rel_tol=1e-14)


@pytest.mark.parametrize("value", [0.1, -3e300, 1e-310])
def test_statistics_of_a_constant_tensor(value):
    # Rule 3's exact test: the mean is the value itself and the std exactly 0 (whatever the scaling).
    g = torch.full((5,), value, dtype=torch.float64)
    stats = torch.empty(2, dtype=torch.float64)
    reference.znorm_tensor_(g, 1e-10, 0, None, stats)
    assert stats.tolist() == [value, 0.0] and torch.equal(g, torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("scale", [2.0**-700, 2.0**-300, 1.0, 2.0**300, 2.0**700])
def test_statistics_of_far_values_are_unscaled(scale):
    """Values beyond 2**500 (or below 2**-500) are normalized scaled by a power of two; the mean and std
    reported are those of the values as given."""
    x = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.25], dtype=torch.float64)
    g = x * scale
    stats = torch.empty(2, dtype=torch.float64)
    reference.znorm_tensor_(g, 0.0, 0, None, stats)
    want = torch.stack([x.mean(), x.std(correction=0)]) * scale
    torch.testing.assert_close(stats, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(g, float64_znorm(x, 0.0), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("eps", [1e-10, 0.1])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64])
def test_grad_scale_meets_a_large_eps_in_float64(eps, scale_dtype):
    """s*g becomes s * (s*g - mean) / (std(s*g) + s*eps), computed in float64 whatever the scale's dtype (a
    float32 s*eps would be off by ~1e-8 relative), with eps large enough to weigh in the denominator."""
    x = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s = 3.0
    g = x * s
    reference.znorm_([g], eps=eps, grad_scale=torch.tensor(s, dtype=scale_dtype))
    torch.testing.assert_close(g, float64_znorm(x * s, eps, scale=s), rtol=1e-13, atol=1e-13)


def test_write_z_takes_a_plain_eps_and_any_scale_dtype():
    """write_z_ (which the DTensor path shares) accepts eps as a number, and computes s * c / (std + s*eps)
    in float64 with a float32 scale too (s*eps in float32 would be off by ~1e-8 relative)."""
    from znorm_kernels.backends.reference import write_z_

    x = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    centred = x - x.mean()
    std = centred.square().mean().sqrt()
    for scale in (torch.tensor(3.0), torch.tensor(3.0, dtype=torch.float64)):
        g = torch.empty(4, 10, dtype=torch.float64)
        write_z_(g, centred, std, 0.1, scale)
        want = 3.0 * centred / (std + 3.0 * 0.1)
        torch.testing.assert_close(g.reshape(-1), want, rtol=1e-15, atol=1e-15)

"""The reference itself: it is the oracle, so it gets checks of its own beyond the per-backend rule suite."""

from __future__ import annotations

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

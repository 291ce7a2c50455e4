"""Rules 3 and 10 on inputs built to break them: outliers at the first element, at tile and chunk starts, at
the end and several at once; large offsets; constant and near-constant tensors; huge and tiny magnitudes. The
fixed cases are the benchmark's (bench/adversarial.py), for every (backend, device) pair this process has;
the property tests that draw such inputs are in test_numerics_properties.py (they need hypothesis)."""

from __future__ import annotations

import pytest
import torch

import znorm_kernels
from bench.adversarial import CASES, eager_loop_, make_case
from tests.utils import assert_close_to_float64, backends_under_test

BACKENDS = backends_under_test()
backend_device = pytest.mark.parametrize(
    ("backend", "device"), BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS]
)


@backend_device
@pytest.mark.parametrize("case", list(CASES))
def test_rule10_adversarial_inputs(backend, device, case):
    x, eps = make_case(case, device)
    g = x.clone()
    znorm_kernels.znorm_([g], eps=eps, backend=backend)
    assert_close_to_float64(g, x, eps=eps)


def test_adversarial_inputs_break_the_eager_loop():
    """The cases are not toothless: the float32 loop a user writes breaks rule 10 on the offset and
    near-constant ones (so the checker can tell a careless computation from ours)."""
    for case in ("mean 1e4, std 1e-2 (10k)", "near-constant, one ulp apart (5000)"):
        x, eps = make_case(case)
        g = x.clone()
        eager_loop_([g], eps)
        with pytest.raises(AssertionError):
            assert_close_to_float64(g, x, eps=eps)


@backend_device
@pytest.mark.parametrize("n", [2, 3, 4097, 8193, 70_000])
def test_rule10_outlier_positions(backend, device, n):
    """One outlier wherever a block, tile or chunk starts or ends (8192-element Triton tiles, which are the
    chunks of tensors up to 2**20 elements, the CUDA backend's blocks, 16384-element CPU items), each in its
    own tensor, all in one call."""
    positions = sorted({p for p in (0, 1, 4095, 4096, 8191, 8192, 16384, 65535, 65536, n - 1) if p < n})
    inputs = []
    for k, p in enumerate(positions):
        g = torch.Generator().manual_seed(k)
        x = (torch.randn(n, generator=g, dtype=torch.float64) * 1e-3).float()
        x[p] = 5.0 * (-1) ** k
        inputs.append(x.to(device))
    grads = [x.clone() for x in inputs]
    znorm_kernels.znorm_(grads, backend=backend)
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x)


@backend_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rule03_near_constant_is_not_constant(backend, device, dtype):
    """One element a single ulp away: not constant, so its z-scores are the formula's (large for the odd
    element), not zeros; the all-equal rest get the same value. (float64 tensors are left out: their mean is
    kept in float64, so a spread of one float64 ulp is beyond it; docs/contract.md says so.)"""
    n = 1000
    x = torch.full((n,), 0.1, dtype=dtype)
    x[7] = torch.nextafter(x[7], torch.tensor(1.0, dtype=dtype))
    g = x.clone().to(device)
    znorm_kernels.znorm_([g], eps=0.0, backend=backend)
    assert_close_to_float64(g, x, eps=0.0)
    assert g[7] > 30 and (g[:7] == g[0]).all()

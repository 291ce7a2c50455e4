"""Rules 3 and 10 on inputs built to break them: outliers at the first element, at tile and chunk starts, at
the end and several at once; large offsets; constant and near-constant tensors; huge and tiny magnitudes. The
fixed cases are the benchmark's (bench/adversarial.py); the property tests draw sizes, scales, offsets and
outlier positions and magnitudes with hypothesis, for every (backend, device) pair this process has."""

from __future__ import annotations

import pytest
import torch

import znorm_kernels
from bench.adversarial import CASES, eager_loop_, make_case
from tests.utils import assert_close_to_float64, backends_under_test, float64_znorm
from znorm_kernels.backends.tiles import Tiles

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BACKENDS = backends_under_test()
backend_device = pytest.mark.parametrize(
    ("backend", "device"), BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS]
)
PROPERTY = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
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


@st.composite
def adversarial_tensor(draw, max_n: int = 3000):
    """A float32 input with finite z-scores: noise at some scale around some offset, with outliers, or a
    constant or near-constant tensor."""
    n = draw(st.integers(2, max_n))
    kind = draw(st.sampled_from(["noise", "noise", "noise", "constant", "near-constant"]))
    scale = 10.0 ** draw(st.integers(-30, 30))
    value = draw(st.sampled_from([0.0, 0.1, -3.7, 1.0, 1e4])) * scale
    if kind == "constant":
        return torch.full((n,), value, dtype=torch.float32)
    if kind == "near-constant":
        x = torch.full((n,), value if value else scale, dtype=torch.float32)
        i = draw(st.integers(0, n - 1))
        x[i] = torch.nextafter(x[i], torch.tensor(float("inf")))
        return x
    seed = draw(st.integers(0, 2**31 - 1))
    offset = draw(st.sampled_from([0.0, 1.0, -1e3, 1e6])) * scale
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale + offset
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from([0, n - 1, n // 2, min(8192, n - 1), draw(st.integers(0, n - 1))]))
        x[where] = offset + scale * draw(st.sampled_from([-1.0, 1.0])) * 10.0 ** draw(st.integers(1, 6))
    return x.float()


def _check(g, x, eps):
    if (x == x[0]).all():
        assert torch.equal(g.cpu(), torch.zeros_like(x)), "rule 3: a constant tensor becomes exactly 0"
    else:
        assert torch.isfinite(float64_znorm(x, eps)).all()
        assert_close_to_float64(g, x, eps=eps)


@backend_device
@PROPERTY
@given(x=adversarial_tensor(), eps=st.sampled_from([1e-10, 0.0]))
def test_rule10_property_any_float32_input(backend, device, x, eps):
    g = x.clone().to(device)
    znorm_kernels.znorm_([g], eps=eps, backend=backend)
    _check(g, x, eps)


@pytest.mark.skipif(not any(b == "triton" for b, _ in BACKENDS), reason="Triton is not available here")
@PROPERTY
@given(x=adversarial_tensor(max_n=2500), block=st.sampled_from([32, 64, 256]))
def test_rule10_property_triton_chunked(x, block):
    """Triton with small tiles, so that the drawn sizes exercise chunking, the Chan merges and (past 2**20 /
    block partials per vector step) every size class of the kernel."""
    from znorm_kernels.backends import triton_host

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = x.clone().to(device)
    triton_host.znorm_group_([g], 1e-10, 0, None, tiles=Tiles(block))
    _check(g, x, 1e-10)

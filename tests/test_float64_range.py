"""float64 tensors near the top of float64's range, where a plain sum or square overflows, and near the
bottom, where squares underflow: rule 3 (a constant tensor of any finite value becomes exactly 0), finite
inputs give finite outputs, and the z-scores are those of the formula (rule 10's bound) on every backend, the
fused optimizer steps and the DTensor path's merges included. The oracle (tests.utils.float64_znorm) scales
the values by a power of two first (exact), so it neither overflows nor underflows itself."""

from __future__ import annotations

import math

import pytest
import torch

import znorm_kernels
from tests.utils import backends_under_test, float64_znorm
from znorm_kernels.accuracy import allowed_error

PAIRS = backends_under_test()
backend_device = pytest.mark.parametrize(("backend", "device"), PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
MAX = torch.finfo(torch.float64).max


def exact_z(x: torch.Tensor, eps: float = 1e-10, correction: float = 0) -> torch.Tensor:
    """The formula's float64 z-scores of x (float64_znorm scales huge values first: no overflow)."""
    return float64_znorm(x.reshape(-1), eps, correction)


def assert_exact(got: torch.Tensor, x: torch.Tensor, eps: float = 1e-10, correction: float = 0) -> None:
    want = exact_z(x, eps, correction)
    out = got.detach().double().cpu().reshape(-1)
    assert bool(torch.isfinite(out).all()), "finite inputs give finite outputs"
    assert bool(((out - want).abs() <= allowed_error(want, out, torch.float64)).all()), float(
        (out - want).abs().max()
    )


def range_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(5000, generator=g, dtype=torch.float64) * 2 - 1
    mixed = torch.randn(20_000, generator=g, dtype=torch.float64)
    mixed[12_345] = 1e300  # one huge value among ordinary ones, past the first chunk of every backend
    offset = 1e306 + torch.randn(3000, generator=g, dtype=torch.float64) * 1e300
    tiny_mixed = torch.randn(20_000, generator=g, dtype=torch.float64) * 1e-200
    tiny_mixed[:9000] *= 1e-100  # tiles and chunks of still tinier values
    return {
        "top of the range": spread * MAX,  # sums of these overflow; so do their squares
        "both signs at the top": torch.tensor([MAX, -MAX, 0.0, MAX / 3, -MAX / 7], dtype=torch.float64),
        "one huge outlier": mixed,
        "huge offset": offset,
        "chunked at the top": (torch.rand(40_000, generator=g, dtype=torch.float64) - 0.5) * 1e308,
        "tiny": torch.randn(5000, generator=g, dtype=torch.float64) * 1e-160,  # squares underflow
        "tiny, subnormal": torch.tensor([5e-324, 1e-323, 0.0, -2e-323, 7e-323], dtype=torch.float64),
        "tiny, chunked": tiny_mixed,
    }


@backend_device
@pytest.mark.parametrize("value", [1e308, -MAX, MAX, 1e200, -3e155, 1e-200, -5e-324, 2.2e-308], ids=str)
@pytest.mark.parametrize("n", [2, 7, 20_000])
def test_rule3_a_constant_tensor_of_any_value_becomes_zero(backend, device, value, n):
    for eps in (1e-10, 0.0):
        g = torch.full((n,), value, dtype=torch.float64, device=device)
        znorm_kernels.znorm_([g], eps=eps, backend=backend)
        assert torch.equal(g.cpu(), torch.zeros(n, dtype=torch.float64)), (eps, g[:3])


@backend_device
@pytest.mark.parametrize("case", list(range_cases()))
def test_huge_values_give_the_formulas_z_scores(backend, device, case):
    x = range_cases()[case]
    g = x.clone().to(device)
    stats = torch.empty((1, 2), dtype=torch.float64, device=device)
    fn = znorm_kernels.registry.group_fn(znorm_kernels.registry.resolve_backend(backend, device))
    fn([g], 0.0 if "tiny" in case else 1e-10, 0.0, None, stats=stats)
    if case == "tiny, subnormal" and backend != "reference":
        # Every value subnormal: the kernels keep the mean unscaled, where a subnormal holds too few bits for
        # it (docs/limits.md). The outputs are finite all the same; the reference is exact.
        assert bool(torch.isfinite(g).all())
        return
    assert_exact(g, x, eps=0.0 if "tiny" in case else 1e-10)
    # The statistics the normalization used: finite, the mean within the values' range.
    mean, std = stats[0].tolist()
    assert math.isfinite(mean) and math.isfinite(std) and std > 0
    assert float(x.min()) <= mean <= float(x.max())


@backend_device
def test_huge_values_with_correction_eps_and_company(backend, device):
    # correction and eps reach the scaled arithmetic; a huge tensor does not disturb its neighbours.
    cases = range_cases()
    x = cases["both signs at the top"]
    other = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gs = [x.clone().to(device), other.clone().to(device)]
    znorm_kernels.znorm_(gs, eps=0.5, correction=1, backend=backend)
    assert_exact(gs[0], x, 0.5, 1)
    torch.testing.assert_close(gs[1].cpu(), float64_znorm(other, 0.5, 1), atol=1e-12, rtol=1e-12)


@backend_device
def test_nan_and_inf_still_propagate(backend, device):
    # Rule 4 beside the scaled path: a huge tensor holding Inf or NaN comes out non-finite.
    for bad in (float("inf"), float("nan")):
        x = range_cases()["top of the range"].clone()
        x[17] = bad
        g = x.to(device)
        znorm_kernels.znorm_([g], backend=backend)
        assert not bool(torch.isfinite(g).all())


@pytest.mark.parametrize("cls", ["ZNormSGD", "ZNormAdam"])
@pytest.mark.parametrize("backend", [b for b, d in PAIRS if b != "reference"] + ["reference"])
def test_the_optimizers_take_huge_float64_gradients(cls, backend):
    # The fused steps apply the z-scores as they load the gradient: finite z, finite updates.
    device = dict(PAIRS).get(backend, "cpu")
    x = range_cases()["one huge outlier"]
    p = torch.nn.Parameter(torch.zeros_like(x, device=device))
    from znorm_kernels import optim

    opt = getattr(optim, cls)([p], lr=1.0, backend=backend, normalize_grad=True)
    p.grad = x.clone().to(device)
    opt.step()
    assert_exact(p.grad, x)
    assert bool(torch.isfinite(p).all())


def test_the_host_merges_keep_huge_shards_finite():
    # The DTensor path's rows: local statistics of shards, merged in rank order, then the rows the normalize
    # pass applies: the same z-scores as the whole tensor's, constants exactly 0.
    from znorm_kernels.backends import triton_host
    from znorm_kernels.distributed import local_statistics, merge_statistics

    constant = torch.full((9,), -MAX, dtype=torch.float64)
    cases = range_cases()
    for x in (cases["top of the range"], cases["one huge outlier"], cases["tiny, chunked"], constant):
        shards = x.tensor_split(3)
        merged = merge_statistics(torch.stack([local_statistics(s).unsqueeze(0) for s in shards]))
        rows = triton_host.apply_rows(merged, 0.0, 0)
        mean, std, inv, wide = rows[0].tolist()
        assert all(math.isfinite(v) for v in (mean, std, inv, wide))
        if bool((x == x[0]).all()):
            assert (mean, std, inv) == (float(x[0]), 0.0, 0.0)
            continue
        want = exact_z(x, eps=0.0)
        z = (x * wide - mean * wide) * inv if wide else (x - mean) * inv
        assert bool(((z - want).abs() <= allowed_error(want, z, torch.float64)).all())


def _above(v: float) -> float:
    return math.nextafter(v, math.inf)


def _below(v: float) -> float:
    return math.nextafter(v, 0.0)


HUGE, TINY = 2.0**400, 2.0**-400
FACTORS = [  # largest magnitude -> factor: strictly beyond HUGE, strictly below TINY (and nonzero), finite
    (1.0, 1.0),
    (HUGE, 1.0),
    (_above(HUGE), 2.0**-600),
    (MAX, 2.0**-600),
    (math.inf, 1.0),
    (TINY, 1.0),
    (_below(TINY), 2.0**600),
    (5e-324, 2.0**600),
    (0.0, 1.0),
    (math.nan, 1.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factor_of_thresholds(dtype):
    """The kernels scale a run strictly beyond HUGE or strictly below TINY (csrc/znorm.h, triton_moments.py):
    the host's factor must agree at the very boundaries, or it would mis-read the scale of an M2 it merges.
    The largest magnitude counts whichever bound holds it; the factor is float64 whatever the bounds' dtype
    (a float32 2**-600 would be 0)."""
    from znorm_kernels.backends.float64_range import factor_of

    big = torch.tensor([b for b, _ in FACTORS], dtype=torch.float64)
    want = torch.tensor([f for _, f in FACTORS], dtype=torch.float64)
    if dtype != torch.float64:  # only the ordinary magnitudes exist in float32: all factor 1
        keep = (big == 0) | ((big >= 2.0**-100) & (big <= 2.0**100)) | big.isnan() | big.isinf()
        big, want = big[keep].to(dtype), want[keep]
    zero = torch.zeros_like(big)
    for lo, hi in ((-big, zero), (zero, big), (-big, big)):
        got = factor_of(lo, hi)
        assert got.dtype == torch.float64
        assert torch.equal(got, want), (lo, hi, got)


SCALES = [  # largest magnitude -> e: 2**e, 2**-e are the reference's scales
    (1.0, 0),
    (3.0, 0),
    (2.0**500, 0),
    (_above(2.0**500), 501),
    (2.0**-500, 0),
    (_below(2.0**-500), -500),
    (2.0**-600, -599),
    (5e-324, -1000),  # frexp's exponent -1073, clamped
    (MAX, 1000),  # frexp's exponent 1024, clamped
    (0.0, 0),
    (math.inf, 0),
    (math.nan, 0),
]


def test_scales_of_only_scales_far_values():
    """scales_of leaves every tensor whose largest magnitude lies in [2**-500, 2**500] unscaled (the
    reference's arithmetic on them is that of the plain formula, bit for bit), scales the others by the
    power of two of that magnitude, clamped to [-1000, 1000], and leaves 0, Inf and NaN alone."""
    from znorm_kernels.backends.float64_range import scales_of

    big = torch.tensor([b for b, _ in SCALES], dtype=torch.float64)
    want = torch.tensor([e for _, e in SCALES], dtype=torch.float64)
    for lo, hi in ((-big, torch.zeros_like(big)), (big / 2, big)):
        grow, shrink = scales_of(lo, hi)
        assert torch.equal(grow, torch.exp2(want)), grow
        assert torch.equal(shrink, torch.exp2(-want)), shrink

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

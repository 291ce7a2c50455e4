"""Rules 3 and 10 for inputs hypothesis draws: every dtype; sizes small, at random, and around the places
where the kernels split a tensor (Triton's 8192-element tiles, the CPU backend's 16384-element items, the
CUDA backend's 8192-element blocks, and multiples); noise at any scale the dtype holds, around offsets, with
outliers at the first element, the last, a tile's start and anywhere; constant and near-constant tensors.
Every (backend, device) pair this process has, and Triton with small tiles, so that drawn sizes cross many
tiles and chunk partials."""

from __future__ import annotations

import pytest
import torch

import znorm_kernels
from tests.utils import assert_close_to_float64, backends_under_test
from znorm_kernels.backends.tiles import Tiles

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

BACKENDS = backends_under_test()
backend_device = pytest.mark.parametrize(
    ("backend", "device"), BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS]
)
PROPERTY = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
# Decimal exponents of the scales each dtype holds with room for outliers (float16's range is narrow).
SCALES = {
    torch.float32: (-30, 30),
    torch.bfloat16: (-30, 30),
    torch.float16: (-3, 2),
    torch.float64: (-300, 290),
}
# Where the kernels split a tensor: tiles, CPU items, CUDA blocks, and multiples of them.
BOUNDARIES = (8192, 16384, 24576, 32768)


@st.composite
def sizes(draw, max_n: int) -> int:
    kind = draw(st.sampled_from(["small", "small", "boundary", "any"]))
    if kind == "small":
        return draw(st.integers(2, min(300, max_n)))
    near = [b for b in BOUNDARIES if b + 3 <= max_n]
    if kind == "boundary" and near:
        return draw(st.sampled_from(near)) + draw(st.integers(-3, 3))
    return draw(st.integers(2, max_n))


@st.composite
def adversarial_tensor(draw, max_n: int = 40_000, dtypes=tuple(SCALES)):
    """An input of a drawn dtype whose values are finite in that dtype: noise at some scale around some
    offset, with outliers, or a constant or near-constant tensor."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(sizes(max_n))
    lo, hi = SCALES[dtype]
    scale = 10.0 ** draw(st.integers(lo, hi))
    kinds = ["noise", "noise", "noise", "constant", "near-constant"]
    if dtype == torch.float64:
        # A float64 tensor's mean is float64 alone: a spread of a few float64 ulps is beyond it (and beyond
        # the float64 oracle), which docs/limits.md says; rule 10 is stated for the other dtypes.
        kinds.remove("near-constant")
    kind = draw(st.sampled_from(kinds))
    if kind == "constant":
        value = draw(st.sampled_from([0.0, 0.1, -3.7, 1.0, 1e4])) * scale
        x = torch.full((n,), value, dtype=torch.float64).to(dtype)
    elif kind == "near-constant":
        x = torch.full((n,), scale, dtype=torch.float64).to(dtype)
        i = draw(st.integers(0, n - 1))
        x[i] = torch.nextafter(x[i], torch.tensor(float("inf"), dtype=dtype))
    else:
        seed = draw(st.integers(0, 2**31 - 1))
        offset = draw(st.sampled_from([0.0, 1.0, -1e3, 1e6])) * scale
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, generator=g, dtype=torch.float64) * scale + offset
        for _ in range(draw(st.integers(0, 3))):
            where = draw(st.sampled_from([0, n - 1, n // 2, min(8192, n - 1), draw(st.integers(0, n - 1))]))
            x[where] = offset + scale * draw(st.sampled_from([-1.0, 1.0])) * 10.0 ** draw(st.integers(1, 6))
        x = x.to(dtype)
    assume(bool(torch.isfinite(x).all()))
    return x


def _check(g, x, eps):
    if (x == x[0]).all():
        assert torch.equal(g.cpu(), torch.zeros_like(x)), "rule 3: a constant tensor becomes exactly 0"
    else:
        assert_close_to_float64(g, x, eps=eps)


@backend_device
@PROPERTY
@given(x=adversarial_tensor(), eps=st.sampled_from([1e-10, 0.0]))
def test_rule10_property_any_input(backend, device, x, eps):
    g = x.clone().to(device)
    znorm_kernels.znorm_([g], eps=eps, backend=backend)
    _check(g, x, eps)


@pytest.mark.skipif(not any(b == "triton" for b, _ in BACKENDS), reason="Triton is not available here")
@PROPERTY
@given(x=adversarial_tensor(max_n=2500), block=st.sampled_from([32, 64, 256]), unroll=st.sampled_from([1, 2]))
def test_rule10_property_triton_chunked(x, block, unroll):
    """Triton with small tiles, chunks of several tiles and tensors above a small large_tensor, so that the
    drawn sizes exercise chunking, the Chan merges across tiles and the merge of many partials."""
    from znorm_kernels.backends import triton_host

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = x.clone().to(device)
    tiles = Tiles(
        block, unroll if x.dtype != torch.float64 else 1, mid_chunk=2, large_tensor=1000, merge_block=8
    )
    triton_host.znorm_group_([g], 1e-10, 0, None, tiles=tiles)
    _check(g, x, 1e-10)

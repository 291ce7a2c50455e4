"""Every rule of docs/contract.md, for every backend this process has, against the float64 formula and the
reference. Test names carry the rule they check (test_ruleNN_...); rule 8 (bad input) is in test_dispatch.py,
rule 9 (no host sync) in test_reference.py and the GPU tests, rules 3/10 on adversarial inputs in
test_numerics.py, rule 11 (the same memory twice) in test_overlap.py."""

from __future__ import annotations

import pytest
import torch

import znorm_kernels
from tests.utils import (
    DTYPES,
    assert_close_to_float64,
    backends_under_test,
    float64_znorm,
    layouts,
    make_grad,
)
from znorm_kernels import reference

BACKENDS = backends_under_test()
ids = [f"{b}-{d}" for b, d in BACKENDS]
backend_device = pytest.mark.parametrize(("backend", "device"), BACKENDS, ids=ids)

# Sizes around the powers of two that block and chunk sizes are made of, plus odd and tiny ones.
SIZES = [2, 3, 7, 31, 32, 33, 127, 128, 129, 255, 256, 257, 1000, 1023, 1024, 1025, 4095, 4096, 4097, 9000]


def assert_znorm_matches_float64(g, backend, **options):
    """ZNorm on ``g`` alone, in place, with ``backend`` and ``options`` (eps, correction): rule 10 against its
    values before."""
    x = g.clone()
    znorm_kernels.znorm_([g], backend=backend, **options)
    assert_close_to_float64(g, x, **options)


@backend_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_rule10_matches_float64_formula(backend, device, dtype, n):
    g = make_grad((n,), dtype, device, seed=n)
    assert_znorm_matches_float64(g, backend)


@backend_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rule10_matches_reference(backend, device, dtype):
    shapes = [(2,), (5, 3), (16, 3, 3, 3), (64,), (10, 64), (3000,)]
    grads = [make_grad(s, dtype, device, seed=i) for i, s in enumerate(shapes)]
    expected = [g.clone() for g in grads]
    reference.znorm_(expected)
    znorm_kernels.znorm_(grads, backend=backend)
    for got, exp in zip(grads, expected):
        # Two float32 computations of the same formula: a few ulps apart at most, then the dtype's rounding.
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(got, exp, atol=tol, rtol=tol)


@backend_device
@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("eps", [1e-10, 1e-3, 0.5])
def test_formula_correction_and_eps(backend, device, correction, eps):
    g = make_grad((300,), torch.float32, device, std=0.01)
    assert_znorm_matches_float64(g, backend, eps=eps, correction=correction)


@backend_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (1, 1, 1), (0, 5)], ids=str)
def test_rule02_fewer_than_two_elements_unchanged(backend, device, dtype, shape):
    g = torch.full(shape, 3.25, dtype=dtype, device=device)
    before = g.clone()
    znorm_kernels.znorm_([g], backend=backend)
    assert torch.equal(g, before)


@backend_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.0, 0.1, -3.7, 1e4, 1e-30])
@pytest.mark.parametrize("n", [2, 7, 129, 5000])
def test_rule03_constant_tensor_is_exactly_zero(backend, device, dtype, value, n):
    g = torch.full((n,), value, dtype=dtype, device=device)
    znorm_kernels.znorm_([g], backend=backend)
    assert torch.equal(g, torch.zeros_like(g)), g


@backend_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 129, 5000])
def test_rule03_constant_tensor_is_exactly_zero_with_eps_zero(backend, device, dtype, n):
    # Rule 3 holds for eps=0 too: 0 / (0 + 0) is taken as 0, not NaN (with or without a grad scale).
    for scale in (None, torch.tensor(1024.0, device=device)):
        g = torch.full((n,), 0.1, dtype=dtype, device=device)
        znorm_kernels.znorm_([g], eps=0.0, backend=backend, grad_scale=scale)
        assert torch.equal(g, torch.zeros_like(g)), g
    # A varying tensor with eps=0 is the plain z-score, and NaN still propagates.
    g = make_grad((n,), dtype, device)
    assert_znorm_matches_float64(g, backend, eps=0.0)
    g = torch.full((n,), 0.1, dtype=dtype, device=device)
    g[-1] = float("nan")
    znorm_kernels.znorm_([g], eps=0.0, backend=backend)
    assert g.isnan().all()


@backend_device
@pytest.mark.parametrize("n", [1000, 100_000])
def test_rule03_no_cancellation(backend, device, n):
    # Rule 3: float32, mean 1, std 1e-3 (E[x^2]-E[x]^2 in float32 fails even 1e-3 here); rule 10's 1e-5 holds.
    g = make_grad((n,), torch.float32, device, mean=1.0, std=1e-3)
    assert_znorm_matches_float64(g, backend)
    # Far from zero too: mean 1e4, std 1.
    g = make_grad((n,), torch.float32, device, mean=1e4, std=1.0, seed=1)
    assert_znorm_matches_float64(g, backend)


@backend_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1, -1])
def test_rule04_nonfinite_confined_to_its_tensor(backend, device, dtype, bad, where):
    shapes = [(40,), (5000,), (7, 9)]
    grads = [make_grad(s, dtype, device, seed=i) for i, s in enumerate(shapes)]
    inputs = [g.clone() for g in grads]
    for k in range(len(grads)):
        gs = [g.clone() for g in inputs]
        gs[k].view(-1)[where] = bad
        znorm_kernels.znorm_(gs, backend=backend)
        assert not torch.isfinite(gs[k]).all(), f"tensor {k} holds {bad} but came out finite"
        for j, g in enumerate(gs):
            if j != k:
                assert_close_to_float64(g, inputs[j])


@backend_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 3, 5, 5), (33, 17), (4, 4, 4, 4)], ids=str)
def test_rule05_layouts_give_same_values_in_place(backend, device, dtype, shape):
    results = {}
    for name, g in layouts(shape, dtype, device).items():
        ident, strides, ptr = id(g), g.stride(), g.data_ptr()
        x = g.clone()
        znorm_kernels.znorm_([g], backend=backend)
        assert (id(g), g.stride(), g.data_ptr()) == (ident, strides, ptr)
        assert_close_to_float64(g, x)
        results[name] = g.contiguous()
    first = results.pop("contiguous")
    for name, r in results.items():
        # Same values in any layout: the reference's up to reduction order.
        torch.testing.assert_close(
            r, first, atol=2e-5, rtol=1e-3 if dtype != torch.float32 else 1e-5, msg=name
        )


@backend_device
def test_rule05_non_dense_view_leaves_gaps_untouched(backend, device):
    big = make_grad((6, 41), torch.float32, device)
    before = big.clone()
    view = big[:, 1::3]
    znorm_kernels.znorm_([view], backend=backend)
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[:, 1::3] = False
    assert torch.equal(big[mask], before[mask])
    assert_close_to_float64(view, before[:, 1::3])


@backend_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rule06_deterministic(backend, device, dtype):
    shapes = [(3, 3, 64, 64), (50_000,), (7,), (100, 129)]
    inputs = [make_grad(s, dtype, device, seed=i) for i, s in enumerate(shapes)]
    runs = []
    for _ in range(3):
        gs = [g.clone() for g in inputs]
        znorm_kernels.znorm_(gs, backend=backend)
        runs.append(gs)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@backend_device
def test_rule07_many_tensors_mixed_dtypes_one_call(backend, device):
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 300, (600,), generator=gen).tolist()
    grads = [make_grad((n,), DTYPES[i % len(DTYPES)], device, seed=i) for i, n in enumerate(sizes)]
    grads[5] = None
    inputs = [None if g is None else g.clone() for g in grads]
    znorm_kernels.znorm_(grads, backend=backend)
    for g, x in zip(grads, inputs):
        if g is None:
            continue
        if g.numel() < 2:
            assert torch.equal(g, x)
        else:
            assert_close_to_float64(g, x)


@backend_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rule01_low_precision_accumulates_in_float32(backend, device, dtype):
    # 200k elements around 100: the sum (2e7) and the sum of squares overflow float16 and lose everything in
    # bfloat16; accumulated in float32 the z-scores stay within rule 10.
    g = make_grad((200_000,), dtype, device, mean=100.0, std=3.0)
    assert_znorm_matches_float64(g, backend)


@backend_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_scale_keeps_gradients_scaled(backend, device, dtype):
    scale = 1024.0 if dtype == torch.float16 else 65536.0
    g = make_grad((500,), torch.float64, device, std=1e-3)
    scaled = (g * scale).to(dtype)
    x = scaled.clone()
    s = torch.tensor(scale, device=device)
    znorm_kernels.znorm_([scaled], backend=backend, grad_scale=s)
    # s * (s*g - mean) / (std + s*eps): the fused optimizer's division by s gives the z-scores.
    assert_close_to_float64(scaled, x, scale=scale)
    unscaled = scaled.to(torch.float64) / scale
    torch.testing.assert_close(
        unscaled,
        float64_znorm(x).to(device),
        atol=2e-2 if dtype != torch.float32 and dtype != torch.float64 else 1e-5,
        rtol=0,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_gradients_read_a_gpu_grad_scale_after_its_copy(backend):
    # Gradients offloaded to the CPU, the GradScaler's scale on the GPU behind a long kernel: a copy to the
    # host that does not wait returns before the scale is there, and the CPU would read the buffer's old
    # bytes.
    if backend not in znorm_kernels.available_backends():
        pytest.skip(f"{backend!r} is not available")
    # Each call's scale differs, so a buffer the allocators hand back holding the last call's scale fails too.
    x = make_grad((4096,), torch.float32, "cpu", seed=3)
    for value in (1024.0, 8.0, 65536.0):
        expected = x.clone()
        znorm_kernels.znorm_([expected], backend=backend, grad_scale=torch.tensor(value))
        torch.cuda._sleep(100_000_000)  # tens of ms of GPU time queued ahead of the scale and its copy
        scale = torch.full((), value, device="cuda")
        g = x.clone()
        znorm_kernels.znorm_([g], backend=backend, grad_scale=scale)
        assert torch.equal(g, expected)


@backend_device
def test_one_tensor_not_in_a_list(backend, device):
    g = make_grad((10, 10), torch.float32, device)
    x = g.clone()
    znorm_kernels.znorm_(g, backend=backend)
    assert_close_to_float64(g, x)


@backend_device
def test_generator_input(backend, device):
    grads = [make_grad((50,), torch.float32, device, seed=i) for i in range(3)]
    inputs = [g.clone() for g in grads]
    znorm_kernels.znorm_((g for g in grads), backend=backend)
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x)


@backend_device
def test_parameter_grads_and_leaves_requiring_grad(backend, device):
    p = torch.nn.Parameter(make_grad((20,), torch.float32, device))
    x = p.detach().clone()
    znorm_kernels.znorm_([p], backend=backend)  # a leaf that requires grad: in place under no_grad
    assert_close_to_float64(p, x)

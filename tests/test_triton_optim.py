"""The fused ZNorm optimizer kernels (znorm_kernels/backends/triton_optim*.py): SGD and Adam/AdamW steps that
apply ZNorm as they load the gradient, against torch.optim's own functional SGD and Adam (foreach=False) fed
with the z-scores, over several steps, for every option combination; found_inf, grad scale, write_grad,
tensors of one element, per-tensor step sizes, layouts; and the kernels compiled for sm_90.

On a CPU-only machine these run through TRITON_INTERPRET=1 (set by conftest.py), with small tiles."""

from __future__ import annotations

import re
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch.optim.sgd import sgd as torch_sgd

import znorm_kernels
import znorm_kernels.reference as reference
from tests.utils import (
    ADAM_OPTIONS,
    SGD_OPTIONS,
    adam_start,
    adam_step_sizes,
    compiled_ptx,
    make_grad,
    options_id,
    ptxas_usage,
    torch_adam_step,
)
from znorm_kernels.backends.optim_steps import AdamArgs, SgdArgs
from znorm_kernels.backends.tiles import UpdateTiles

pytestmark = pytest.mark.skipif(
    "triton" not in znorm_kernels.available_backends(), reason="Triton backend not available"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# Tiles of 64 elements (128 for float64 below) and items of 2 tiles: sizes below cover one element, partial
# tiles, several tiles per item and several items per tensor, at interpreter speed.
SMALL_BLOCK = 64
SIZES = [1, 5, 64, 130, 300]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=3e-2, atol=2e-2),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def small_tiles(dtype: torch.dtype) -> UpdateTiles:
    """Tiles small enough for the interpreter's sizes to cross tile and item boundaries (float64: half)."""
    return UpdateTiles(SMALL_BLOCK // 2 if dtype == torch.float64 else SMALL_BLOCK, tiles_per_item=2)


@pytest.fixture
def to(monkeypatch):
    """triton_optim with an empty plan cache, whose steps run with ``small_tiles``."""
    from znorm_kernels.backends import triton_optim, triton_optim_plan

    monkeypatch.setattr(triton_optim_plan, "plans", type(triton_optim_plan.plans)())

    def with_small_tiles(step):
        def run(params, *args, **kwargs):
            dtype = params[0].dtype if params else torch.float32
            return step(params, *args, tiles=small_tiles(dtype), **kwargs)

        return run

    return SimpleNamespace(
        plans=triton_optim_plan.plans,
        check=triton_optim.check,
        sgd_step_=with_small_tiles(triton_optim.sgd_step_),
        adam_step_=with_small_tiles(triton_optim.adam_step_),
    )


def stats_of(grads, grad_scale=None, eps=1e-10):
    from znorm_kernels.backends.triton_host import statistics

    return statistics(grads, eps, 0, grad_scale)


def params_of(dtype, seed=0, sizes=SIZES):
    return [make_grad((n,), dtype, DEVICE, seed=1000 + seed + n, mean=0.5, std=1.0) for n in sizes]


def grads_of(dtype, step, sizes=SIZES):
    return [make_grad((n,), dtype, DEVICE, seed=7 * step + n) for n in sizes]


def reference_z(grads):
    z = [g.clone() for g in grads]
    reference.znorm_(z)
    return z


def triton_z(grads, eps=1e-10):
    from znorm_kernels.backends.triton_host import znorm_group_

    z = [g.clone() for g in grads]
    znorm_group_([t for t in z if t.numel() >= 2], eps, 0)  # as dispatch does: it leaves tiny tensors alone
    return z


def assert_lists_close(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, i=i: f"{what}[{i}]: {m}")


def run_sgd(to, dtype, opts, steps=3, oracle=reference_z, lr=0.1):
    params = params_of(dtype)
    want = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    want_bufs = [None] * len(params)
    args = SgdArgs(lr=lr, **opts)
    for step in range(steps):
        grads = grads_of(dtype, step)
        z = oracle(grads)
        to.sgd_step_(params, grads, bufs, stats_of(grads), args, first=[step == 0] * len(params))
        torch_sgd(want, z, want_bufs, foreach=False, lr=lr, **opts)
        assert_lists_close(params, want, dtype, f"step {step} params")
        if opts["momentum"]:
            assert_lists_close(bufs, want_bufs, dtype, f"step {step} momentum_buffers")
    return params


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=options_id)
def test_sgd_matches_torch_on_z_scores(to, dtype, opts):
    run_sgd(to, dtype, opts)


def test_sgd_some_momentum_buffers_new(to):
    # Parameters added to the optimizer later get their momentum buffer at a later step: per-tensor flags.
    dtype = torch.float32
    opts = dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=False)
    params = params_of(dtype)
    want = [p.clone() for p in params]
    first = [True, False, True, False, False]
    bufs = [
        torch.zeros_like(p) if f else make_grad(p.shape, dtype, DEVICE, seed=50)
        for p, f in zip(params, first)
    ]
    want_bufs = [None if f else b.clone() for b, f in zip(bufs, first)]
    grads = grads_of(dtype, 0)
    z = reference_z(grads)
    to.sgd_step_(params, grads, bufs, stats_of(grads), SgdArgs(lr=0.1, **opts), first=first)
    torch_sgd(want, z, want_bufs, foreach=False, lr=0.1, **opts)
    assert_lists_close(params, want, dtype, "params")
    assert_lists_close(bufs, want_bufs, dtype, "momentum_buffers")


def run_adam(
    to,
    dtype,
    opts,
    steps=3,
    oracle=reference_z,
    lr=0.01,
    betas=(0.9, 0.999),
    eps=1e-8,
    step0=None,
    sizes=SIZES,
):
    params = params_of(dtype, sizes=sizes)
    want = [p.clone() for p in params]
    states, counts, _ = adam_start(params, step0)
    want_states, _, want_steps = adam_start(params, step0)
    beta1, beta2 = betas
    for step in range(steps):
        grads = grads_of(dtype, step, sizes)
        z = oracle(grads)
        counts = [c + 1 for c in counts]
        step_size, bc2 = adam_step_sizes(counts, lr, betas)
        args = AdamArgs(
            step_size=step_size, bias_correction2_sqrt=bc2, beta1=beta1, beta2=beta2, lr=lr, eps=eps, **opts
        )
        to.adam_step_(params, grads, *states, stats_of(grads), args)
        torch_adam_step(want, z, want_states, want_steps, opts, lr=lr, betas=betas, eps=eps)
        assert_lists_close(params, want, dtype, f"step {step} params")
        assert_lists_close(states[0], want_states[0], dtype, f"step {step} exp_avgs")
        assert_lists_close(states[1], want_states[1], dtype, f"step {step} exp_avg_sqs")
        if opts["amsgrad"]:
            assert_lists_close(states[2], want_states[2], dtype, f"step {step} max_exp_avg_sqs")
    return params


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", ADAM_OPTIONS, ids=options_id)
def test_adam_matches_torch_on_z_scores(to, dtype, opts):
    run_adam(to, dtype, opts)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_float32_matches_torch_on_the_hooks_z_scores_tightly(to, kind, monkeypatch):
    # Fed with the very z-scores the hook writes, float32 results agree with torch's to an ulp or two
    # (torch's CPU kernels use FMAs in add with alpha and in lerp; the fused kernel never contracts).
    monkeypatch.setitem(TOL, torch.float32, dict(rtol=3e-7, atol=1.2e-7))  # an ulp of 1
    if kind == "sgd":
        opts = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False)
        run_sgd(to, torch.float32, opts, oracle=triton_z)
    else:
        opts = dict(amsgrad=True, decoupled=False, weight_decay=0.01, maximize=True)
        run_adam(to, torch.float32, opts, oracle=triton_z)


def test_float16(to, monkeypatch):
    monkeypatch.setitem(TOL, torch.float16, dict(rtol=3e-3, atol=3e-3))
    opts = dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=False)
    run_sgd(to, torch.float16, opts)
    # eps=1e-8 rounds to 0 in float16, where torch's unfused Adam computes its denominator (then m / 0 = inf
    # where v underflows); the fused kernel computes in float32.
    run_adam(
        to, torch.float16, dict(amsgrad=True, decoupled=True, weight_decay=0.01, maximize=False), eps=1e-3
    )


def test_adam_per_tensor_step_counts(to):
    # Parameters added to the optimizer later have fewer steps: per-tensor step sizes in one launch.
    opts = dict(amsgrad=False, decoupled=True, weight_decay=0.01, maximize=False)
    run_adam(to, torch.float32, opts, step0=[0, 3, 0, 7, 1])


def test_adam_lerp_weight_above_half(to):
    # beta1 < 0.5: torch.lerp's second formula, end - (end - start) * (1 - weight).
    opts = dict(amsgrad=False, decoupled=False, weight_decay=0.0, maximize=False)
    run_adam(to, torch.float32, opts, betas=(0.3, 0.99))


def test_one_element_tensors_use_the_raw_gradient(to):
    # ZNorm leaves tensors of one element unchanged; statistics() gives them a constant row (z would be 0).
    g = [torch.tensor([0.75], device=DEVICE), make_grad((10,), torch.float32, DEVICE)]
    stats = stats_of(g)
    assert stats[0, 2].item() == 0.0  # inv of a "constant" tensor
    p = [torch.ones(1, device=DEVICE), torch.zeros(10, device=DEVICE)]
    args = SgdArgs(lr=0.5, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    to.sgd_step_(p, g, [None, None], stats, args, first=[True, True])
    assert p[0].item() == 1.0 - 0.5 * 0.75


def test_identity_row_gives_the_raw_gradient(to):
    # A row (0, *, 1, 0) leaves a tensor un-normalized in the same launch (z = g exactly).
    grads = grads_of(torch.float32, 0)
    stats = stats_of(grads)
    stats[2] = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    params = params_of(torch.float32)
    want = [p.clone() for p in params]
    z = reference_z(grads)
    z[2] = grads[2].clone()
    written = [g.clone() for g in grads]
    args = SgdArgs(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    to.sgd_step_(params, written, [None] * 5, stats, args, first=[True] * 5, write_grad=True)
    torch_sgd(want, z, [None] * len(want), foreach=False, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
              weight_decay=0.0, maximize=False)  # fmt: skip
    assert_lists_close(params, want, torch.float32, "params")
    assert torch.equal(written[2], grads[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_grad_stores_the_hooks_z_bit_for_bit(to, dtype):
    grads = grads_of(dtype, 0)
    hook = triton_z(grads)
    params = params_of(dtype)
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    args = AdamArgs(step_size=[0.1] * 5, bias_correction2_sqrt=[0.05] * 5, amsgrad=False, beta1=0.9,
                    beta2=0.999, lr=0.01, weight_decay=0.0, eps=1e-8, maximize=False,
                    decoupled=False)  # fmt: skip
    to.adam_step_(params, grads, exp_avgs, exp_avg_sqs, [None] * len(params), stats_of(grads), args,
                  write_grad=True)  # fmt: skip
    for g, h in zip(grads, hook):
        assert torch.equal(g, h)
    # 1-element tensors: unchanged, as the hook leaves them.
    assert torch.equal(grads[0], grads_of(dtype, 0)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_tensors_take_the_float64_z_bit_for_bit(to, dtype):
    # Spreads beyond 2**100 and multipliers beyond 2**100: the statistics mark them "wide" and the normalize
    # pass computes (g - mean) * inv in float64; the fused step must take the same values.
    grads = [
        make_grad((150,), dtype, DEVICE, seed=1, std=1e32),
        make_grad((70,), dtype, DEVICE, seed=2, mean=1e-33, std=1e-33),
        make_grad((90,), dtype, DEVICE, seed=3),
    ]
    stats = stats_of(grads, eps=0.0)  # eps=1e-10 would bound the multiplier by 1e10
    assert stats[:, 3].tolist() == [1.0, 1.0, 0.0]
    hook = triton_z(grads, eps=0.0)
    params = [torch.zeros_like(g) for g in grads]
    args = SgdArgs(lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=True)
    to.sgd_step_(params, grads, [None] * 3, stats, args, first=[True] * 3, write_grad=True)
    for g, h, p in zip(grads, hook, params):
        assert torch.equal(g, h)
        assert torch.equal(p, h)


def test_grad_left_untouched_by_default(to):
    grads = grads_of(torch.float32, 0)
    before = [g.clone() for g in grads]
    params = params_of(torch.float32)
    bufs = [torch.zeros_like(p) for p in params]
    args = SgdArgs(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    to.sgd_step_(params, grads, bufs, stats_of(grads), args, first=[True] * 5)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_scaled_gradients_give_the_unscaled_step(to, dtype, kind):
    # GradScaler with an optimizer that unscales itself: grads hold s*g, stats computed with grad_scale=s.
    # With s a power of two everything scales exactly, so the step is bitwise the unscaled one, and
    # write_grad leaves the unscaled z-scores (as torch's fused optimizers leave the unscaled gradient).
    s = torch.tensor(1024.0, device=DEVICE)
    runs = []
    for scale in (None, s):
        grads = grads_of(dtype, 0)
        if scale is not None:
            grads = [g * scale.to(dtype) for g in grads]
        params = params_of(dtype)
        states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        stats = stats_of(grads, grad_scale=scale)
        if kind == "sgd":
            args = SgdArgs(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01,
                           maximize=False)  # fmt: skip
            to.sgd_step_(params, grads, states[0], stats, args, first=[True] * 5, grad_scale=scale,
                         write_grad=True)  # fmt: skip
        else:
            args = AdamArgs(step_size=[0.1] * 5, bias_correction2_sqrt=[0.05] * 5, amsgrad=True, beta1=0.9,
                            beta2=0.999, lr=0.01, weight_decay=0.01, eps=1e-8, maximize=False,
                            decoupled=True)  # fmt: skip
            to.adam_step_(params, grads, *states, stats, args, grad_scale=scale, write_grad=True)
        runs.append(params + grads + [t for ts in states for t in ts])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_found_inf_skips_the_step_on_the_device(to, kind):
    dtype = torch.float32
    for flag in (1.0, 0.0):
        grads = grads_of(dtype, 0)
        grads_before = [g.clone() for g in grads]
        params = params_of(dtype)
        before = [p.clone() for p in params]
        states = [[torch.full_like(p, 0.5) for p in params] for _ in range(3)]
        states_before = [[t.clone() for t in ts] for ts in states]
        found_inf = torch.tensor([flag], device=DEVICE)
        scale = torch.tensor(1.0, device=DEVICE)
        stats = stats_of(grads, grad_scale=scale)
        if kind == "sgd":
            args = SgdArgs(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                           maximize=False)  # fmt: skip
            to.sgd_step_(params, grads, states[0], stats, args, first=[False] * 5, grad_scale=scale,
                         found_inf=found_inf, write_grad=True)  # fmt: skip
            touched = [states[0]]
        else:
            args = AdamArgs(step_size=[0.1] * 5, bias_correction2_sqrt=[0.05] * 5, amsgrad=True, beta1=0.9,
                            beta2=0.999, lr=0.01, weight_decay=0.0, eps=1e-8, maximize=False,
                            decoupled=False)  # fmt: skip
            to.adam_step_(params, grads, *states, stats, args, grad_scale=scale, found_inf=found_inf,
                          write_grad=True)  # fmt: skip
            touched = states
        same = all(torch.equal(a, b) for a, b in zip(params, before))
        same &= all(torch.equal(a, b) for a, b in zip(grads, grads_before))
        same &= all(torch.equal(a, b) for ts, tb in zip(touched, states_before) for a, b in zip(ts, tb))
        assert same == (flag != 0.0)


def test_dense_layouts_with_matching_strides(to):
    # channels_last and permuted parameters: gradients and states share their strides, elements pair up by
    # memory order, and the result equals the contiguous one.
    shapes = [(2, 3, 4, 5), (6, 7)]
    params = [make_grad(s, torch.float32, DEVICE, seed=i) for i, s in enumerate(shapes)]
    grads = [make_grad(s, torch.float32, DEVICE, seed=10 + i) for i, s in enumerate(shapes)]
    odd = [params[0].to(memory_format=torch.channels_last), params[1].t().contiguous().t()]
    odd_grads = [grads[0].to(memory_format=torch.channels_last), grads[1].t().contiguous().t()]
    odd_bufs = [torch.zeros_like(p) for p in odd]  # zeros_like keeps the strides
    bufs = [torch.zeros_like(p) for p in params]
    args = SgdArgs(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01, maximize=False)
    to.sgd_step_(params, grads, bufs, stats_of(grads), args, first=[True, True])
    to.sgd_step_(odd, odd_grads, odd_bufs, stats_of(odd_grads), args, first=[True, True])
    for a, b in zip(params, odd):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_what_the_kernel_does_not_serve_raises_not_implemented(to):
    p = torch.zeros(4, 6, device=DEVICE)
    g = make_grad((4, 6), torch.float32, DEVICE)
    args = SgdArgs(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    with pytest.raises(NotImplementedError, match="strides"):
        to.sgd_step_([p], [g.t().contiguous().t()], [None], stats_of([g]), args, first=[True])
    with pytest.raises(NotImplementedError, match="dense"):
        to.sgd_step_([p[:, ::2]], [g[:, ::2]], [None], stats_of([g[:, ::2].contiguous()]), args, first=[True])
    with pytest.raises(NotImplementedError):
        to.sgd_step_([p.double()], [g], [None], stats_of([g]), args, first=[True])
    with pytest.raises(NotImplementedError):
        to.sgd_step_([p.int()], [g.int()], [None], stats_of([g]), args, first=[True])
    with pytest.raises(ValueError, match="stats"):
        to.sgd_step_([p], [g], [None], stats_of([g, g]), args, first=[True])
    assert torch.equal(p, torch.zeros(4, 6, device=DEVICE))


def test_empty_lists_and_tensors(to):
    args = SgdArgs(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    to.sgd_step_([], [], [], torch.zeros(0, 4, dtype=torch.float64, device=DEVICE), args, first=[])
    e = torch.zeros(0, device=DEVICE)
    to.sgd_step_([e], [e.clone()], [e.clone()], torch.zeros(1, 4, dtype=torch.float64, device=DEVICE), args,
                 first=[True])  # fmt: skip


def test_deterministic_and_plan_reused(to):
    opts = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01, maximize=False)
    a = run_sgd(to, torch.float32, opts, steps=2)
    plans = len(to.plans)
    b = run_sgd(to, torch.float32, opts, steps=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert plans == 2  # the first step's table (new buffers) and the later steps'


# The kernels compiled for the GPU ahead of time, without one (see test_triton_compile.py).
COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from znorm_kernels.backends import triton_aot as to
    out = {}
    for kind, dtype, aligned in json.loads(sys.argv[1]):
        fn = to.compile_sgd_for_target if kind == "sgd" else to.compile_adam_for_target
        k = fn(getattr(torch, dtype), 90, aligned=aligned, write_grad=True)
        out[f"{kind}-{dtype}-{aligned}"] = k.asm["ptx"]
    print(json.dumps(out))
    """
)
COMPILE_CASES = [
    (kind, dtype, aligned)
    for kind in ("sgd", "adam")
    for dtype in ("float32", "float16", "bfloat16", "float64")
    for aligned in (True, False)
]
VECTOR = {"float32": "v4.b32", "float16": "v4.b32", "bfloat16": "v4.b32", "float64": "v2.b64"}


@pytest.fixture(scope="module")
def ptx():
    return compiled_ptx(COMPILE_SCRIPT, COMPILE_CASES)


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_optim_kernels_lower_for_sm90(ptx, case, tmp_path):
    kind, dtype, aligned = case
    code = ptx["-".join(map(str, case))]
    assert f".entry znorm_{kind}_kernel" in code
    assert not re.search(r"\bfma\.", code), "no FMA contraction: every operation rounds as torch's do"
    assert not re.search(r"\b(sqrt|div|rcp)\.(approx|full)", code), "correctly rounded division and sqrt"
    loads = re.findall(r"ld\.global\.(v\d\.b\d+)", code)
    if aligned:
        assert VECTOR[dtype] in loads, "aligned full tiles move 16 bytes per instruction"
    else:
        assert not loads
    regs, spills, report = ptxas_usage(code, tmp_path)
    assert regs <= 64, f"{regs} registers: fewer than 4 programs of 8 warps fit an SM"
    assert not any(spills), report

"""The native CPU fused optimizer steps (ops znorm_kernels_C::znorm_sgd_step_ / znorm_adam_step_, wrapped by
znorm_kernels.backends.native_optim.sgd_step_ / adam_step_) and the ZNorm optimizers' CPU path through them.

Each step is checked three ways, over several steps:
- against the same formulas written as separate torch ops on the z-scores of the "cpu" backend (each
  operation rounded on its own, stored values rounded to the dtype where the kernel stores them): bitwise;
- against torch.optim's functional sgd/adam (foreach=False) on those z-scores: within float32 rounding
  (torch's CPU kernels fuse multiply-adds in add with alpha and lerp, and round bfloat16 intermediates to
  bfloat16; the fused step never contracts and keeps them in float32);
- the z-scores it writes with write_grad, and the statistics it writes, against the "cpu" backend: bitwise.
Sizes cross the kernel's block (1024) and chunk (16384) boundaries; 1-element and untreated tensors take
z = g.

The CUDA kernels of the same ops (built in a CUDA build) are checked the same way where a GPU is present: the
formulas on the "cuda" backend's z-scores (bitwise: every operation correctly rounded on its own, on either
device), torch's functional step, and the "cuda" backend's z and statistics (bitwise). Without a GPU only the
registration and the optimizers' choice of path run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

import znorm_kernels
from tests.utils import (
    ADAM_OPTIONS,
    SGD_OPTIONS,
    adam_start,
    adam_step_sizes,
    make_grad,
    options_id,
    saved_per_cpu_isa,
    torch_adam_step,
)
from znorm_kernels.backends import native
from znorm_kernels.backends import native_optim as nsteps  # the native fused steps
from znorm_kernels.backends.optim_steps import AdamArgs, SgdArgs
from znorm_kernels.optim import ZNormAdam, ZNormAdamW, ZNormSGD, fused_layout

pytestmark = pytest.mark.skipif(
    "cpu" not in znorm_kernels.available_backends() or not native.has_optim_kernels(),
    reason="native extension with the fused optimizer kernels not built",
)

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
SIZES = [1, 5, 1023, 1025, 16384, 16385, 40000]
TREATED = [True, True, True, False, True, True, True]  # one untreated tensor among them
TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=5e-2),  # a few bfloat16 ulps: torch rounds its intermediates
    torch.float16: dict(rtol=3e-3, atol=3e-3),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def params_of(dtype, sizes=SIZES, seed=0):
    return [make_grad((n,), dtype, seed=1000 + seed + n, mean=0.5, std=1.0) for n in sizes]


def grads_of(dtype, step, sizes=SIZES):
    return [make_grad((n,), dtype, seed=7 * step + n) for n in sizes]


def cpu_z(grads, treated, eps=1e-10, correction=0):
    """The z-scores the "cpu" backend writes (tensors of < 2 elements left alone by it); z = g untreated.
    (The "cuda" backend's for CUDA tensors.)"""
    z = [g.clone() for g in grads]
    backend = grads[0].device.type if grads else "cpu"
    znorm_kernels.znorm_(
        [t for t, tr in zip(z, treated) if tr], eps=eps, correction=correction, backend=backend
    )
    return z


def cpu(tensors):
    return [t.cpu() if t is not None else None for t in tensors]


def cpu_copy(tensors):
    return [t.to("cpu", copy=True) for t in tensors]


def to(tensors, device):
    return [t.to(device) if t is not None else None for t in tensors]


HAS_CUDA_STEP = torch.cuda.is_available() and native.has_optim_kernels("cuda")
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA_STEP, reason="needs a GPU and the CUDA kernels of the fused steps"
)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_equal_lists(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item()
            raise AssertionError(f"{what}[{i}] ({a.dtype}, {a.numel()} elements) differs, max {diff}")


def assert_close_lists(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, i=i: f"{what}[{i}]: {m}")


# --- the formulas, one torch op per kernel operation ---


def formula_sgd(p, z, buf, first, *, lr, momentum, dampening, nesterov, weight_decay, maximize):
    """(new p, new buf) of one tensor, each operation a separate torch op in the accumulation dtype."""
    dtype, a = p.dtype, acc(p.dtype)
    c = lambda x: torch.tensor(x, dtype=a)
    pv = p.to(a)
    d = -z.to(a) if maximize else z.to(a)
    if weight_decay != 0:
        d = d + c(weight_decay) * pv
    new_buf = None
    if momentum != 0:
        nxt = d if first else buf.to(a) * c(momentum) + c(1 - dampening) * d
        new_buf = nxt.to(dtype)
        bv = new_buf.to(a)
        d = d + c(momentum) * bv if nesterov else bv
    return (pv - c(lr) * d).to(dtype), new_buf


def formula_adam(p, z, m, v, vmax, *, step_size, bc2, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize,
                 decoupled):  # fmt: skip
    dtype, a = p.dtype, acc(p.dtype)
    c = lambda x: torch.tensor(x, dtype=a)
    pv = p.to(a)
    d = -z.to(a) if maximize else z.to(a)
    if weight_decay != 0:
        if decoupled:
            pv = pv * c(1 - lr * weight_decay)
        else:
            d = d + c(weight_decay) * pv
    w = 1 - beta1
    mv = m.to(a)
    new_m = mv + c(w) * (d - mv) if abs(w) < 0.5 else d - (d - mv) * (c(1.0) - c(w))  # torch.lerp's two
    new_m = new_m.to(dtype)
    new_v = (v.to(a) * c(beta2) + c(1 - beta2) * d * d).to(dtype)
    vx = new_v.to(a)
    new_vmax = None
    if amsgrad:
        vx = torch.maximum(vmax.to(a), vx)
        new_vmax = vx.to(dtype)
    # Correctly rounded square root (numpy's, the hardware's; torch's vectorized CPU sqrt is not, always).
    denom = torch.from_numpy(np.sqrt(vx.numpy())) / c(bc2) + c(eps)
    return (pv - (c(step_size) * new_m.to(a)) / denom).to(dtype), new_m, new_v, new_vmax


# --- the kernels against the formulas and torch ---


def run_sgd(dtype, opts, steps=3, lr=0.1, sizes=SIZES, treated=TREATED, device="cpu"):
    """The step on ``device``; the formulas and torch's step on the CPU, on that device's z-scores."""
    params = to(params_of(dtype, sizes), device)
    formula = cpu_copy(params)
    want = cpu_copy(params)
    bufs = [torch.zeros_like(p) for p in params]
    formula_bufs = [None] * len(params)
    want_bufs = [None] * len(params)
    args = SgdArgs(lr=lr, **opts)
    for step in range(steps):
        grads = to(grads_of(dtype, step, sizes), device)
        raw = [g.clone() for g in grads]
        z = cpu(cpu_z(grads, treated))
        first = [step == 0] * len(params)
        nsteps.sgd_step_(
            params, grads, bufs, args, treated=treated, first=first, znorm_eps=1e-10, correction=0
        )
        assert_equal_lists(cpu(grads), cpu(raw), "grads (left raw)")
        for i in range(len(params)):
            formula[i], nb = formula_sgd(formula[i], z[i], formula_bufs[i], first[i], lr=lr, **opts)
            formula_bufs[i] = nb
        assert_equal_lists(cpu(params), formula, f"step {step} params")
        torch_sgd(want, z, want_bufs, foreach=False, lr=lr, **opts)
        assert_close_lists(cpu(params), want, dtype, f"step {step} params against torch")
        if opts["momentum"]:
            assert_equal_lists(cpu(bufs), formula_bufs, f"step {step} momentum_buffers")
            assert_close_lists(cpu(bufs), want_bufs, dtype, f"step {step} momentum_buffers against torch")
    return params


def test_sgd_first_step_buffer_is_d_bitwise_as_torch():
    # Without weight decay torch's first momentum buffer is clone(±z): the same operations, bit for bit.
    dtype = torch.float32
    params = params_of(dtype)
    grads = grads_of(dtype, 0)
    z = cpu_z(grads, TREATED)
    bufs = [torch.full_like(p, float("nan")) for p in params]  # contents of a new buffer are not used
    want_bufs = [None] * len(params)
    opts = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=True)
    nsteps.sgd_step_(params, grads, bufs, SgdArgs(lr=0.1, **opts), treated=TREATED, first=[True] * 7,
                     znorm_eps=1e-10, correction=0)  # fmt: skip
    torch_sgd([p.clone() for p in params], z, want_bufs, foreach=False, lr=0.1, **opts)
    assert_equal_lists(bufs, want_bufs, "momentum_buffers")


def test_sgd_momentum_buffers_new_at_later_steps():
    # Parameters added to the optimizer later get their momentum buffer at a later step: per-tensor flags.
    sizes = [5, 1025, 16385]
    opts = dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=False)
    dtype = torch.float32
    params = params_of(dtype, sizes)
    formula = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    formula_bufs = [None] * 3
    first_steps = [0, 1, 0]
    for step in range(3):
        grads = grads_of(dtype, step, sizes)
        z = cpu_z(grads, [True] * 3)
        idx = [i for i in range(3) if step >= first_steps[i]]
        nsteps.sgd_step_([params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx],
                         SgdArgs(lr=0.1, **opts), treated=[True] * len(idx),
                         first=[first_steps[i] == step for i in idx], znorm_eps=1e-10,
                         correction=0)  # fmt: skip
        for i in idx:
            formula[i], formula_bufs[i] = formula_sgd(
                formula[i], z[i], formula_bufs[i], first_steps[i] == step, lr=0.1, **opts
            )
        assert_equal_lists(params, formula, f"step {step} params")
        assert_equal_lists([bufs[i] for i in idx], [formula_bufs[i] for i in idx], "buffers")


def run_adam(dtype, opts, steps=3, lr=0.01, betas=(0.9, 0.999), eps=1e-8, step0=None, sizes=SIZES,
             treated=TREATED, device="cpu"):  # fmt: skip
    params = to(params_of(dtype, sizes), device)
    n = len(params)
    formula = cpu_copy(params)
    want = cpu_copy(params)
    states, counts, _ = adam_start(params, step0)
    formula_states = adam_start(formula)[0]
    want_states, _, want_steps = adam_start(formula, step0)
    beta1, beta2 = betas
    for step in range(steps):
        grads = to(grads_of(dtype, step, sizes), device)
        raw = [g.clone() for g in grads]
        z = cpu(cpu_z(grads, treated))
        counts = [c + 1 for c in counts]
        step_size, bc2 = adam_step_sizes(counts, lr, betas)
        args = AdamArgs(
            step_size=step_size, bias_correction2_sqrt=bc2, beta1=beta1, beta2=beta2, lr=lr, eps=eps, **opts
        )
        nsteps.adam_step_(params, grads, *states, args, treated=treated, znorm_eps=1e-10, correction=0)
        assert_equal_lists(cpu(grads), cpu(raw), "grads (left raw)")
        for i in range(n):
            p, m, v, vmax = formula_adam(
                formula[i], z[i], formula_states[0][i], formula_states[1][i], formula_states[2][i],
                step_size=step_size[i], bc2=bc2[i], beta1=beta1, beta2=beta2, lr=lr, eps=eps, **opts,
            )  # fmt: skip
            formula[i], formula_states[0][i], formula_states[1][i] = p, m, v
            if vmax is not None:
                formula_states[2][i] = vmax
        assert_equal_lists(cpu(params), formula, f"step {step} params")
        assert_equal_lists(cpu(states[0]), formula_states[0], f"step {step} exp_avgs")
        assert_equal_lists(cpu(states[1]), formula_states[1], f"step {step} exp_avg_sqs")
        if opts["amsgrad"]:
            assert_equal_lists(cpu(states[2]), formula_states[2], f"step {step} max_exp_avg_sqs")
        torch_adam_step(want, z, want_states, want_steps, opts, lr=lr, betas=betas, eps=eps)
        assert_close_lists(cpu(params), want, dtype, f"step {step} params against torch")
        assert_close_lists(cpu(states[0]), want_states[0], dtype, f"step {step} exp_avgs against torch")
        assert_close_lists(cpu(states[1]), want_states[1], dtype, f"step {step} exp_avg_sqs against torch")
        if opts["amsgrad"]:
            assert_close_lists(
                cpu(states[2]), want_states[2], dtype, f"step {step} max_exp_avg_sqs against torch"
            )
    return params


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("kind", "opts"),
    [("sgd", o) for o in SGD_OPTIONS] + [("adam", o) for o in ADAM_OPTIONS],
    ids=lambda v: options_id(v) if isinstance(v, dict) else v,
)
def test_update_matches_formulas_bitwise_and_torch(dtype, kind, opts):
    # Every option of each update, every dtype: the fused step against the formula bit for bit and torch.
    {"sgd": run_sgd, "adam": run_adam}[kind](dtype, opts)


def test_adam_per_tensor_step_counts():
    opts = dict(amsgrad=False, decoupled=True, weight_decay=0.01, maximize=False)
    run_adam(torch.float32, opts, step0=[0, 3, 0, 7, 1, 2, 5])


def test_adam_lerp_weight_above_half():
    # beta1 < 0.5: torch.lerp's second formula, end - (end - start) * (1 - weight).
    opts = dict(amsgrad=True, decoupled=False, weight_decay=0.0, maximize=False)
    run_adam(torch.float32, opts, betas=(0.3, 0.99))


def test_float16():
    sizes = [1, 7, 1500, 17000]
    treated = [True] * 4
    opts = dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=False)
    run_sgd(torch.float16, opts, sizes=sizes, treated=treated)
    # eps=1e-8 rounds to 0 in float16 where torch's unfused Adam computes its denominator: use 1e-3.
    run_adam(torch.float16, dict(amsgrad=True, decoupled=True, weight_decay=0.01, maximize=False), eps=1e-3,
             sizes=sizes, treated=treated)  # fmt: skip


def check_write_grad_stores_the_backends_z_and_stats(dtype, kind, device):
    """The step with write_grad and stats_out leaves in the grads the z-scores of the backend of ``device``
    ("cpu" or "cuda") and writes its statistics (NaN rows for the tensors it leaves alone), bit for bit."""
    grads = to(grads_of(dtype, 0), device)
    z = cpu_z(grads, TREATED)
    want_stats = torch.full((len(grads), 2), float("nan"), dtype=torch.float64, device=device)
    picked = [i for i, t in enumerate(TREATED) if t and grads[i].numel() >= 2]
    expected = [grads[i].clone() for i in picked]
    rows = torch.empty(len(picked), 2, dtype=torch.float64, device=device)
    torch.ops.znorm_kernels_C.znorm_(expected, 1e-10, 0.0, None, rows)
    want_stats[picked] = rows
    params = to(params_of(dtype), device)
    stats = torch.zeros(len(grads), 2, dtype=torch.float64, device=device)
    if kind == "sgd":
        args = SgdArgs(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
        nsteps.sgd_step_(params, grads, [None] * 7, args, treated=TREATED, first=[True] * 7, znorm_eps=1e-10,
                         correction=0, write_grad=True, stats_out=stats)  # fmt: skip
    else:
        states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        args = AdamArgs(step_size=[0.1] * 7, bias_correction2_sqrt=[0.05] * 7, amsgrad=False, beta1=0.9,
                        beta2=0.999, lr=0.01, weight_decay=0.0, eps=1e-8, maximize=False,
                        decoupled=False)  # fmt: skip
        nsteps.adam_step_(params, grads, *states, [None] * 7, args, treated=TREATED, znorm_eps=1e-10,
                          correction=0, write_grad=True, stats_out=stats)  # fmt: skip
    assert_equal_lists(cpu(grads), cpu(z), "grads (z)")
    assert torch.equal(stats.isnan(), want_stats.isnan())
    assert torch.equal(stats.nan_to_num(), want_stats.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_write_grad_stores_the_cpu_backends_z_and_stats_bit_for_bit(dtype, kind):
    check_write_grad_stores_the_backends_z_and_stats(dtype, kind, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_tensors_take_the_float64_z_bit_for_bit(dtype):
    # Spreads beyond 2**100 and multipliers beyond 2**100: the statistics mark them "wide" and the normalize
    # pass computes (g - mean) * inv in float64; the fused step must take the same values.
    grads = [
        make_grad((150,), dtype, seed=1, std=1e32),
        make_grad((20000,), dtype, seed=2, mean=1e-33, std=1e-33),
        make_grad((90,), dtype, seed=3),
    ]
    z = cpu_z(grads, [True] * 3, eps=0.0)
    params = [torch.zeros_like(g) for g in grads]
    args = SgdArgs(lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=True)
    nsteps.sgd_step_(params, grads, [None] * 3, args, treated=[True] * 3, first=[True] * 3, znorm_eps=0.0,
                     correction=0, write_grad=True)  # fmt: skip
    assert_equal_lists(grads, z, "grads (z)")
    assert_equal_lists(params, z, "params")


def test_correction_and_eps_reach_the_statistics():
    grads = grads_of(torch.float32, 0)
    z = cpu_z(grads, TREATED, eps=0.5, correction=1)
    params = params_of(torch.float32)
    args = SgdArgs(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    nsteps.sgd_step_(params, grads, [None] * 7, args, treated=TREATED, first=[True] * 7, znorm_eps=0.5,
                     correction=1, write_grad=True)  # fmt: skip
    assert_equal_lists(grads, z, "grads (z)")


def test_nan_gradient_spoils_only_its_own_tensor():
    grads = grads_of(torch.float32, 0, sizes=[100, 20000, 300])
    grads[1][17] = float("nan")
    params = params_of(torch.float32, sizes=[100, 20000, 300])
    before = [p.clone() for p in params]
    args = SgdArgs(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    nsteps.sgd_step_(params, grads, [None] * 3, args, treated=[True] * 3, first=[True] * 3, znorm_eps=1e-10,
                     correction=0)  # fmt: skip
    assert params[1].isnan().all()
    assert params[0].isfinite().all() and params[2].isfinite().all()
    assert not torch.equal(params[0], before[0])


def test_layouts_channels_last_and_empty():
    # A dense layout is used in place (memory order); the result keeps the tensors' strides and equals the
    # formulas on the "cpu" backend's z-scores of that same tensor (whose statistics sum in memory order too).
    g = make_grad((8, 3, 5, 5), seed=4).to(memory_format=torch.channels_last)
    p = make_grad((8, 3, 5, 5), seed=5).to(memory_format=torch.channels_last)
    b = torch.zeros_like(p)
    z = cpu_z([g], [True])[0]
    opts = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False)
    want_p, want_b = formula_sgd(p.clone(), z, None, True, **opts)
    e = torch.empty(0)
    nsteps.sgd_step_([p, e], [g, e.clone()], [b, e.clone()], SgdArgs(**opts), treated=[True, True],
                     first=[True, True], znorm_eps=1e-10, correction=0)  # fmt: skip
    assert p.stride() == g.stride() == b.stride()
    assert torch.equal(p, want_p) and torch.equal(b, want_b)


def test_threads_and_repeats_give_the_same_bits():
    # A list of more than 4 M elements runs on the intra-op threads (items taken from a counter): the result
    # does not depend on which thread ran which item, nor on the thread count.
    sizes = [3, 2_500_000, 50, 1_800_001, 16384]
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (threads, 1, threads):
            torch.set_num_threads(n_threads)
            params = params_of(torch.float32, sizes)
            grads = grads_of(torch.float32, 0, sizes)
            states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
            stats = torch.empty(len(sizes), 2, dtype=torch.float64)
            args = AdamArgs(step_size=[0.1] * 5, bias_correction2_sqrt=[0.05] * 5, amsgrad=True, beta1=0.9,
                            beta2=0.999, lr=0.01, weight_decay=0.01, eps=1e-8, maximize=False,
                            decoupled=True)  # fmt: skip
            nsteps.adam_step_(params, grads, *states, args, treated=[True] * 5, znorm_eps=1e-10, correction=0,
                              write_grad=True, stats_out=stats)  # fmt: skip
            results.append([*params, *grads, *states[0], *states[1], *states[2], stats])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert_equal_lists(other, results[0], "run")


_ISA_SCRIPT = """
import sys, torch
from znorm_kernels.backends import native
from znorm_kernels.backends import native_optim as nsteps  # the native fused steps
from znorm_kernels.backends.optim_steps import AdamArgs, SgdArgs
from tests.utils import make_grad
sizes = [1, 7, 1500, 3 * 16384 + 17]
out = []
for k, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16, torch.float64]):
    ps = [make_grad((n,), dtype, seed=k * 10 + n) for n in sizes]
    gs = [make_grad((n,), dtype, seed=k * 10 + n + 1) for n in sizes]
    bufs = [make_grad((n,), dtype, seed=k * 10 + n + 2) for n in sizes]
    sgd = SgdArgs(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False)
    nsteps.sgd_step_(ps, gs, bufs, sgd, treated=[True] * 4, first=[False] * 4, znorm_eps=1e-10, correction=0)
    ms = [make_grad((n,), dtype, seed=k * 10 + n + 3) for n in sizes]
    vs = [make_grad((n,), dtype, seed=k * 10 + n + 4).abs() for n in sizes]
    vm = [make_grad((n,), dtype, seed=k * 10 + n + 5).abs() for n in sizes]
    adam = AdamArgs(step_size=[0.1] * 4, bias_correction2_sqrt=[0.3] * 4, amsgrad=True, beta1=0.9,
                    beta2=0.999, lr=0.01, weight_decay=0.01, eps=1e-8, maximize=True, decoupled=False)
    nsteps.adam_step_(ps, gs, ms, vs, vm, adam, treated=[True] * 4, znorm_eps=1e-10, correction=0,
                      write_grad=True)
    out += ps + gs + bufs + ms + vs + vm
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="no AVX2: one version only"
)
def test_baseline_and_avx2_loops_bitwise_equal(tmp_path):
    baseline, avx2, widest = saved_per_cpu_isa(_ISA_SCRIPT, tmp_path)
    assert_equal_lists(avx2, baseline, "avx2 against baseline")
    assert_equal_lists(widest, baseline, "the widest copy (AVX-512 where present) against baseline")


# --- bad input: errors before anything is written ---


def test_mismatched_state_layout_is_not_served_and_nothing_changes():
    p = make_grad((4, 6), seed=1)
    g = make_grad((4, 6), seed=2)
    buf = torch.zeros(6, 4).t()  # same shape, other strides
    before = [p.clone(), g.clone(), buf.clone()]
    args = SgdArgs(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    opts = dict(treated=[True], first=[False], znorm_eps=1e-10, correction=0)
    with pytest.raises(NotImplementedError, match="strides"):
        nsteps.sgd_step_([p], [g], [buf], args, **opts)
    with pytest.raises(RuntimeError, match="strides"):  # the op's own check (the Python one skipped)
        nsteps.sgd_step_([p], [g], [buf], args, checked=True, **opts)
    assert all(torch.equal(a, b) for a, b in zip([p, g, buf], before))


def test_non_dense_and_wrong_dtype_are_not_served():
    base = make_grad((8, 8), seed=1)
    p = base[:, ::2]
    with pytest.raises(NotImplementedError, match="dense"):
        nsteps.check_step([[p], [base.clone()[:, ::2]]], ["params", "grads"])
    with pytest.raises(NotImplementedError, match="float64"):
        nsteps.check_step([[base], [base.double()]], ["params", "grads"])
    with pytest.raises(ValueError, match="entries"):
        nsteps.check_step([[base], []], ["params", "grads"])


def test_bad_stats_out_raises_before_writing():
    params, grads = params_of(torch.float32, [5, 7]), grads_of(torch.float32, 0, [5, 7])
    before = [t.clone() for t in params + grads]
    bad = torch.empty(3, 2, dtype=torch.float64)
    args = SgdArgs(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    with pytest.raises(RuntimeError, match="stats"):
        nsteps.sgd_step_(params, grads, [None] * 2, args, treated=[True] * 2, first=[True] * 2,
                         znorm_eps=1e-10, correction=0, write_grad=True, stats_out=bad)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(params + grads, before))


# --- the ZNorm optimizers on the CPU take the native step ---


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
    )


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.fixture
def calls(monkeypatch):
    counts = {"sgd": 0, "adam": 0}
    for name in counts:
        real = nsteps.STEPS[name]

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setitem(nsteps.STEPS, name, spy)
    return counts


CASES = [
    (ZNormSGD, torch.optim.SGD, "sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (ZNormAdam, torch.optim.Adam, "adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    (ZNormAdamW, torch.optim.AdamW, "adam", dict(lr=1e-2, maximize=True)),
]


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("cls,torch_cls,kind,kwargs", CASES, ids=lambda c: getattr(c, "__name__", None))
def test_optimizer_takes_the_native_step_and_matches_the_hook(calls, backend, cls, torch_cls, kind, kwargs):
    ours, theirs = make_model(), make_model()
    groups = lambda m: [
        {"params": [m[0].weight, m[4].weight]},
        {"params": [m[1].weight, m[1].bias, m[4].bias], "min_ndim": 2},  # untreated 1-D tensors
    ]
    opt = cls(groups(ours), backend=backend, track_stats=True, **kwargs)
    ref = torch_cls(groups(theirs), **kwargs)
    treated = [theirs[0].weight, theirs[4].weight]
    handle = znorm_kernels.register(ref, backend="cpu", params=treated, track_stats=True)
    data = batches()
    train(ours, opt, data)
    train(theirs, ref, data)
    assert calls[kind] == 2 * len(data)  # one call per group and step
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for s_ours, s_ref in zip(opt.state.values(), ref.state.values()):
        assert set(s_ours) == set(s_ref), "torch's state format"
        for key in s_ref:
            assert s_ours[key].dtype == s_ref[key].dtype and s_ours[key].device == s_ref[key].device
            torch.testing.assert_close(s_ours[key], s_ref[key], atol=2e-6, rtol=1e-5)
    ours_stats, ref_stats = opt.grad_stats(), handle.grad_stats()
    treated = [k for k, n in enumerate(ours_stats.names) if n in ("group0.param0", "group0.param1")]
    assert len(treated) == 2
    # The statistics of the last step's gradients (close, not equal: the models have drifted by rounding).
    torch.testing.assert_close(ours_stats.values[treated], ref_stats.values, rtol=1e-4, atol=1e-6)


def test_optimizer_normalize_grad_writes_the_hooks_z(calls):
    model = make_model()
    opt = ZNormSGD(model.parameters(), lr=0.1, momentum=0.9, normalize_grad=True, backend="cpu")
    x, y = batches(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    z = cpu_z([p.grad for p in model.parameters()], [True] * 5)
    opt.step()
    assert calls["sgd"] == 1
    assert_equal_lists([p.grad for p in model.parameters()], z, "grads")


def test_optimizer_falls_back_where_the_native_step_does_not_serve(calls):
    # A momentum buffer of other strides (e.g. loaded from elsewhere): not served, the general path runs and
    # gives the hook's result.
    ours, theirs = make_model(), make_model()
    opt = ZNormSGD(ours.parameters(), lr=0.1, momentum=0.9, backend="cpu")
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    znorm_kernels.register(ref, backend="cpu")
    w, w_ref = ours[4].weight, theirs[4].weight
    opt.state[w]["momentum_buffer"] = torch.zeros(w.shape[::-1]).t()
    ref.state[w_ref]["momentum_buffer"] = torch.zeros(w.shape[::-1]).t()
    data = batches(2)
    train(ours, opt, data)
    train(theirs, ref, data)
    assert calls["sgd"] == 0
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


def test_optimizer_mixed_dtypes_one_call_per_dtype(calls):
    a = torch.nn.Parameter(make_grad((30,), torch.float32, seed=1))
    b = torch.nn.Parameter(make_grad((40,), torch.float64, seed=2))
    c = torch.nn.Parameter(make_grad((50,), torch.bfloat16, seed=3))
    opt = ZNormAdam([a, b, c], lr=0.01, backend="cpu")
    for t in (a, b, c):
        t.grad = make_grad(t.shape, t.dtype, seed=4)
    want = [t.detach().clone() for t in (a, b, c)]
    z = [cpu_z([t.grad], [True])[0] for t in (a, b, c)]
    opt.step()
    assert calls["adam"] == 3
    states = [[torch.zeros_like(t) for t in want] for _ in range(2)]
    steps = [torch.tensor(0.0) for _ in want]
    torch_adam(want, z, *states, [], steps, foreach=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=0.01,
               weight_decay=0.0, eps=1e-8, maximize=False)  # fmt: skip
    for t, w in zip((a, b, c), want):
        torch.testing.assert_close(t.detach(), w, **TOL[t.dtype])


# --- the CUDA kernels of the same ops ---


def test_cuda_kernels_registered_with_the_cuda_build():
    # CPU-runnable: a CUDA build registers the CUDA kernels of both steps, and has_optim_kernels says so.
    has = [
        torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
        for n in (native.SGD_OP_NAME, native.ADAM_OP_NAME)
    ]
    assert has == [native.has_cuda_kernel()] * 2
    assert native.has_optim_kernels("cuda") == native.has_cuda_kernel()
    assert native.has_optim_kernels("cpu") and not native.has_optim_kernels("meta")


def test_check_step_wants_one_device():
    p = make_grad((4, 6), seed=1)
    with pytest.raises(NotImplementedError, match="one device"):
        nsteps.check_step([[p], [torch.empty(4, 6, device="meta")]], ["params", "grads"])
    with pytest.raises(NotImplementedError, match="meta"):
        nsteps.check_step([[torch.empty(3, device="meta")]], ["params"])


@pytest.mark.parametrize("backend", ["cuda", "auto", "cpu"])
def test_fused_path_picks_cuda_where_the_backend_resolves_to_it(monkeypatch, backend):
    # CPU-runnable: stand-ins on a CUDA device and a resolver without Triton ("auto" -> "cuda").
    def resolve(name, device):
        kind = torch.device(device).type
        if name in ("auto", kind):
            return kind
        raise RuntimeError(f"the {name!r} backend does not serve {kind}")

    monkeypatch.setattr(fused_layout, "resolve_backend", resolve)
    params = [type("P", (), {"device": torch.device("cuda", 0)})()]
    want = "cuda" if backend != "cpu" and native.has_optim_kernels("cuda") else None
    assert fused_layout.fused_path(backend, params) == want


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=options_id)
def test_cuda_sgd_matches_formulas_bitwise_and_torch(dtype, opts):
    run_sgd(dtype, opts, device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", ADAM_OPTIONS, ids=options_id)
def test_cuda_adam_matches_formulas_bitwise_and_torch(dtype, opts):
    run_adam(dtype, opts, device="cuda")


@needs_cuda
def test_cuda_adam_per_tensor_step_counts_and_lerp_weight():
    # Different step counts per tensor: the per-call array of step sizes (not the uniform kernel arguments).
    run_adam(torch.float32, dict(amsgrad=False, decoupled=True, weight_decay=0.01, maximize=False),
             step0=[0, 3, 0, 7, 1, 2, 5], device="cuda")  # fmt: skip
    run_adam(torch.float32, dict(amsgrad=True, decoupled=False, weight_decay=0.0, maximize=False),
             betas=(0.3, 0.99), device="cuda")  # fmt: skip


@needs_cuda
def test_cuda_float16_and_unaligned_tensors():
    sizes = [1, 7, 1500, 17000]
    opts = dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=False)
    run_sgd(torch.float16, opts, sizes=sizes, treated=[True] * 4, device="cuda")
    run_adam(torch.float16, dict(amsgrad=True, decoupled=True, weight_decay=0.01, maximize=False), eps=1e-3,
             sizes=sizes, treated=[True] * 4, device="cuda")  # fmt: skip
    # Unaligned: views at an odd element offset take the element-by-element path, with the same bits.
    base = [make_grad((n + 1,), seed=n) for n in (9000, 20001)]
    for aligned in (True, False):
        ps = [(b[1:] if not aligned else b[:-1]).clone().cuda() for b in base]
        ps = [torch.cat([p[:1], p])[1:] if not aligned else p for p in ps]
        gs = [make_grad(p.shape, seed=3).cuda() for p in ps]
        if not aligned:
            gs = [torch.cat([g[:1], g])[1:] for g in gs]
        bufs = [torch.zeros_like(p) for p in ps]
        z = cpu(cpu_z(gs, [True, True]))
        want = [formula_sgd(p.cpu(), zz, None, True, lr=0.1, **opts) for p, zz in zip(ps, z)]
        nsteps.sgd_step_(ps, gs, bufs, SgdArgs(lr=0.1, **opts), treated=[True, True], first=[True, True],
                         znorm_eps=1e-10, correction=0)  # fmt: skip
        assert_equal_lists(cpu(ps), [w[0] for w in want], f"params (aligned={aligned})")
        assert_equal_lists(cpu(bufs), [w[1] for w in want], f"buffers (aligned={aligned})")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_cuda_write_grad_stores_the_cuda_backends_z_and_stats_bit_for_bit(dtype, kind):
    check_write_grad_stores_the_backends_z_and_stats(dtype, kind, "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_wide_tensors_and_correction(dtype):
    grads = to([
        make_grad((150,), dtype, seed=1, std=1e32),
        make_grad((20000,), dtype, seed=2, mean=1e-33, std=1e-33),
        make_grad((90,), dtype, seed=3),
    ], "cuda")  # fmt: skip
    for eps, correction in ((0.0, 0), (0.5, 1)):
        gs = [g.clone() for g in grads]
        z = cpu_z(gs, [True] * 3, eps=eps, correction=correction)
        params = [torch.zeros_like(g) for g in gs]
        args = SgdArgs(lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=True)
        nsteps.sgd_step_(params, gs, [None] * 3, args, treated=[True] * 3, first=[True] * 3, znorm_eps=eps,
                         correction=correction, write_grad=True)  # fmt: skip
        assert_equal_lists(cpu(gs), cpu(z), "grads (z)")
        assert_equal_lists(cpu(params), cpu(z), "params")


@needs_cuda
def test_cuda_nan_empty_repeats_and_capture():
    sizes = [3, 100, 0, 20000, 1, 300_001]
    grads = to(grads_of(torch.float32, 0, sizes), "cuda")
    grads[1][17] = float("nan")
    results = []
    for _ in range(2):
        params = to(params_of(torch.float32, sizes), "cuda")
        gs = [g.clone() for g in grads]
        states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        stats = torch.zeros(len(sizes), 2, dtype=torch.float64, device="cuda")
        args = AdamArgs(step_size=[0.1, 0.2] * 3, bias_correction2_sqrt=[0.05] * 6, amsgrad=True, beta1=0.9,
                        beta2=0.999, lr=0.01, weight_decay=0.01, eps=1e-8, maximize=False,
                        decoupled=True)  # fmt: skip
        nsteps.adam_step_(params, gs, *states, args, treated=[True] * 6, znorm_eps=1e-10, correction=0,
                          write_grad=True, stats_out=stats)  # fmt: skip
        results.append(cpu([*params, *gs, *states[0], *states[1], *states[2], stats]))
    assert_equal_lists(results[1], results[0], "repeat")
    params = results[0][: len(sizes)]
    assert params[1].isnan().all() and params[0].isfinite().all() and params[3].isfinite().all()
    stats = results[0][-1]
    assert stats[[2, 4]].isnan().all() and stats[[0, 3, 5]].isfinite().all()

    # A captured SGD step replays like the eager one (the table and its flags kept for the graph).
    p = to(params_of(torch.float32, [5000, 70]), "cuda")
    g = to(grads_of(torch.float32, 1, [5000, 70]), "cuda")
    b = [torch.zeros_like(t) for t in p]
    ref_p, ref_b = [t.clone() for t in p], [t.clone() for t in b]
    args = SgdArgs(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False)
    opts = dict(treated=[True, True], first=[False, False], znorm_eps=1e-10, correction=0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        nsteps.sgd_step_(p, g, b, args, **opts)  # warm-up: builds the table
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nsteps.sgd_step_(p, g, b, args, **opts)
    for _ in range(3):
        nsteps.sgd_step_(ref_p, g, ref_b, args, **opts)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert_equal_lists(cpu(p), cpu(ref_p), "captured params")
    assert_equal_lists(cpu(b), cpu(ref_b), "captured buffers")


def _cuda_model(seed=0):
    return make_model(seed).cuda()


@needs_cuda
@pytest.mark.parametrize("cls,torch_cls,kind,kwargs", CASES, ids=lambda c: getattr(c, "__name__", None))
def test_cuda_optimizer_takes_the_native_step_and_matches_the_hook(calls, cls, torch_cls, kind, kwargs):
    ours, theirs = _cuda_model(), _cuda_model()
    opt = cls(ours.parameters(), backend="cuda", track_stats=True, **kwargs)
    ref = torch_cls(theirs.parameters(), **kwargs)
    znorm_kernels.register(ref, backend="cuda")
    data = [(x.cuda(), y.cuda()) for x, y in batches()]
    train(ours, opt, data)
    train(theirs, ref, data)
    assert calls[kind] == len(data)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    assert opt.grad_stats().values.device.type == "cuda"


def test_fused_path_names_triton_and_needs_the_native_kernels(monkeypatch):
    # CPU-runnable, with a resolver that grants whatever backend is asked for: "triton" is the Triton fused
    # step; a native step serves only tensors of its own device, and only where the build has its kernels.
    monkeypatch.setattr(fused_layout, "resolve_backend", lambda name, device: name)
    cpu_params = [torch.zeros(2)]
    cuda_params = [type("P", (), {"device": torch.device("cuda", 0)})()]
    assert fused_layout.fused_path("triton", cpu_params) == "triton"
    assert fused_layout.fused_path("cpu", cpu_params) == "cpu"
    assert fused_layout.fused_path("cpu", cuda_params) is None
    monkeypatch.setattr(fused_layout.native, "has_optim_kernels", lambda name: False)
    assert fused_layout.fused_path("cpu", cpu_params) is None


def test_fused_layout_makes_each_index_once():
    # The index tensors of a layout are made once (on a GPU each would be a host-to-device copy).
    layout = fused_layout.FusedLayout([], [], (True, 1), "cpu", {})
    idx = layout.index([0, 2], torch.device("cpu"))
    assert idx.tolist() == [0, 2]
    assert layout.index([0, 2], torch.device("cpu")) is idx
    assert layout.index([1], torch.device("cpu")) is not idx


def test_full_steps_derive_the_layout_and_check_the_tensors_once(monkeypatch, calls):
    # With the remembered step off every step is a full one: it still derives each group's layout once and
    # runs the kernels' checks once per set of tensors, while the parameters, gradients and state keep their
    # addresses and layouts. Two groups of the same shapes must not share an entry; a gradient that is a
    # new tensor object over the same memory is the same gradient.
    from znorm_kernels.optim import fused

    monkeypatch.setattr(fused, "remembered_step_", lambda *args, **kw: None)
    counts = {"fused_path": 0, "check_step": 0}
    for module, name in ((fused_layout, "fused_path"), (nsteps, "check_step")):
        real = getattr(module, name)

        def counting(*args, _real=real, _name=name, **kw):
            counts[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(module, name, counting)
    a, b = (torch.nn.Parameter(make_grad((4, 6), seed=s)) for s in (1, 2))
    a_ref, b_ref = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    opt = ZNormSGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9, backend="cpu")
    ref = torch.optim.SGD([{"params": [a_ref]}, {"params": [b_ref]}], lr=0.1, momentum=0.9)
    znorm_kernels.register(ref, backend="cpu")
    bufs = {p: torch.empty(4, 6) for p in (a, b)}
    views = []  # kept alive: a new view's id must not reuse an old one's
    for step in range(3):
        for p, q in ((a, a_ref), (b, b_ref)):
            bufs[p].copy_(make_grad((4, 6), seed=10 * step + (p is b)))
            views.append(bufs[p].view(4, 6))
            p.grad, q.grad = views[-1], bufs[p].clone()
        opt.step()
        ref.step()
    assert calls["sgd"] == 6
    assert counts == {"fused_path": 2, "check_step": 2}
    for p, q in ((a, a_ref), (b, b_ref)):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


def test_optimizer_falls_back_for_an_amsgrad_state_of_another_layout(calls):
    # max_exp_avg_sq is read with amsgrad: of other strides than its parameter (loaded from elsewhere) the
    # native step does not serve it, and the general path gives torch's result.
    ours, theirs = make_model(), make_model()
    opt = ZNormAdam(ours.parameters(), lr=1e-2, amsgrad=True, backend="cpu")
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2, amsgrad=True)
    znorm_kernels.register(ref, backend="cpu")
    data = batches(3)
    train(ours, opt, data[:1])
    train(theirs, ref, data[:1])
    assert calls["adam"] == 1
    for o, w in ((opt, ours[4].weight), (ref, theirs[4].weight)):
        state = o.state[w]
        state["max_exp_avg_sq"] = state["max_exp_avg_sq"].t().contiguous().t()  # same values, other strides
    train(ours, opt, data[1:])
    train(theirs, ref, data[1:])
    assert calls["adam"] == 1
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])

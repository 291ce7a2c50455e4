"""Shared test helpers: the float64 formula, contract rule 10 (its bound is znorm_kernels.accuracy, which the
benchmark's accuracy gate and the diagnostics share), input makers, backends under test, the option grids and
torch's Adam for the fused optimizer steps, subprocess runs (CPU ISA, PTX)."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

import znorm_kernels
from znorm_kernels.accuracy import allowed_error
from znorm_kernels.registry import BACKENDS, resolve_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# The option combinations of torch's functional sgd and adam the fused optimizer steps are checked over
# (test_native_optim.py, test_triton_optim.py); "decoupled" is AdamW's decoupled weight decay.
SGD_OPTIONS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product(
        [0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 0.01], [False, True]
    )
    if not (n and (m == 0 or d != 0))  # torch.optim.SGD refuses nesterov without momentum or with dampening
    and not (m == 0 and d != 0)  # dampening is unused without momentum
]
ADAM_OPTIONS = [
    dict(amsgrad=a, decoupled=dc, weight_decay=wd, maximize=mx)
    for a, dc, wd, mx in itertools.product([False, True], [False, True], [0.0, 0.01], [False, True])
    if not (dc and wd == 0)  # AdamW without weight decay is Adam
]


def options_id(opts: dict) -> str:
    """A test id for one of SGD_OPTIONS or ADAM_OPTIONS: "momentum=0.9-dampening=0.0-..."."""
    return "-".join(f"{k}={v}" for k, v in opts.items())


def adam_step_sizes(counts: list[int], lr: float, betas: tuple[float, float]) -> tuple[list, list]:
    """The fused Adam step's per-tensor step_size, lr / (1 - beta1**t), and bias_correction2_sqrt,
    sqrt(1 - beta2**t), for each tensor's step count t (the step being taken included)."""
    beta1, beta2 = betas
    return [lr / (1 - beta1**t) for t in counts], [(1 - beta2**t) ** 0.5 for t in counts]


def adam_start(params: list[Tensor], step0: list[int] | None = None) -> tuple[list, list[int], list[Tensor]]:
    """A fresh Adam state for ``params``: zero exp_avgs, exp_avg_sqs and max_exp_avg_sqs lists, the step
    counts (``step0``, else 0 each) and torch's step tensors for them."""
    counts = list(step0) if step0 else [0] * len(params)
    states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    return states, counts, [torch.tensor(float(c)) for c in counts]


def count_calls(monkeypatch, owner: object, name: str) -> list[int]:
    """Wrap ``owner.name`` (for this test) so that every call appends one entry to the returned list; the
    real function still runs. The arguments are not kept (a test may check that tensors die)."""
    calls: list[int] = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def torch_adam_step(params, z, states, steps, opts: dict, *, lr, betas, eps) -> None:
    """One step of torch's functional Adam (foreach=False) with the z-scores ``z`` as gradients, ``opts`` one
    of ADAM_OPTIONS; ``states`` the exp_avgs, exp_avg_sqs and max_exp_avg_sqs lists, ``steps`` torch's step
    tensors."""
    torch_opts = {k: v for k, v in opts.items() if k != "decoupled"}
    torch_adam(
        params, z, *states, steps, foreach=False, decoupled_weight_decay=opts["decoupled"],
        beta1=betas[0], beta2=betas[1], lr=lr, eps=eps, **torch_opts,
    )  # fmt: skip


def backends_under_test() -> list[tuple[str, str]]:
    """(backend, device) pairs this process can test: every available backend on every device it serves."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs = []
    for name in znorm_kernels.available_backends():
        for device in devices:
            try:
                resolve_backend(name, device)
            except RuntimeError:
                continue
            pairs.append((name, device))
    return pairs


def fused_backends_under_test() -> list[tuple[str, str]]:
    return [(b, d) for b, d in backends_under_test() if b != "reference"]


def known_backends() -> list[str]:
    return list(BACKENDS)


def float64_znorm(x: Tensor, eps: float = 1e-10, correction: float = 0, scale: float | None = None) -> Tensor:
    """The formula in float64 on the input's values (a separate computation from the reference's). Values
    beyond 2**500 or below 2**-500 in magnitude are first scaled by a power of two, eps with them (exact: the
    z-scores are the same), so that the formula's own sums and squares neither overflow nor underflow."""
    v = x.detach().to(torch.float64).cpu()
    if v.numel() < 2:
        return v.clone()
    big = float(v.abs().max())
    if math.isfinite(big) and big > 0 and not 2.0**-500 <= big <= 2.0**500:
        k = max(-1000, min(1000, math.frexp(big)[1]))
        v, eps = v * 2.0**-k, eps * 2.0**-k
    mean = v.mean()
    var = ((v - mean) ** 2).sum() / (v.numel() - correction)
    std = var.sqrt()
    if scale is None:
        return (v - mean) / (std + eps)
    return scale * (v - mean) / (std + scale * eps)


def assert_close_to_float64(
    out: Tensor, inp: Tensor, eps: float = 1e-10, correction: float = 0, scale: float | None = None, atol=1e-5
) -> None:
    """contract rule 10: |z - z64| <= 1e-5 (times the scale when one is given), plus for float16/bfloat16 the
    rounding of the result into that dtype."""
    expected = float64_znorm(inp, eps, correction, scale)
    got = out.detach().to(torch.float64).cpu().reshape(expected.shape)
    bound = allowed_error(expected, got, out.dtype, atol * (scale or 1.0))
    err = (got - expected).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        flat_got, flat_exp, flat_bound = got.reshape(-1), expected.reshape(-1), bound.reshape(-1)
        raise AssertionError(
            f"{int(bad.sum())} of {err.numel()} z-scores off ({out.dtype}): e.g. index {i}: "
            f"got {flat_got[i].item()}, float64 {flat_exp[i].item()}, bound {flat_bound[i].item()}"
        )


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one dtype hold the same bits (the sign of zero and NaN payloads count)."""
    view = _INT_VIEW[a.element_size()]
    return torch.equal(a.view(view), b.view(view))


def make_grad(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    *,
    seed: int = 0,
    mean: float = 0.3,
    std: float = 2.0,
) -> Tensor:
    """A well-conditioned random gradient (not zeros, not mean-free)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    return x.to(dtype).to(device)


def layouts(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, Tensor]:
    """The same logical values in several memory layouts: contiguous, channels_last, transposed (dense,
    permuted) and a non-dense strided view into a larger buffer."""
    base = make_grad(shape, dtype, device, seed=seed)
    out = {"contiguous": base.clone()}
    if len(shape) == 4:
        out["channels_last"] = base.clone().to(memory_format=torch.channels_last)
    if len(shape) >= 2:
        out["transposed"] = base.clone().transpose(0, 1).contiguous().transpose(0, 1)
    big = torch.zeros((*shape[:-1], shape[-1] * 2 + 1), dtype=dtype, device=device)
    view = big[..., 1::2]
    view.copy_(base)
    out["strided_view"] = view
    return out


def saved_per_cpu_isa(script: str, tmp_path) -> list:
    """What ``script`` saves with torch.save to the path it is given (its argv[1]), run in a fresh interpreter
    with the portable CPU loops (ZNORM_CPU_ISA=baseline), the AVX2 ones ("avx2") and the ones picked at run
    time ("auto": AVX-512 where the CPU has it): the three results, in that order."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for isa in ("baseline", "avx2", "auto"):
        env = {**os.environ, "ZNORM_CPU_ISA": isa}
        path = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], env=env, cwd=root, check=True)
        results.append(torch.load(path))
    return results


def compiled_ptx(script: str, cases: list) -> dict[str, str]:
    """The PTX ``script`` prints (a JSON dict) for ``cases`` (passed as its JSON argument), run in a fresh
    interpreter without TRITON_INTERPRET so the kernels are real JIT functions; skips where Triton's ptxas is
    missing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, env=env, cwd=root
    )
    if done.returncode != 0:
        if "ptxas" in done.stderr and "not found" in done.stderr.lower():
            pytest.skip("Triton's ptxas is not available")
        raise AssertionError(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def ptxas_usage(ptx: str, tmp_path) -> tuple[int, list[int], str]:
    """(registers per thread, spill byte counts, ptxas's report) of ``ptx`` assembled for sm_90a; skips where
    ptxas is not installed."""
    ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    if not os.path.exists(ptxas):
        pytest.skip("ptxas not installed")
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    command = [ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(tmp_path / "k.cubin")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    regs = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr)]
    return regs, spills, done.stderr

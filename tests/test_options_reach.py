"""``eps`` and ``correction`` reach the arithmetic through every entry point: ``znorm_``, the public
reference, the hook, the ZNorm optimizers (fused and general paths, optimizer-wide and per param group) and
the Lightning and Hugging Face callbacks. Each result is checked against the float64 formula with the same
values, not against another backend, with values chosen so that ignoring either option shows: ``eps`` of
0.5 beside standard deviations near 1, and ``correction=1`` on tensors of a few elements (a factor
sqrt(n/(n-1)) on every z-score)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import znorm_kernels
from tests.utils import backends_under_test, float64_znorm, make_grad
from znorm_kernels.optim import ZNormAdam, ZNormAdamW, ZNormSGD

PAIRS = backends_under_test()
backend_device = pytest.mark.parametrize(("backend", "device"), PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
# (eps, correction): each one alone, both, and the defaults (the formula's own defaults must hold too).
OPTIONS = [(0.5, 0), (1e-10, 1), (0.5, 1), (1e-10, 0)]
option_ids = [f"eps{e}-corr{c}" for e, c in OPTIONS]
SIZES = (3, 5, 40, 300)  # few elements: correction shows; 300: several warps' worth


def grads(device: str, seed: int = 0) -> list[torch.Tensor]:
    return [make_grad((n,), device=device, seed=seed + n) for n in SIZES]


def assert_formula(
    got: list[torch.Tensor], inputs: list[torch.Tensor], eps: float, correction: float
) -> None:
    for g, x in zip(got, inputs, strict=True):
        want = float64_znorm(x, eps, correction)
        torch.testing.assert_close(g.detach().double().cpu(), want, atol=1e-5, rtol=1e-5)


def test_the_options_change_the_result():
    # The premise of this file: with these tensors each option moves every z-score well past the tolerance.
    x = grads("cpu")[0]
    base = float64_znorm(x)
    for eps, correction in OPTIONS[:3]:
        assert float((float64_znorm(x, eps, correction) - base).abs().min()) > 1e-2


@backend_device
@pytest.mark.parametrize(("eps", "correction"), OPTIONS, ids=option_ids)
def test_znorm_(backend, device, eps, correction):
    gs = grads(device)
    inputs = [g.clone() for g in gs]
    znorm_kernels.znorm_(gs, eps=eps, correction=correction, backend=backend)
    assert_formula(gs, inputs, eps, correction)


@pytest.mark.parametrize(("eps", "correction"), OPTIONS, ids=option_ids)
def test_public_reference(eps, correction):
    gs = grads("cpu")
    inputs = [g.clone() for g in gs]
    znorm_kernels.reference.znorm_(gs, eps=eps, correction=correction)
    assert_formula(gs, inputs, eps, correction)


def params_with_grads(device: str, seed: int = 0) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """Parameters at zero (so SGD with lr 1 leaves -z in them) and their gradients' values."""
    values = grads(device, seed)
    params = [nn.Parameter(torch.zeros_like(v)) for v in values]
    for p, v in zip(params, values):
        p.grad = v.clone()
    return params, values


@backend_device
@pytest.mark.parametrize(("eps", "correction"), OPTIONS, ids=option_ids)
def test_register(backend, device, eps, correction):
    params, values = params_with_grads(device)
    opt = torch.optim.SGD(params, lr=1.0)
    znorm_kernels.register(opt, eps=eps, correction=correction, backend=backend)
    for _ in range(2):  # the full path, then the cached one
        for p, v in zip(params, values):
            p.grad = v.clone()
        opt.step()
        assert_formula([p.grad for p in params], values, eps, correction)


OPTIMIZERS = [(ZNormSGD, dict(lr=1.0)), (ZNormAdam, dict(lr=1e-3)), (ZNormAdamW, dict(lr=1e-3))]
optimizer_ids = [cls.__name__ for cls, _ in OPTIMIZERS]


@backend_device
@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=optimizer_ids)
@pytest.mark.parametrize(("eps", "correction"), OPTIONS[:3], ids=option_ids[:3])
@pytest.mark.parametrize("path", ["fused", "general"])
def test_optimizers(backend, device, cls, kwargs, eps, correction, path):
    # normalize_grad=True leaves the z-scores the update used in .grad, on either path; the general path is
    # taken where a group's options rule the fused step out (torch's own fused kernel).
    if path == "general" and device == "cpu":
        try:
            torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, fused=True)
        except (RuntimeError, ValueError) as err:
            pytest.skip(f"torch's fused optimizer unavailable here: {err}")
    params, values = params_with_grads(device)
    extra = {"fused": True} if path == "general" else {}
    opt = cls(params, znorm_eps=eps, correction=correction, backend=backend, normalize_grad=True, **kwargs,
              **extra)  # fmt: skip
    for _ in range(2):  # a full step, then (fused) a remembered one
        for p, v in zip(params, values):
            p.grad = v.clone()
        opt.step()
        assert_formula([p.grad for p in params], values, eps, correction)


@backend_device
@pytest.mark.parametrize(("eps", "correction"), OPTIONS[:3], ids=option_ids[:3])
def test_sgd_update_without_normalize_grad(backend, device, eps, correction):
    # The default (.grad left raw): the update itself carries the options. SGD, lr 1, from zero: p = -z.
    params, values = params_with_grads(device)
    opt = ZNormSGD(params, lr=1.0, znorm_eps=eps, correction=correction, backend=backend)
    opt.step()
    assert_formula([-p.detach() for p in params], values, eps, correction)
    for p, v in zip(params, values):
        assert torch.equal(p.grad, v), ".grad keeps the raw gradient"


@backend_device
@pytest.mark.parametrize("cls", [ZNormSGD, ZNormAdam], ids=["ZNormSGD", "ZNormAdam"])
def test_options_per_param_group(backend, device, cls):
    # Each group's own znorm_eps and correction, the optimizer's defaults where a group has none.
    params, values = params_with_grads(device)
    groups = [
        {"params": params[:2], "znorm_eps": 0.5, "correction": 1},
        {"params": params[2:3], "correction": 1},
        {"params": params[3:]},
    ]
    opt = cls(groups, lr=1e-3, znorm_eps=0.25, backend=backend, normalize_grad=True)
    opt.step()
    assert_formula([p.grad for p in params[:2]], values[:2], 0.5, 1)
    assert_formula([params[2].grad], values[2:3], 0.25, 1)
    assert_formula([params[3].grad], values[3:], 0.25, 0)


def _lightning_callback(**options):
    pytest.importorskip("lightning.pytorch")
    from znorm_kernels.integrations.lightning import ZNormCallback

    callback = ZNormCallback(**options)
    return lambda opt, model: callback.on_before_optimizer_step(None, model, opt)


def _hf_callback(**options):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from znorm_kernels.integrations.hf import ZNormTrainerCallback

    callback = ZNormTrainerCallback(**options)
    return lambda opt, model: callback.on_pre_optimizer_step(None, None, None, optimizer=opt, model=model)


@pytest.mark.parametrize("make", [_lightning_callback, _hf_callback], ids=["lightning", "hf"])
@pytest.mark.parametrize(("eps", "correction"), OPTIONS[:3], ids=option_ids[:3])
def test_callbacks(make, eps, correction):
    run = make(eps=eps, correction=correction)
    params, values = params_with_grads("cpu")
    model = nn.ParameterList(params)
    run(torch.optim.SGD(params, lr=1.0), model)
    assert_formula([p.grad for p in params], values, eps, correction)

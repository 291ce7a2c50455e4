"""The papers' baselines against hand-written formulas: gradient centralization and norm clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import znorm_kernels
from tests.utils import make_grad


def gc_by_hand(g: torch.Tensor) -> torch.Tensor:
    """Yong et al.'s formula, written out: one mean per output channel over all other dims, in float64."""
    v = g.double()
    if v.dim() <= 1:
        return v
    flat = v.reshape(v.shape[0], -1)
    return (flat - flat.sum(1, keepdim=True) / flat.shape[1]).reshape(v.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gc_matches_formula(dtype):
    shapes = [(16, 3, 3, 3), (10, 64), (64,), (5, 2, 7)]
    grads = [make_grad(s, dtype, seed=i) for i, s in enumerate(shapes)]
    grads.append(make_grad((8, 4, 3, 3), dtype).to(memory_format=torch.channels_last))
    inputs = [g.clone() for g in grads]
    znorm_kernels.gc_([*grads, None])
    tol = 1e-6 if dtype != torch.bfloat16 else 3e-2
    for g, x in zip(grads, inputs):
        torch.testing.assert_close(g.double(), gc_by_hand(x), atol=tol, rtol=0)
        if g.dim() > 1:  # every output channel now has zero mean
            assert g.double().reshape(g.shape[0], -1).mean(1).abs().max() < tol


def test_gc_bad_input():
    grads = [torch.randn(4, 4), torch.randn(4, 4).to_sparse()]
    before = grads[0].clone()
    with pytest.raises(TypeError, match="position 1"):
        znorm_kernels.gc_(grads)
    assert torch.equal(grads[0], before)


def test_register_gc_hook():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = znorm_kernels.register_gc(opt)
    net(torch.randn(4, 5)).sum().backward()
    expected = {n: gc_by_hand(p.grad).float() for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0, msg=n)
    handle.remove()


def clip_by_hand(grads, max_norm):
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    return [g.double() * coef for g in grads], float(total)


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 1e3])
def test_clip_matches_formula(max_norm):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in [(4, 3), (7,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn_like(p)
    expected, total = clip_by_hand([p.grad for p in params], max_norm)
    got_total = znorm_kernels.clip_grad_norm_(params, max_norm)
    assert abs(float(got_total) - total) < 1e-4
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), e, atol=1e-6, rtol=1e-5)


def test_clip_with_grad_scale_matches_unscaled():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in [(4, 3), (7,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    expected, _ = clip_by_hand([p.grad for p in params], 0.1)
    for p in params:
        p.grad.mul_(4096.0)
    znorm_kernels.clip_grad_norm_(params, 0.1, grad_scale=torch.tensor(4096.0))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double() / 4096.0, e, atol=1e-6, rtol=1e-5)


def test_register_clip_hook_default_threshold_is_papers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    znorm_kernels.register_clip(opt)
    (net(torch.randn(4, 5)).sum() * 100).backward()
    expected, total = clip_by_hand([p.grad for p in net.parameters()], 0.1)
    assert total > 0.1
    opt.step()
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad.double(), e, atol=1e-6, rtol=1e-5)
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters()))
    assert abs(float(norm) - 0.1) < 1e-5


def test_register_clip_rejects_bad_threshold():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError):
        znorm_kernels.register_clip(opt, max_norm=0.0)

"""ZNorm under torch.compile: the custom op ``znorm_kernels::znorm_`` traces without a graph break, gives the
eager results, and passes torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import znorm_kernels
from tests.utils import make_grad
from znorm_kernels import reference
from znorm_kernels.ops import znorm_op


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_znorm_fullgraph_matches_eager():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(grads, scale):
        znorm_kernels.znorm_(grads, eps=1e-6)
        return grads[0] * scale

    grads = [make_grad((10,), seed=1), make_grad((3, 4), seed=2), make_grad((5,), torch.float64, seed=3)]
    expected = [g.clone() for g in grads]
    reference.znorm_(expected, eps=1e-6)
    out = step(grads, 2.0)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, expected[0] * 2.0, atol=2e-6, rtol=0)


def test_znorm_fullgraph_with_inductor():
    @torch.compile(fullgraph=True)
    def step(grads):
        znorm_kernels.znorm_(grads)
        return grads[1].sum()

    grads = [make_grad((64,), seed=1), make_grad((8, 8), seed=2)]
    expected = [g.clone() for g in grads]
    reference.znorm_(expected)
    out = step(grads)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, expected[1].sum(), atol=1e-4, rtol=0)


def test_hook_compiles_fullgraph():
    # The function the hook installs, traced whole: selection, grad scale look-up and the op.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = znorm_kernels.register(opt, min_ndim=2)
    hook = opt._optimizer_step_pre_hooks[handle.id]
    net(torch.randn(5, 8)).sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    reference.znorm_([e for e in expected if e.dim() >= 2])
    torch.compile(fullgraph=True, backend="aot_eager")(lambda: hook(opt, (), {}))()
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=0)


def test_op_is_registered_with_mutation():
    schema = torch.ops.znorm_kernels.znorm_.default._schema
    assert schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write
    assert len(schema.returns) == 0


@pytest.mark.parametrize("scale", [None, 64.0])
def test_opcheck(scale):
    grads = [make_grad((7,), seed=1), make_grad((3, 5), seed=2)]
    s = None if scale is None else torch.tensor(scale)
    torch.library.opcheck(znorm_op, (grads, 1e-10, 0.0, "auto", s))

"""Group functions bound to a list's addresses: the ``cpu`` backend's ``CpuList`` (csrc/cpu_znorm.cpp,
backends/native.py ``bind``) writes the op's bits and holds no tensor, and the dispatcher keeps bound
functions in the check cache's memo (``dispatch.plan_groups(bound=True)``, check_cache), so only a call
that hits a check that still holds uses them."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import znorm_kernels
from tests.utils import count_calls, make_grad, same_bits
from znorm_kernels.backends import native
from znorm_kernels.check_cache import recent_checks

pytestmark = pytest.mark.skipif(native.unavailable("cpu") is not None, reason="znorm_kernels._C is not built")


def _list(seed: int = 0) -> list[torch.Tensor]:
    """Sizes around the CPU kernel's chunk (16384) and parallel threshold (65536), 1 and 2 elements, a
    channels_last tensor, a constant one and an outlier."""
    out = [make_grad((n,), seed=seed + n) for n in (1, 2, 3, 16383, 16384, 16385, 70000)]
    out.append(make_grad((2, 3, 5, 7), seed=seed).to(memory_format=torch.channels_last))
    out.append(torch.full((40,), 3.25))
    spike = make_grad((500,), seed=seed + 1)
    spike[123] = 1e6
    out.append(spike)
    return out


def _op(tensors, eps=1e-10, correction=0.0, scale=None):
    with torch.no_grad():
        torch.ops.znorm_kernels_C.znorm_(tensors, eps, correction, scale, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("opts", [(1e-10, 0.0, None), (1e-3, 1.0, None), (1e-10, 0.0, 64.0)])
def test_a_bound_list_writes_the_ops_bits_call_after_call(dtype, opts):
    eps, correction, scale = opts
    scale = None if scale is None else torch.tensor(scale)
    tensors = [t.to(dtype) for t in _list()]
    bound = native.bind(tensors)
    assert bound is not native.group_fn("cpu")
    for seed in range(3):  # new values at the same addresses each call
        values = [t.to(dtype) for t in _list(seed)]
        expected = [v.clone() for v in values]
        _op(expected, eps, correction, scale)
        for t, v in zip(tensors, values):
            t.copy_(v)
        bound(tensors, eps, correction, scale)
        for t, e in zip(tensors, expected):
            assert same_bits(t, e)


def test_a_bound_list_holds_addresses_not_tensors():
    tensors = _list()
    bound = native.bind(tensors)
    refs = [weakref.ref(t) for t in tensors]
    del tensors
    gc.collect()
    assert all(r() is None for r in refs)
    del bound


def test_lists_that_cannot_be_bound_take_the_op():
    run = native.group_fn("cpu")

    class Sub(torch.Tensor):
        pass

    dense = make_grad((30,))
    assert native.bind([dense, make_grad((8, 6)).t()]) is not run, "a transposed tensor is dense"
    assert native.bind([dense, make_grad((8, 6))[:, :3]]) is run, "a view with gaps"
    assert native.bind([dense, make_grad((5,)).as_subclass(Sub)]) is run, "a subclass"
    assert native.bind([]) is run
    stats = torch.zeros(1, 2, dtype=torch.float64)
    x = make_grad((30,))
    expected = x.clone()
    _op([expected])
    native.bind([x])([x], 1e-10, 0.0, None, stats=stats)  # stats: through the op
    assert torch.equal(x, expected) and stats[0, 1] > 0


def test_a_bound_list_refuses_what_the_op_refuses():
    with pytest.raises(RuntimeError, match="dtype"):
        torch.classes.znorm_kernels_C.CpuList([torch.arange(6)])
    # What the dispatcher stops before the op's kernel is never bound: those lists keep the op and its error.
    run = native.group_fn("cpu")
    for odd in (torch._efficientzerotensor(8), make_grad((6,))._neg_view()):
        with pytest.raises(RuntimeError, match="not a plain CPU tensor"):
            torch.classes.znorm_kernels_C.CpuList([make_grad((4,)), odd])
        assert native.bind([odd]) is run
    zeros = [torch._efficientzerotensor(8), make_grad((4,))]
    for _ in range(2):  # the second call hits the check cache
        with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
            znorm_kernels.znorm_(zeros, backend="cpu")


def test_modes_see_the_op_of_a_bound_list():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    recent_checks.clear()
    tensors = _list()
    for _ in range(2):  # bound on the second call
        znorm_kernels.znorm_(tensors, backend="cpu")
    with Seen() as mode:  # (the mode changes what the layout guard reads: checked and bound anew in it)
        for _ in range(3):
            znorm_kernels.znorm_(tensors, backend="cpu")
    assert sum("znorm_kernels_C.znorm_" in op for op in mode.ops) == 3


def test_direct_calls_reuse_the_bound_function_while_the_check_holds(monkeypatch):
    recent_checks.clear()
    binds = count_calls(monkeypatch, native.group_fn("cpu"), "bind")
    tensors = _list()
    znorm_kernels.znorm_(tensors, backend="cpu")
    assert binds == [], "a list seen once is not bound"
    for seed in range(3):
        for t, v in zip(tensors, _list(seed)):
            t.copy_(v)
        expected = [t.clone() for t in tensors]
        _op(expected)
        znorm_kernels.znorm_(tensors, backend="cpu")
        for t, e in zip(tensors, expected):
            assert same_bits(t, e)
    assert len(binds) == 1, "bound once, on the first call that found the check"
    # Another list at other addresses: checked, then bound on its second call; the first list's binding
    # stays with its check.
    other = [t.clone() for t in tensors]
    znorm_kernels.znorm_(other, backend="cpu")
    znorm_kernels.znorm_(other, backend="cpu")
    znorm_kernels.znorm_(tensors, backend="cpu")
    assert len(binds) == 2
    # A tensor of the list replaced by one at another address: a new check, bound on the next call.
    tensors[4] = tensors[4].clone()
    before = [t.clone() for t in tensors]
    znorm_kernels.znorm_(tensors, backend="cpu")
    znorm_kernels.znorm_(tensors, backend="cpu")
    assert len(binds) == 3
    _op(before)
    _op(before)
    for t, e in zip(tensors, before):
        assert same_bits(t, e)


def test_a_checks_memo_goes_with_its_tensors():
    recent_checks.clear()
    tensors = [make_grad((64,), seed=1), make_grad((9,), seed=2)]
    znorm_kernels.znorm_(tensors, backend="cpu")
    znorm_kernels.znorm_(tensors, backend="cpu")
    groups = recent_checks.get(tensors)
    assert groups.memo, "the bound function is kept with the check"
    ref = weakref.ref(next(iter(groups.memo.values())))
    del groups
    tensors.pop()
    gc.collect()
    assert ref() is None, "a tensor died: its check, memo and binding went with it"


def test_the_dispatcher_binds_only_on_a_cached_check(monkeypatch):
    # A list the cache does not keep (nothing to normalize in it) is never bound.
    binds = count_calls(monkeypatch, native.group_fn("cpu"), "bind")
    recent_checks.clear()
    znorm_kernels.znorm_([torch.zeros(1), None], backend="cpu")
    assert binds == []
    monkeypatch.setattr(recent_checks, "put", lambda *args: None)
    x = make_grad((20,))
    znorm_kernels.znorm_([x], backend="cpu")
    assert binds == []

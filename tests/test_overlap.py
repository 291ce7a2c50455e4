"""Rule 11: the same memory given twice in one call (the same tensor, or a view of exactly its elements) is
normalized once; tensors that share part of their memory raise ValueError naming both positions, with nothing
modified. Interleaved views that share no byte are independent tensors."""

from __future__ import annotations

import pytest
import torch

import znorm_kernels
from tests.utils import assert_close_to_float64, backends_under_test, count_calls, make_grad

BACKENDS = backends_under_test()
backend_device = pytest.mark.parametrize(
    ("backend", "device"), BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS]
)


@backend_device
@pytest.mark.parametrize("twice", ["same", "view(-1)", "t()", "same view"])
def test_rule11_same_memory_twice_is_normalized_once(backend, device, twice):
    g = make_grad((40, 30), device=device)
    x = g.clone()
    other = {"same": g, "view(-1)": g.view(-1), "t()": g.t(), "same view": g[:, :]}[twice]
    extra = make_grad((7,), device=device, seed=3)
    y = extra.clone()
    znorm_kernels.znorm_([g, extra, other], backend=backend)
    assert_close_to_float64(g, x)
    assert_close_to_float64(extra, y)  # the other tensors of the call are normalized as usual


@backend_device
def test_rule11_same_non_dense_view_twice(backend, device):
    base = make_grad((50, 20), device=device)
    x = base[:, ::2].clone()
    znorm_kernels.znorm_([base[:, ::2], base[:, ::2]], backend=backend)
    assert_close_to_float64(base[:, ::2], x)


@backend_device
@pytest.mark.parametrize(
    "pair",
    ["prefix and window", "whole and every other", "matrix and its columns", "window and its tail"],
)
def test_rule11_partial_overlap_raises_and_modifies_nothing(backend, device, pair):
    a = make_grad((64,), device=device)
    m = make_grad((8, 8), device=device, seed=1)
    views = {
        "prefix and window": (a[:40], a[20:60]),
        "whole and every other": (a, a[::2]),
        "matrix and its columns": (m, m[:, :3]),
        "window and its tail": (a[0::2], a[8::4]),
    }[pair]
    keep = make_grad((9,), device=device, seed=2)
    before = [a.clone(), m.clone(), keep.clone()]
    with pytest.raises(ValueError, match=r"position 1 .*position 2|position 1.* and .*position 2"):
        znorm_kernels.znorm_([keep, *views], backend=backend)
    for t, b in zip((a, m, keep), before):
        assert torch.equal(t, b), "nothing is modified when the input is rejected"


@backend_device
@pytest.mark.parametrize(
    "pair",
    [
        "prefix first",  # a[:40] and a: the same first byte, fewer elements
        "prefix last",
        "suffix first",  # a[60:] and a: the same last byte
        "suffix last",
        "rows of a matrix",  # m[:3] and m: a dense prefix of another shape
        "prefix as a matrix",  # a[:40].view(4, 10) and a.view(10, 10)
        "one element short",  # a[:-1] and a
    ],
)
def test_rule11_a_prefix_or_suffix_of_the_same_memory_raises(backend, device, pair):
    # Views that start (or end) at the same address but cover fewer elements are partial overlaps, not the
    # same tensor twice: normalizing one would change part of the other.
    a = make_grad((100,), device=device)
    m = make_grad((10, 10), device=device, seed=1)
    views = {
        "prefix first": (a[:40], a),
        "prefix last": (a, a[:40]),
        "suffix first": (a[60:], a),
        "suffix last": (a, a[60:]),
        "rows of a matrix": (m[:3], m),
        "prefix as a matrix": (a[:40].view(4, 10), a.view(10, 10)),
        "one element short": (a[:-1], a),
    }[pair]
    before = [a.clone(), m.clone()]
    with pytest.raises(ValueError, match=r"position 0 .*position 1.* share part of their memory"):
        znorm_kernels.znorm_(list(views), backend=backend)
    for t, b in zip((a, m), before):
        assert torch.equal(t, b), "nothing is modified when the input is rejected"


def test_rule11_a_prefix_at_the_same_address_through_the_hook():
    # The hook's cached path: gradients that move onto one buffer, the first a prefix of the second, must
    # take the full check (and raise), not the cache's verdict for disjoint gradients.
    a, b = torch.nn.Parameter(torch.zeros(40)), torch.nn.Parameter(torch.zeros(100))
    opt = torch.optim.SGD([a, b], lr=0.1)
    znorm_kernels.register(opt, backend="reference")
    a.grad, b.grad = make_grad((40,), seed=1), make_grad((100,), seed=2)
    opt.step()  # disjoint gradients: cached
    buf = make_grad((100,), seed=3)
    a.grad, b.grad = buf[:40], buf
    before = buf.clone()
    with pytest.raises(ValueError, match="share part of their memory"):
        opt.step()
    assert torch.equal(buf, before)


def _views(x: torch.Tensor, pair: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of views of one 100-element float32 tensor (and of its bytes as bfloat16)."""
    m, half = x.view(10, 10), x.view(torch.bfloat16)
    return {
        # At one address, as many elements, other elements: not the same tensor twice.
        "same shape, other strides": (x[::2], x[:50]),
        "same strides, other shape": (m[:, :5], m[:5]),
        "dense first, as many elements": (x[:50], x[::2]),
        # Strided views whose ranges meet: they share x[6] (and only it).
        "two strides, one common element": (x[0:10:2], x[6:12:5]),
        # A float32 view and a bfloat16 view holding the upper halves of its elements, either order.
        "float32 then bfloat16 halves": (x[0::2], half[1::4]),
        "bfloat16 halves then float32": (half[1::4], x[0::2]),
    }[pair]


@pytest.mark.parametrize(
    "pair",
    [
        "same shape, other strides",
        "same strides, other shape",
        "dense first, as many elements",
        "two strides, one common element",
        "float32 then bfloat16 halves",
        "bfloat16 halves then float32",
    ],
)
def test_rule11_views_sharing_some_bytes_raise(pair):
    # The overlap analysis runs before any backend (the reference here): views that share bytes but are not
    # the same elements raise, whatever their shapes, strides or dtypes.
    x = make_grad((100,))
    before = x.clone()
    with pytest.raises(ValueError, match=r"position 0 .*position 1.* share part of their memory"):
        znorm_kernels.znorm_(list(_views(x, pair)), backend="reference")
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "pair",
    [
        "one element between every other",
        "a dense pair between a strided view's elements",
        "bfloat16 halves beside float32",
        "float32 beside bfloat16 halves",
    ],
)
def test_rule11_views_sharing_no_byte_are_independent(pair):
    x = make_grad((100,))
    half = x.view(torch.bfloat16)
    a, b = {
        "one element between every other": (x[0:10:2], x[5:6]),  # a dense view inside a strided one's range
        # Two elements (so it is normalized, not dropped): one dense view does not make the pair share bytes.
        "a dense pair between a strided view's elements": (x[0:20:4], x[1:3]),
        "bfloat16 halves beside float32": (half[2::4], x[0::2]),  # the halves of x[1], x[3], ...
        "float32 beside bfloat16 halves": (x[0::2], half[2::4]),
    }[pair]
    xa, xb = a.clone(), b.clone()
    znorm_kernels.znorm_([a, b], backend="reference")
    assert_close_to_float64(a, xa)
    assert_close_to_float64(b, xb)


def test_rule11_interleaved_views_past_float32s_integers():
    # Element offsets beyond 2**24 are not all float32 integers: the analysis must stay in integers there, or
    # x[1::2]'s last element would round onto x[0::2]'s and two independent views would be refused.
    x = torch.zeros(2**24 + 2)
    even, odd = x[0::2], x[1::2]
    znorm_kernels.znorm_([even, odd], backend="reference")  # raises nothing


def test_rule11_a_duplicate_is_normalized_once_not_twice():
    # With eps = 1 a second normalization would change the values (z / (std(z) + 1) is not z).
    g = make_grad((50,))
    x = g.clone()
    znorm_kernels.znorm_([g, g.view(5, 10), g[:]], eps=1.0, backend="reference")
    assert_close_to_float64(g, x, eps=1.0)


def test_rule11_an_overlap_found_past_a_view_that_ends_later():
    # The sweep goes by start address: x[10:20:2] shares elements with x[0:100:2], though x[21:61:2], which
    # ends between them, shares none with either.
    x = make_grad((100,))
    with pytest.raises(
        ValueError, match=r"^znorm_: tensor at position 0 and tensor at position 1 share part"
    ):
        znorm_kernels.znorm_([x[0:100:2], x[10:20:2], x[21:61:2]], backend="reference")


def test_rule11_error_names_parameters():
    a = torch.randn(30)
    with pytest.raises(ValueError, match=r"'w'.*'w_window'"):
        znorm_kernels.znorm_([a, a[5:20]], names=["w", "w_window"])


@backend_device
def test_interleaved_views_are_independent(backend, device):
    a = make_grad((100,), device=device)
    even, odd = a[0::2], a[1::2]
    xe, xo = even.clone(), odd.clone()
    znorm_kernels.znorm_([even, odd], backend=backend)
    assert_close_to_float64(even, xe)
    assert_close_to_float64(odd, xo)


def test_hook_cached_path_does_not_recheck(monkeypatch):
    """The check runs on the full path only: the hook's steps with unchanged gradients skip it."""
    from znorm_kernels import validation

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    znorm_kernels.register(opt)
    calls = count_calls(monkeypatch, validation, "check_and_group")
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    assert len(calls) == 1

"""The host's fast paths keep the exact checks' results: the one-pass check of plain lists against the
per-tensor one, the overlap test against brute force, the cache of recent checks (same tensor objects only),
and the hook's cache with None gradients (re-checked whenever a gradient appears, disappears or moves), on
the Python path and on the native steady path (tests/test_grad_watch.py) alike."""

from __future__ import annotations

import gc
import math
import random

import pytest
import torch
from torch import nn

import znorm_kernels
from tests.utils import assert_close_to_float64, count_calls, make_grad
from znorm_kernels import dispatch, reference, validation
from znorm_kernels.check_cache import recent_checks
from znorm_kernels.overlap import disjoint


def _pool(rng: random.Random) -> list:
    """Entries of every kind the checks tell apart, many sharing memory with others."""
    a = make_grad((64,), seed=rng.randrange(100))
    m = make_grad((8, 8), seed=rng.randrange(100))
    h = make_grad((30,), torch.float16, seed=rng.randrange(100))
    d = make_grad((3, 4), torch.float64, seed=rng.randrange(100))
    cl = make_grad((2, 3, 4, 5), seed=rng.randrange(100)).to(memory_format=torch.channels_last)
    return [
        a, a[:40], a[20:60], a[::2], a[1::2], a[8::4], a.view(8, 8), a[:1], a[5:7], a[40:],
        m, m.t(), m[:, :3], m[:, ::2], m[2:4], m.view(-1),
        h, h[5:], h.view(torch.bfloat16), d, d.t(), d[:, 1],
        cl, cl.permute(0, 2, 3, 1), cl[:, :, :2],
        torch.randn(1), torch.randn(0), torch.randn(()), torch.randn(5), torch.randn(3, 2).t(),
        None, None,
        torch.randn(3, 1).expand(3, 4), torch.arange(6), torch.randn(4, dtype=torch.complex64),
        torch.randn(4, 4).to_sparse(), torch.empty(5, device="meta"), nn.Parameter(torch.randn(6)),
    ]  # fmt: skip


def _outcome(fn):
    try:
        return "ok", fn()
    except (TypeError, ValueError) as err:
        return type(err).__name__, str(err)


@pytest.mark.parametrize("seed", range(6))
def test_fast_checks_agree_with_the_exact_ones(seed):
    rng = random.Random(seed)
    fast_used = 0
    for _ in range(150):
        pool = _pool(rng)
        items = [rng.choice(pool) for _ in range(rng.randint(1, 7))]
        exact = _outcome(lambda items=items: validation._exact_groups(items, None, "znorm_"))
        fast = validation._fast_groups(items)
        if fast is not None:
            fast_used += 1
            assert exact[0] == "ok", f"the fast path accepted what the exact one rejects: {exact}"
            assert list(fast.items()) == list(exact[1].items())
        assert _outcome(lambda items=items: validation.check_and_group(items, None, "znorm_")) == exact
        # and through the cache, twice (the second call may hit it)
        for _ in range(2):
            got = _outcome(lambda items=items: validation.collect_indices(items)[1])
            assert got[0] == exact[0] and (got[0] != "ok" or list(got[1].items()) == list(exact[1].items()))
    assert fast_used > 20, "the fast path is exercised"


def test_fast_path_takes_plain_lists_with_nones_and_tiny_tensors():
    a, b = make_grad((5,)), make_grad((5,), torch.float16)
    c, d = make_grad((6, 2)).t(), make_grad((2, 2), torch.float64)
    items = [a, None, b, torch.randn(1), torch.randn(0), c, d, torch.randn(())]
    fast = validation._fast_groups(items)
    assert fast is not None
    assert list(fast.items()) == list(validation._exact_groups(items, None, "znorm_").items())


@pytest.mark.parametrize("seed", range(5))
def test_disjoint_agrees_with_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(400):
        n = rng.randint(1, 6)
        starts = [rng.randrange(0, 40) for _ in range(n)]
        ends = [s + rng.randint(1, 12) for s in starts]
        brute = all(ends[i] <= starts[j] or ends[j] <= starts[i] for i in range(n) for j in range(i + 1, n))
        assert disjoint(starts, ends) == brute, (starts, ends)


@pytest.fixture
def count_checks(monkeypatch):
    recent_checks.clear()
    yield count_calls(monkeypatch, validation, "check_and_group")
    recent_checks.clear()


def test_direct_calls_with_the_same_tensors_are_checked_once(count_checks):
    grads = [
        make_grad((20, 3), seed=1),
        None,
        make_grad((7,), torch.float16, seed=2),
        make_grad((9,), seed=3),
    ]
    for _ in range(3):
        before = [g.clone() if g is not None else None for g in grads]
        znorm_kernels.znorm_(grads, backend="reference")
        for g, x in zip(grads, before):
            if g is not None:
                assert_close_to_float64(g, x)
    assert len(count_checks) == 1
    grads[1] = make_grad((4,), seed=4)  # a None became a tensor: checked again
    znorm_kernels.znorm_(grads, backend="reference")
    assert len(count_checks) == 2


def test_calls_with_the_same_tensors_of_one_dtype_are_checked_once(count_checks):
    # One dtype takes the fast path's single-group branch, whose record the cache keeps.
    grads = [make_grad((20, 3), seed=1), make_grad((9,), seed=3), make_grad((4, 4), seed=5)]
    for _ in range(3):
        znorm_kernels.znorm_(grads, backend="reference")
    assert len(count_checks) == 1


def test_plain_tensors_parameters_and_none_take_the_fast_path(monkeypatch):
    # The exact path is for what the fast one cannot decide; a list of plain tensors, parameters and None in
    # disjoint memory is the common case and must not pay for it.
    calls = count_calls(monkeypatch, validation, "_exact_groups")
    items = [
        nn.Parameter(make_grad((6,), seed=1)),
        None,
        make_grad((5,), seed=2),
        make_grad((3,), torch.float64),
    ]
    groups = validation.check_and_group(items, None, "znorm_")
    assert groups == {(torch.device("cpu"), torch.float32): [0, 2], (torch.device("cpu"), torch.float64): [3]}
    assert calls == []


def test_a_new_view_at_a_known_address_is_checked_again(count_checks):
    a = make_grad((64,))
    znorm_kernels.znorm_([a[:10], a[20:30]], backend="reference")
    for _ in range(3):  # fresh view objects (their ids may repeat the dead ones'): each call checks them
        with pytest.raises(ValueError, match=r"position 0.*position 1"):
            znorm_kernels.znorm_([a[:25], a[20:30]], backend="reference")
    assert len(count_checks) == 4


def test_a_new_view_with_the_old_ones_address_and_size_is_checked_again(count_checks):
    # The old views stay alive, so their cache entry does too: a new object at the same address, with the
    # same dtype and size but other strides, must not inherit their result (it overlaps where they did not).
    a = make_grad((64,))
    first, second = a[12:22], a[0:10]
    znorm_kernels.znorm_([first, second], backend="reference")
    before = a.clone()
    with pytest.raises(ValueError, match=r"position 0.*position 1"):
        znorm_kernels.znorm_([first, a[0:20:2]], backend="reference")
    assert torch.equal(a, before)
    assert len(count_checks) == 2


def test_in_place_changes_of_a_known_tensor_are_seen(count_checks):
    a = make_grad((64,))
    x, y = a[:10], a[20:30]
    znorm_kernels.znorm_([x, y], backend="reference")
    x.resize_(25)  # same object, same address, now reaching into y
    with pytest.raises(ValueError, match="share part of their memory"):
        znorm_kernels.znorm_([x, y], backend="reference")
    u, v = make_grad((8,), seed=1), make_grad((8,), seed=2)
    znorm_kernels.znorm_([u, v], backend="reference")
    u.data = u.data.view(torch.int32)  # same object, same address, another dtype
    with pytest.raises(TypeError, match=r"dtype torch\.int32"):
        znorm_kernels.znorm_([u, v], backend="reference")


def test_the_cache_holds_no_tensor_and_forgets_dead_ones(count_checks):
    grads = [make_grad((30,), seed=1), make_grad((30,), seed=2)]
    znorm_kernels.znorm_(grads, backend="reference")
    assert len(recent_checks.entries) == 1
    ref = __import__("weakref").ref(grads[1])
    del grads
    gc.collect()
    assert ref() is None, "the cache keeps no tensor alive"
    assert len(recent_checks.entries) == 0, "an entry goes when one of its tensors dies"


def test_rejected_lists_are_not_cached(count_checks):
    bad = [make_grad((5,)), torch.randn(4, dtype=torch.complex64)]
    for _ in range(2):
        with pytest.raises(TypeError, match="complex"):
            znorm_kernels.znorm_(bad)
    assert len(count_checks) == 2


def _net_with_unused_parts() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"used": nn.Linear(6, 5), "head": nn.Linear(5, 3), "unused": nn.Linear(4, 4)})


def _loss(net: nn.ModuleDict, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g)
    return net["head"](torch.relu(net["used"](x))).square().mean()


@pytest.fixture
def full_checks(monkeypatch):
    """The calls of the full checks (``dispatch.collect_indices``) a test makes, counted."""
    return count_calls(monkeypatch, dispatch, "collect_indices")


def _hook_on_moving_grads(buf, second, moves):
    """An SGD hook over a 4x4 and a ``second``-element parameter whose gradients are views of ``buf`` at the
    offsets ``moves`` gives, one step each, every step checked against the reference; (params, opt)."""
    params = [nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(second))]
    opt = torch.optim.SGD(params, lr=0.0)
    znorm_kernels.register(opt)
    for a, b in moves:
        params[0].grad = buf[a : a + 16].view(4, 4)
        params[1].grad = buf[b : b + second]
        expected = [reference_z(p.grad) for p in params]
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=0)
    return params, opt


@pytest.mark.parametrize("set_to_none", [False, True])
def test_hook_with_none_gradients_is_cached_and_rechecked_on_change(full_checks, set_to_none):
    calls = full_checks
    net = _net_with_unused_parts()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    znorm_kernels.register(opt)

    def step(seed: int) -> None:
        opt.zero_grad(set_to_none=set_to_none)
        _loss(net, seed).backward()
        expected = {n: reference_z(p.grad) for n, p in net.named_parameters()}
        opt.step()
        for n, p in net.named_parameters():
            if expected[n] is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0)

    for seed in range(3):
        step(seed)
    assert net["unused"].weight.grad is None
    if not set_to_none:
        assert len(calls) == 1, "unchanged gradients, some None: checked once"
    # A gradient appears where there was None: checked again, and normalized.
    unused = net["unused"].weight
    step_calls = len(calls)
    opt.zero_grad(set_to_none=set_to_none)
    _loss(net, 9).backward()
    unused.grad = make_grad((4, 4), seed=5)
    expected_unused = reference_z(unused.grad)
    opt.step()
    assert len(calls) == step_calls + 1
    torch.testing.assert_close(unused.grad, expected_unused, atol=1e-6, rtol=0)
    # It disappears again: checked again. A gradient that moves, with the same layout, is checked for
    # overlaps on its new address alone (the full checks' other findings still hold).
    unused.grad = None
    opt.step()
    assert len(calls) == step_calls + 2
    head = net["head"].weight
    head.grad = head.grad.clone()
    expected_head = reference_z(head.grad)
    opt.step()
    assert len(calls) == step_calls + 2
    torch.testing.assert_close(head.grad, expected_head, atol=1e-6, rtol=0)
    # A sparse gradient where there was None is rejected, naming it.
    unused.grad = make_grad((4, 4)).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def reference_z(g: torch.Tensor | None) -> torch.Tensor | None:
    if g is None:
        return None
    out = g.clone()
    reference.znorm_tensor_(out)
    return out


def test_hook_cached_path_with_none_and_several_groups_matches_reference():
    """float32 and float64 parameters, some gradients None, a 1-element parameter: several groups whose
    positions among the present gradients differ from their positions in the list."""
    torch.manual_seed(0)
    params = [
        nn.Parameter(torch.randn(5, 3)),
        nn.Parameter(torch.randn(4, dtype=torch.float64)),
        nn.Parameter(torch.randn(1)),
        nn.Parameter(torch.randn(6)),
        nn.Parameter(torch.randn(2, 2, dtype=torch.float64)),
        nn.Parameter(torch.randn(7)),
    ]
    opt = torch.optim.SGD(params, lr=0.0)
    znorm_kernels.register(opt)
    for seed in range(3):
        for i, p in enumerate(params):
            p.grad = None if i in (0, 3) and seed < 2 else make_grad(tuple(p.shape), p.dtype, seed=seed + i)
        expected = [reference_z(p.grad) for p in params]
        opt.step()
        for p, e in zip(params, expected):
            if e is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=0)


# --- The hook on the training path: new gradient objects every step (zero_grad(set_to_none=True)). ---
# Each case assigns, after a step that filled the hook's cache, new gradient objects that differ from the
# cached ones in one thing the checks read; the hook must then do exactly what a call without any cache does
# (the same error, or the same bytes in the memory behind the gradients).


def _base(buf):
    return {"w": buf[0:16].view(4, 4), "b": buf[32:48]}


def _retyped(params, buf):  # a parameter's .data replaced by another dtype, its gradient at the old address
    params["w"].data = params["w"].data.double()
    return {"w": buf.view(torch.float64)[0:16].view(4, 4), "b": buf[32:48]}


def _resized(params, buf):  # a parameter's .data replaced by a larger one, its gradient at the old address
    params["b"].data = torch.zeros(24, device=buf.device)
    return {"w": buf[0:16].view(4, 4), "b": buf[32:56]}


_TRAINING_CASES = {
    "same layout": lambda params, buf: _base(buf),
    "transposed at the same address": lambda params, buf: {"w": buf[0:16].view(4, 4).t(), "b": buf[32:48]},
    "non-dense view at the same address": lambda params, buf: {
        "w": buf[0:32].view(4, 8)[:, :4],
        "b": buf[32:48],
    },
    "view at the same address overlapping another": lambda params, buf: {
        "w": buf[0:64].view(4, 16)[:, :4],
        "b": buf[32:48],
    },
    "expanded at the same address": lambda params, buf: {"w": buf[0:4].expand(4, 4), "b": buf[32:48]},
    "another dtype at the same address": _retyped,
    "another size at the same address": _resized,
    "moved": lambda params, buf: {"w": buf[0:16].view(4, 4), "b": buf[64:80]},
    "moved onto the other": lambda params, buf: {"w": buf[0:16].view(4, 4), "b": buf[8:24]},
    "moved to the same memory as the other": lambda params, buf: {"w": buf[0:16].view(4, 4), "b": buf[0:16]},
    "both moved, still apart": lambda params, buf: {"w": buf[64:80].view(4, 4), "b": buf[16:32]},
    "None appearing": lambda params, buf: {"w": buf[0:16].view(4, 4), "b": None},
    "sparse": lambda params, buf: {"w": buf[0:16].view(4, 4), "b": buf[32:48].to_sparse()},
    "requires grad": lambda params, buf: {"w": buf[0:16].view(4, 4), "b": buf[32:48].requires_grad_()},
    "negative view at the same address": lambda params, buf: {
        "w": buf[0:16].view(4, 4),
        "b": buf[32:48]._neg_view(),
    },
}


def _training_outcome(backend: str, case, cached: bool, base=_base):
    """(error type or "ok", the memory afterwards) for a step on ``case``'s gradients, after a step on the
    base gradients when ``cached`` (the hook's cache filled), else by a call with no cache at all."""
    # Triton serves CUDA tensors, and CPU ones only under its interpreter (a CPU-only machine).
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # room for float64 views of the first 16 elements
    buf = torch.randn(96, dtype=torch.float64).float().to(device)
    params = {
        "w": nn.Parameter(torch.zeros(4, 4, device=device)),
        "b": nn.Parameter(torch.zeros(16, device=device)),
    }
    opt = torch.optim.SGD(list(params.values()), lr=0.0)
    if cached:
        znorm_kernels.register(opt, backend=backend)
        for name, g in base(buf).items():
            params[name].grad = g.detach()
        opt.step()
    buf.copy_(torch.randn(96, dtype=torch.float64).float())
    grads = case(params, buf)
    for name, g in grads.items():
        params[name].grad = None if g is None else g.detach().requires_grad_(g.requires_grad)
    try:
        if cached:
            opt.step()
        else:
            recent_checks.clear()
            znorm_kernels.znorm_([p.grad for p in params.values()], backend=backend)
    except (TypeError, ValueError) as err:
        return type(err).__name__, buf
    return "ok", buf


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("case", list(_TRAINING_CASES))
def test_hook_on_new_gradient_objects_does_what_the_full_checks_do(backend, case):
    if backend not in znorm_kernels.available_backends():
        pytest.skip(f"{backend} unavailable")
    fn = _TRAINING_CASES[case]
    got, got_mem = _training_outcome(backend, fn, cached=True)
    expected, expected_mem = _training_outcome(backend, fn, cached=False)
    assert got == expected
    assert torch.equal(got_mem.view(torch.int32), expected_mem.view(torch.int32)), "the same bytes"


def test_hook_on_new_gradient_objects_reuses_the_checks(full_checks):
    """New objects at the same addresses, or moved with the same layouts, take no full check; the
    normalized values are the reference's."""
    _hook_on_moving_grads(torch.randn(200), 16, [(0, 32), (0, 32), (64, 96), (0, 32), (128, 160)])
    assert len(full_checks) == 1


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
def test_hook_after_a_duplicate_rechecks_a_move(backend):
    """The cached step had the same memory twice (normalized once): when one of them moves away, both are
    normalized, as the full checks decide."""
    if backend not in znorm_kernels.available_backends():
        pytest.skip(f"{backend} unavailable")

    def twice(buf):
        return {"w": buf[0:16].view(4, 4), "b": buf[0:16]}

    def apart(params, buf):
        return {"w": buf[0:16].view(4, 4), "b": buf[32:48]}

    got = _training_outcome(backend, apart, cached=True, base=twice)
    expected = _training_outcome(backend, apart, cached=False)
    assert got[0] == expected[0] == "ok"
    assert torch.equal(got[1], expected[1])


def test_a_fresh_cache_keeps_what_it_is_given_and_evicts_the_oldest():
    from znorm_kernels.check_cache import RecentChecks

    cache = RecentChecks()
    lists = [
        [make_grad((5,), seed=i), None, make_grad((3,), seed=i + 50)] for i in range(RecentChecks.SIZE + 1)
    ]
    groups = {("cpu", torch.float32): [0, 2]}
    for items in lists:
        assert cache.get(items) is None
        cache.put(items, groups)
    assert cache.get(lists[0]) is None, "the oldest entry is evicted past SIZE"
    for items in lists[1:]:
        got = cache.get(items)
        assert (
            got == groups
            and got is not groups
            and got[("cpu", torch.float32)] is not groups[("cpu", torch.float32)]
        )
    moved = [lists[1][0], lists[1][2], None]  # the same tensors, None elsewhere
    assert cache.get(moved) is None
    cache.clear()
    assert cache.get(lists[1]) is None


# --- The hook's cache (step_cache.GradientGroups) beyond the common case. ---


def test_hook_statistics_with_several_groups_and_none_match_float64():
    """track_stats with a float32 group, a float64 group of one tensor, a 1-element gradient and a None
    one: every group gets its own tensors and its own rows, on the full path and on the cached one."""
    params = [
        nn.Parameter(torch.zeros(5, 3)),
        nn.Parameter(torch.zeros(4, dtype=torch.float64)),
        nn.Parameter(torch.zeros(1)),
        nn.Parameter(torch.zeros(6)),
        nn.Parameter(torch.zeros(3)),
    ]
    opt = torch.optim.SGD(params, lr=0.0)
    handle = znorm_kernels.register(opt, track_stats=True)
    for step in range(3):  # 0: full path; 1: same addresses; 2: new gradient objects elsewhere
        if step != 1:
            for i, p in enumerate(params):
                p.grad = None if i == 4 else make_grad(tuple(p.shape), p.dtype, seed=10 * step + i)
        raw = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        stats = handle.grad_stats()
        for i, (p, x) in enumerate(zip(params, raw)):
            mean, std = stats.values[i].tolist()
            if x is None or x.numel() < 2:
                assert p.grad is None or torch.equal(p.grad, x)
                assert math.isnan(mean) and math.isnan(std)
                continue
            assert_close_to_float64(p.grad, x)
            assert mean == pytest.approx(x.double().mean().item(), rel=1e-6)
            assert std == pytest.approx(x.double().std(correction=0).item(), rel=1e-6)
        for i, p in enumerate(params):  # same objects at the same addresses next step
            if step == 0 and p.grad is not None:
                p.grad.copy_(make_grad(tuple(p.shape), p.dtype, seed=100 + i))


class _Binding:
    """A group function that can be bound to its tensors' addresses, as the triton backend's is: it logs
    bind and rebind, and a bound function checks that it only ever runs on tensors at its addresses (a
    bound Triton plan would write to the old ones)."""

    def __init__(self, real, log):
        self.real, self.log = real, log

    def __call__(self, tensors, eps, correction, grad_scale=None, *, stats=None):
        self.log.append("unbound")
        self.real(tensors, eps, correction, grad_scale, stats=stats)

    def bind(self, tensors):
        self.log.append("bind")
        return self._bound(tensors)

    def _bound(self, tensors):
        addrs = [t.data_ptr() for t in tensors]

        def run(ts, eps, correction, grad_scale=None, *, stats=None):
            assert [t.data_ptr() for t in ts] == addrs, "a bound function ran on other addresses"
            self.real(ts, eps, correction, grad_scale, stats=stats)

        def rebind(others, starts=None):
            self.log.append("rebind")
            assert starts is None or list(starts) == [t.data_ptr() for t in others]
            return self._bound(others)

        run.rebind = rebind
        return run


@pytest.mark.parametrize("track_stats", [False, True])
def test_hook_binds_groups_once_and_rebinds_them_when_gradients_move(monkeypatch, track_stats):
    log = []
    real = dispatch.group_fn
    monkeypatch.setattr(dispatch, "group_fn", lambda name: _Binding(real(name), log))
    buf = torch.randn(200)
    params = [nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(16))]
    opt = torch.optim.SGD(params, lr=0.0)
    znorm_kernels.register(opt, track_stats=track_stats)
    for a, b in [(0, 32), (0, 32), (64, 96), (0, 32)]:
        params[0].grad = buf[a : a + 16].view(4, 4)
        params[1].grad = buf[b : b + 16]
        expected = [reference_z(p.grad) for p in params]
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=0)
    assert log == ["bind", "rebind", "rebind"], "bound once, then rebound at each move"


def test_hook_keeps_the_checks_of_two_element_gradients_that_move(full_checks):
    """2 elements is the least ZNorm normalizes: such a gradient moving keeps the cached checks, and it
    moving into another gradient's memory is caught as the full checks catch it."""
    buf = torch.randn(200)
    params, opt = _hook_on_moving_grads(buf, 2, [(8, 40), (64, 96), (8, 40)])
    assert len(full_checks) == 1
    params[1].grad = buf[10:12]  # inside the first gradient's memory
    before = buf.clone()
    with pytest.raises(ValueError, match="share part of their memory"):
        opt.step()
    assert torch.equal(buf, before)
    assert len(full_checks) == 2


def test_lists_only_the_exact_checks_accept_are_cached_too(count_checks):
    """A duplicate (with a None beside it) and interleaved views leave the one-pass check to the exact one:
    what that accepts is kept all the same, and the next call with the same tensors is not checked."""
    g = make_grad((12,), seed=1)
    a = make_grad((40,), seed=2)
    lists = [[g, None, g], [a[::2], a[1::2]]]
    for _ in range(2):
        for items in lists:
            before = [None if t is None else t.clone() for t in items]
            znorm_kernels.znorm_(items, backend="reference")
            for t, x in zip(items[-1:], before[-1:]):
                assert_close_to_float64(t, x)
    assert len(count_checks) == len(lists)


def test_the_cache_answers_by_address_and_layout_not_by_object(count_checks):
    """A hit needs each entry where it was with the same layout (check_cache's guard); which object holds it
    does not matter, except at the later positions of a tensor given twice, which must be that tensor."""
    base = make_grad((6, 4), seed=3)
    other = make_grad((10,), seed=4)
    cases = [
        (other[:], True),  # a fresh view of the same elements
        (other.view(torch.int32).view(torch.float32), True),  # the same, through another dtype
        (other[:9], False),  # another size
        (other.view(2, 5), False),  # another shape
        (other[1:], False),  # another address
        (other.double(), False),  # another tensor altogether
    ]
    for changed, hit in cases:
        znorm_kernels.znorm_([base, other], backend="reference")  # the entry for this first tensor
        before = len(count_checks)
        znorm_kernels.znorm_([base, changed], backend="reference")
        assert len(count_checks) == before + (not hit), (tuple(changed.shape), changed.dtype, hit)
    # The same address, dtype and shape with other strides misses.
    square = make_grad((4, 4), seed=5)
    znorm_kernels.znorm_([base, square], backend="reference")
    before = len(count_checks)
    znorm_kernels.znorm_([base, square.t()], backend="reference")
    assert len(count_checks) == before + 1
    # The same tensor twice is kept once; a distinct view of it at the later position is another list
    # (two entries over the same memory) and is checked again.
    twice = [other, None, other]
    znorm_kernels.znorm_(twice, backend="reference")
    before = len(count_checks)
    znorm_kernels.znorm_(twice, backend="reference")
    assert len(count_checks) == before
    znorm_kernels.znorm_([other, None, other[:]], backend="reference")
    assert len(count_checks) == before + 1
    # Beside a tensor given twice, the others are still guarded: one reshaped at its address misses.
    znorm_kernels.znorm_([other, square, other], backend="reference")
    before = len(count_checks)
    znorm_kernels.znorm_([other, square, other], backend="reference")
    assert len(count_checks) == before
    znorm_kernels.znorm_([other, square.view(2, 8), other], backend="reference")
    assert len(count_checks) == before + 1


def test_lists_with_nothing_to_normalize_take_no_cache_slot(count_checks):
    from znorm_kernels.check_cache import RecentChecks

    lists = [[make_grad((5,), seed=i), make_grad((3,), seed=50 + i)] for i in range(RecentChecks.SIZE)]
    for items in lists:
        znorm_kernels.znorm_(items, backend="reference")
    trivial = [[None, None], [torch.tensor([1.5])], [torch.tensor(2.0), None]]
    for items in trivial:
        znorm_kernels.znorm_(items, backend="reference")
    assert len(count_checks) == len(lists) + len(trivial)
    for items in lists:  # still known: nothing was evicted for the trivial lists
        znorm_kernels.znorm_(items, backend="reference")
    assert len(count_checks) == len(lists) + len(trivial)

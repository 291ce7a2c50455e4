"""Gradients that move: a bound Triton group moves its own plan to the new addresses (``triton_plan.rebase``,
a table of T addresses rewritten in stream order), with no new plan, table or allocation, and the same bits
as a launch planned afresh for the new addresses (#24 item 2).

The host logic and the kernel's reading of the addresses run on the CPU under the interpreter; the tests of
streams, graph capture and allocation counts need a GPU and run in `make gpu-check`."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import znorm_kernels
from tests.utils import float64_znorm, make_grad, same_bits

pytestmark = pytest.mark.skipif(
    "triton" not in znorm_kernels.available_backends(), reason="Triton backend not available"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Small tensors, one with several one-tile chunks (above the float32 block of 8192), and a few-element one.
SIZES = (5, 300, 2, 20_000, 1)


@pytest.fixture
def tp(triton_plans):
    """triton_plan with empty caches for the test."""
    return triton_plans


def _grads(sizes, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    return [make_grad((n,), dtype=dtype, device=DEVICE, seed=seed * 100 + i) for i, n in enumerate(sizes)]


def _fresh(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """What an unbound launch planned for these tensors' own addresses makes of copies of them."""
    from znorm_kernels.backends import triton_host

    copies = [t.clone() for t in tensors]
    triton_host.znorm_group_(copies, 1e-10, 0.0, None)
    return copies


def test_a_moved_group_keeps_its_plan_and_gets_the_bits_of_a_fresh_one(tp):
    from znorm_kernels.backends import triton_host

    grads = _grads(SIZES, 0)
    bound = triton_host.bind(grads)
    plan = bound.plan
    bound(grads, 1e-10, 0.0, None)
    built = tp.counts.built
    for seed in range(1, 4):
        moved = _grads(SIZES, seed)
        expected = _fresh(moved)
        kept = [g.clone() for g in grads]
        assert bound.rebind(moved) is bound and bound.plan is plan, "the same function and plan, moved"
        assert plan.bases.tolist() == [g.data_ptr() for g in moved]
        bound(moved, 1e-10, 0.0, None)
        assert all(map(same_bits, moved, expected)), "the bits of a plan made for these addresses"
        assert all(map(torch.equal, grads, kept)), "the tensors it moved from are not written"
        grads = moved
    assert tp.counts.built == built + 3, "no plan but the three fresh ones compared with"


def test_a_move_that_changes_alignment_changes_the_specialization(tp):
    from znorm_kernels.backends import triton_host

    grads = _grads(SIZES, 0)
    bound = triton_host.bind(grads)
    bound(grads, 1e-10, 0.0, None)
    plan = bound.plan
    assert plan.aligned
    for aligned in (False, False, True, True):
        moved = _grads(SIZES, 5)
        if not aligned:  # views one element past an aligned start: not 16-byte aligned
            storage = torch.zeros(sum(SIZES) + 64 * len(SIZES), device=DEVICE)
            views, at = [], 1
            for g in moved:
                views.append(storage[at : at + g.numel()])
                views[-1].copy_(g)
                at += g.numel() + 64
            moved = views
        changed = aligned is not plan.aligned
        plan.steady[("marker",)] = None  # stands for prepared launches of the last specialization
        expected = _fresh(moved)
        bound.rebind(moved)(moved, 1e-10, 0.0, None)
        assert plan.aligned is aligned
        assert (("marker",) not in plan.steady) is changed, "prepared launches dropped when it changes"
        plan.steady.pop(("marker",), None)
        assert all(map(same_bits, moved, expected))


@pytest.mark.parametrize("seed", range(4))
def test_any_gradients_may_move_at_any_step(tp, seed):
    """Over steps of a hook, random gradients come back at new addresses (some of them in one shared buffer
    of another layout's block): each step's bits are those of a plan made for that step's addresses, and
    after the first step no plan is built."""
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 3, 17, 300, 8192, 9000]) for _ in range(rng.randint(1, 6))]
    # one or two groups (float32, float64) in any order: the watch moves each by its own positions
    dtypes = [rng.choice([torch.float32, torch.float64]) for _ in sizes]
    params = [nn.Parameter(torch.zeros(n, dtype=d, device=DEVICE)) for n, d in zip(sizes, dtypes)]
    opt = torch.optim.SGD(params, lr=0.0)
    znorm_kernels.register(opt, backend="triton")
    built = None
    for step in range(5):
        for i, p in enumerate(params):
            if p.grad is None or rng.random() < 0.5:
                p.grad = make_grad(p.shape, dtype=p.dtype, device=DEVICE, seed=seed * 1000 + step * 10 + i)
            else:
                p.grad.copy_(
                    make_grad(p.shape, dtype=p.dtype, device=DEVICE, seed=seed * 1000 + step * 10 + i)
                )
        expected = [float64_znorm(p.grad) for p in params]
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad.double(), e, atol=1e-5, rtol=0)
        if built is None:
            built = tp.counts.built
    assert tp.counts.built == built, "moves rebase the hook's plan, no new one"


@pytest.mark.parametrize("failing", [1, 2])
def test_a_move_that_fails_part_way_is_never_reused(tp, monkeypatch, failing):
    """Two groups (float32, float64) move; moving the ``failing``-th raises (the other may have moved). Next
    the gradients come back at the old addresses: they are normalized there, and the memory of the failed
    move's gradients is not written (the Python path's cache, as the hook with track_stats takes)."""
    from znorm_kernels.backends import triton_host
    from znorm_kernels.step_cache import GradientGroups

    groups = GradientGroups(1e-10, 0.0, "triton")
    names = ["a", "b"]

    def grads(seed):
        return [
            make_grad((300,), device=DEVICE, seed=seed),
            make_grad((300,), dtype=torch.float64, seed=seed + 1),
        ]

    old = grads(0)
    groups.znorm_(old, names, None)
    new = grads(10)
    real, calls = triton_host.rebase, []

    def flaky(plan, addrs):
        calls.append(1)
        if len(calls) == failing:
            raise RuntimeError("pinned memory exhausted")
        real(plan, addrs)

    monkeypatch.setattr(triton_host, "rebase", flaky)
    with pytest.raises(RuntimeError, match="pinned memory exhausted"):
        groups.znorm_(new, names, None)
    monkeypatch.setattr(triton_host, "rebase", real)
    for t, s in zip(old, grads(20)):
        t.copy_(s)
    expected = [float64_znorm(t) for t in old]
    new_before = [t.clone() for t in new]
    groups.znorm_(old, names, None)
    assert all(map(torch.equal, new, new_before)), "the failed move's gradients are not written"
    for t, e in zip(old, expected):
        torch.testing.assert_close(t.double(), e, atol=1e-5, rtol=0)


def test_the_plans_looked_up_by_address_are_never_moved(tp):
    # plan_for's cached plans serve any caller with tensors at those addresses: a bound group's move must
    # not rewrite them.
    from znorm_kernels.backends import triton_host

    grads = _grads(SIZES, 0)
    triton_host.znorm_group_(grads, 1e-10, 0.0, None)
    (cached,) = tp.plans.values()
    before = cached.bases.clone()
    bound = triton_host.bind(grads)
    assert bound.plan is not cached
    bound.rebind(_grads(SIZES, 1))
    assert torch.equal(cached.bases, before)


# --- on a GPU ---


def _allocations() -> tuple:
    """Device allocations so far, and the pinned host allocator's hand-outs (its counters' names vary with
    the torch version: those it has)."""
    host = torch.cuda.host_memory_stats()
    keys = sorted(
        k for k in host if k.endswith(".allocated") and k.split(".")[0] in ("allocations", "active_requests")
    )
    return torch.cuda.memory_stats()["allocation.all.allocated"], tuple(host[k] for k in keys)


@needs_cuda
def test_on_cuda_moved_gradients_allocate_nothing(tp):
    """The hook's steps over gradients that move every step allocate nothing, on the device or in pinned
    memory, once the first moves have made the plan's two staging buffers."""
    sizes = (5, 300, 20_000, 3)
    params = [nn.Parameter(torch.zeros(n, device="cuda")) for n in sizes]
    opt = torch.optim.SGD(params, lr=0.0)
    znorm_kernels.register(opt, backend="triton")
    sets = [[make_grad((n,), device="cuda", seed=10 * k + i) for i, n in enumerate(sizes)] for k in range(8)]
    values = [[g.clone() for g in s] for s in sets]
    for k in range(3):  # the plan, its prepared launch, its staging buffers
        for p, g in zip(params, sets[k]):
            p.grad = g
        opt.step()
    torch.cuda.synchronize()
    built, before = tp.counts.built, _allocations()
    for k in range(3, 8):
        for p, g in zip(params, sets[k]):
            p.grad = g
        opt.step()
    torch.cuda.synchronize()
    assert _allocations() == before, "nothing allocated by moved steps"
    assert tp.counts.built == built
    for k in range(3, 8):
        for g, v in zip(sets[k], values[k]):
            torch.testing.assert_close(g.double(), float64_znorm(v), atol=1e-5, rtol=0)


@needs_cuda
def test_on_cuda_a_move_on_another_stream_gets_new_addresses_and_keeps_the_old(tp):
    from znorm_kernels.backends import triton_host

    grads = _grads(SIZES, 0)
    bound = triton_host.bind(grads)
    plan = bound.plan
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        bound(grads, 1e-10, 0.0, None)
    torch.cuda.current_stream().wait_stream(side)
    old_bases, old_values = plan.bases, plan.bases.clone()
    moved = _grads(SIZES, 1)
    expected = _fresh(moved)
    bound.rebind(moved)(moved, 1e-10, 0.0, None)
    assert plan.bases is not old_bases and torch.equal(old_bases, old_values), (
        "the table another stream's launch may still read is not rewritten"
    )
    assert old_values.tolist() == [g.data_ptr() for g in grads]
    assert all(map(same_bits, moved, expected))


@needs_cuda
def test_on_cuda_a_captured_group_replays_its_own_addresses_after_a_move(tp):
    from znorm_kernels.backends import triton_host

    static = _grads(SIZES, 0)
    bound = triton_host.bind(static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        bound(static, 1e-10, 0.0, None)  # warm-up: compiled, planned
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bound(static, 1e-10, 0.0, None)
    moved = _grads(SIZES, 1)
    expected_moved = _fresh(moved)
    bound.rebind(moved)(moved, 1e-10, 0.0, None)
    assert all(map(same_bits, moved, expected_moved))
    fill = _grads(SIZES, 2)
    for s, f in zip(static, fill):
        s.copy_(f)
    expected_static = _fresh(static)
    kept = [m.clone() for m in moved]
    graph.replay()
    torch.cuda.synchronize()
    assert all(map(same_bits, static, expected_static)), "the graph still reads its own addresses"
    assert all(map(torch.equal, moved, kept)), "and never the moved ones"

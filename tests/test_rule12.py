"""Rule 12: safe wherever PyTorch code runs: tensors on any CUDA device, calls on several streams, calls
inside CUDA-graph capture; and the Triton host's accesses (aligned specialization) and its debug switch.

The host logic runs on the CPU with fakes (devices, streams) and the interpreter; the GPU tests skip here and
run in `make gpu-check`."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import znorm_kernels
from tests.utils import assert_close_to_float64, make_grad
from znorm_kernels import reference
from znorm_kernels.backends import triton_queue
from znorm_kernels.backends.tiles import Tiles
from znorm_kernels.backends.triton_grid import occupancy

HAS_TRITON = "triton" in znorm_kernels.available_backends()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton backend not available")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return ["triton", "cuda"]  # skipped below anyway; named so the ids stay the same everywhere
    return [b for b in ("triton", "cuda") if b in znorm_kernels.available_backends()]


@pytest.fixture
def tp(triton_plans):
    """triton_plan, with empty caches for the test (put back after)."""
    return triton_plans


@pytest.fixture
def tb(tp):
    from znorm_kernels.backends import triton_host

    return triton_host


def expected_of(grads):
    out = [g.clone() for g in grads]
    reference.znorm_(out)
    return out


# --- the Triton host's logic, on the CPU ---


@needs_triton
def test_rule12_launch_runs_under_the_tensors_device(tb, monkeypatch):
    current = {"index": 0}
    entered = []

    @contextlib.contextmanager
    def fake_device(index):
        entered.append(index)
        before, current["index"] = current["index"], index
        try:
            yield
        finally:
            current["index"] = before

    from znorm_kernels.backends import triton_common

    monkeypatch.setattr(triton_common, "_current_device", lambda: current["index"])
    monkeypatch.setattr(triton_common, "_device_context", fake_device)

    def seen():  # the device a launch would run on
        return current["index"]

    assert triton_common.on_device(torch.device("cuda", 1), seen) == 1
    assert entered == [1] and current["index"] == 0, "the caller's device is restored"
    assert triton_common.on_device(torch.device("cuda", 0), seen) == 0
    assert entered == [1], "no switch when the tensors' device is already current"
    assert triton_common.on_device(torch.device("cpu"), seen) == 0 and entered == [1]


@needs_triton
def test_rule12_each_stream_has_its_own_workspace(tb, tp, monkeypatch):
    grads = [make_grad((n,), device=DEVICE, seed=n) for n in (5, 300, 70)]
    inputs = [g.clone() for g in grads]
    if DEVICE == "cuda":
        # Real streams: the kernel is launched on the handle the host reads (a made-up handle would reach
        # the driver through the direct launch and crash the process: seen on an H100).
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        ids = [s.cuda_stream for s in streams]

        @contextlib.contextmanager
        def on(i: int):
            streams[i].wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(streams[i]):
                yield
            torch.cuda.current_stream().wait_stream(streams[i])

    else:  # no streams on the CPU: made-up handles (the interpreter ignores them)
        ids, current = [11, 22], {"id": 11}
        monkeypatch.setattr(triton_queue, "stream_of", lambda device: current["id"])

        def on(i: int):
            current["id"] = ids[i]
            return contextlib.nullcontext()

    with on(0):
        tb.znorm_group_(grads, 1e-10, 0, None, tiles=Tiles(64))
        first = [g.clone() for g in grads]
        for g, x in zip(grads, inputs):
            g.copy_(x)
    with on(1):
        tb.znorm_group_(grads, 1e-10, 0, None, tiles=Tiles(64))
    (plan,) = tp.plans.values()
    assert sorted(plan.workspaces) == sorted(ids), "one plan (one table), one workspace per stream"
    a, b = plan.workspaces[ids[0]], plan.workspaces[ids[1]]
    assert a.counters.data_ptr() != b.counters.data_ptr() and a.partials.data_ptr() != b.partials.data_ptr()
    assert int(a.counters.abs().sum()) == int(b.counters.abs().sum()) == 0
    for x, y in zip(first, grads):
        assert torch.equal(x, y), "the same bits on every stream"


def _interrupted(monkeypatch, call) -> None:
    """Run ``call``, which must raise, with the kernel replaced by a launch stopped half-way (its counters
    left non-zero, then KeyboardInterrupt); the real kernel is put back."""
    from znorm_kernels.backends import triton_kernels

    class Interrupted:  # a launch stopped half-way: its counters are left non-zero
        def __getitem__(self, grid):
            def run(meta, bases, partials, stats, counters, *args, **kwargs):
                counters[0] = 3
                raise KeyboardInterrupt

            return run

    real = triton_kernels.znorm_queue_kernel
    monkeypatch.setattr(triton_kernels, "znorm_queue_kernel", Interrupted())
    with pytest.raises(KeyboardInterrupt):
        call()
    monkeypatch.setattr(triton_kernels, "znorm_queue_kernel", real)


@needs_triton
def test_rule12_a_launch_that_fails_drops_its_workspace(tb, tp, monkeypatch):
    grads = [make_grad((n,), device=DEVICE, seed=n) for n in (5, 300)]
    inputs = [g.clone() for g in grads]
    tb.znorm_group_(grads, 1e-10, 0, None, tiles=Tiles(64))
    (plan,) = tp.plans.values()
    (stale,) = plan.workspaces.values()

    _interrupted(monkeypatch, lambda: tb.znorm_group_(grads, 1e-10, 0, None, tiles=Tiles(64)))
    assert plan.workspaces == {}, "a workspace whose launch did not finish is never used again"
    assert int(stale.counters[0]) == 3
    for g, x in zip(grads, inputs):
        g.copy_(x)
    tb.znorm_group_(grads, 1e-10, 0, None, tiles=Tiles(64))
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x)


@needs_triton
def test_rule12_plans_of_the_same_sizes_share_a_workspace_until_a_launch_fails(tb, tp, monkeypatch):
    # Gradients that moved get a new plan (table) but reuse the workspace of the same sizes on that stream;
    # after a launch that did not finish, no plan uses that workspace again.
    buf = make_grad((1000,), device=DEVICE, seed=3)
    first, second = [buf[0:5], buf[64:364]], [buf[400:405], buf[512:812]]
    inputs = [[t.clone() for t in ts] for ts in (first, second)]
    tb.znorm_group_(first, 1e-10, 0, None, tiles=Tiles(64))
    tb.znorm_group_(second, 1e-10, 0, None, tiles=Tiles(64))
    plans = list(tp.plans.values())
    assert len(plans) == 2 and len(tp.workspace_pool) == 1
    assert plans[0].workspaces == plans[1].workspaces
    for ts, xs in zip((first, second), inputs):
        for t, x in zip(ts, xs):
            assert_close_to_float64(t, x)
    (shared,) = plans[0].workspaces.values()

    _interrupted(monkeypatch, lambda: tb.znorm_group_(first, 1e-10, 0, None, tiles=Tiles(64)))
    assert shared.dropped and plans[0].workspaces == {}
    for t, x in zip(second, inputs[1]):
        t.copy_(x)
    tb.znorm_group_(
        second, 1e-10, 0, None, tiles=Tiles(64)
    )  # the other plan: a fresh workspace, a correct result
    (fresh,) = plans[1].workspaces.values()
    assert fresh is not shared and int(fresh.counters.abs().sum()) == 0
    for t, x in zip(second, inputs[1]):
        assert_close_to_float64(t, x)


@needs_triton
def test_rule12_spin_limit_turns_an_endless_wait_into_an_error(tb, tp, monkeypatch):
    # Counters left non-zero (as by two unordered launches sharing a workspace) make the queue skip a
    # statistics ticket; the normalize items of that tensor would then wait for ever. The debug switch turns
    # the wait into a RuntimeError naming the tensor, which is left unchanged; the workspace is reset.
    monkeypatch.setattr(triton_queue, "_spin_limit", 0)
    grads = [make_grad((n,), device=DEVICE, seed=n) for n in (200, 5)]
    inputs = [g.clone() for g in grads]
    tb.znorm_group_(grads, 1e-10, 0, None, tiles=Tiles(64))
    (plan,) = tp.plans.values()
    (ws,) = plan.workspaces.values()
    for g, x in zip(grads, inputs):
        g.copy_(x)
    ws.counters[0] = 1  # the first statistics chunk of tensor 0 is skipped
    tb.set_spin_limit(20)
    with pytest.raises(RuntimeError, match=r"20 polls .* tensor 0 of its group"):
        tb.znorm_group_(grads, 1e-10, 0, None, tiles=Tiles(64))
    assert torch.equal(grads[0], inputs[0]), "the tensor whose statistics never came is left unchanged"
    assert_close_to_float64(grads[1], inputs[1])
    assert int(ws.counters.abs().sum()) == 0
    grads[1].copy_(inputs[1])
    tb.znorm_group_(
        grads, 1e-10, 0, None, tiles=Tiles(64)
    )  # with the limit still set: no error, right results
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x)


@needs_triton
@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_set_spin_limit_rejects_bad_values(tb, bad):
    with pytest.raises(ValueError, match="polls must be an int >= 0"):
        tb.set_spin_limit(bad)


@needs_triton
def test_spin_limit_is_read_from_the_environment():
    import os
    import subprocess
    import sys

    code = "from znorm_kernels.backends import triton_queue as t; print(t._spin_limit)"
    env = {**os.environ, "ZNORM_SPIN_LIMIT": "1234"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1234"


@needs_triton
def test_occupancy_from_the_compiled_kernel(tb):
    h100 = SimpleNamespace(
        regs_per_multiprocessor=65536,
        max_threads_per_multi_processor=2048,
        shared_memory_per_multiprocessor=233472,
    )
    assert occupancy(128, 0, 8, h100) == 2
    assert occupancy(126, 0, 8, h100) == 2
    assert occupancy(129, 0, 8, h100) == 1, "one register past 128 halves the programs per SM"
    assert occupancy(64, 0, 8, h100) == 4
    assert occupancy(32, 0, 8, h100) == 8, "threads: 2048 per SM at 256 per program"
    assert occupancy(32, 100_000, 8, h100) == 2, "shared memory"
    assert occupancy(255, 0, 16, h100) == 1, "never below one"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_aligned_and_unaligned_groups_give_the_same_bits(tb, tp, dtype):
    # The aligned specialization loads full tiles unmasked and tails whose length is a multiple of the vector
    # width with a per-vector mask; other tails and unaligned groups take element-wise accesses. Every path
    # must give the same bits.
    block = 64
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    sizes = [3 * block, 2 * block + vec, 2 * block + vec + 1, block, vec, vec + 1, 2]
    storage = torch.empty(sum(sizes) + len(sizes) * 64 + 1, dtype=dtype, device=DEVICE)
    aligned, unaligned, at = [], [], 0
    for i, n in enumerate(sizes):
        x = make_grad((n,), dtype=dtype, device=DEVICE, seed=i)
        aligned.append(x.clone())
        view = storage[at + 1 : at + 1 + n]  # one element past an aligned start: not 16-byte aligned
        view.copy_(x)
        unaligned.append(view)
        at += n + 64
    inputs = [x.clone() for x in aligned]
    tb.znorm_group_(aligned, 1e-10, 0, None, tiles=Tiles(block))
    tb.znorm_group_(unaligned, 1e-10, 0, None, tiles=Tiles(block))
    flags = sorted(p.aligned for p in tp.plans.values())
    assert flags == [False, True]
    for a, u, x in zip(aligned, unaligned, inputs):
        assert torch.equal(a, u)
        assert_close_to_float64(a, x)


# --- on a GPU ---


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", gpu_backends())
def test_rule12_tensors_on_a_device_that_is_not_current(backend):
    grads = [make_grad((n,), device="cuda:1", seed=n) for n in (7, 5000, 70_000)]
    expected = expected_of(grads)
    with torch.cuda.device(0):
        znorm_kernels.znorm_(grads, backend=backend)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=2e-6, rtol=0)


@needs_cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_rule12_calls_on_several_streams(backend):
    sizes = (7, 5000, 70_000, 2_000_000)
    lists = [[make_grad((n,), device="cuda", seed=10 * k + n) for n in sizes] for k in range(2)]
    inputs = [[g.clone() for g in grads] for grads in lists]
    expected = [expected_of(grads) for grads in lists]
    streams = [torch.cuda.Stream() for _ in lists]
    torch.cuda.synchronize()
    for _ in range(20):  # two lists on two streams at once, and the same list on alternating streams
        for grads, x, s in zip(lists, inputs, streams):
            with torch.cuda.stream(s):
                for g, v in zip(grads, x):
                    g.copy_(v)
                znorm_kernels.znorm_(grads, backend=backend)
        streams.reverse()
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        for grads, e in zip(lists, expected):
            for g, v in zip(grads, e):
                torch.testing.assert_close(g, v, atol=2e-6, rtol=0)


@needs_cuda
@pytest.mark.parametrize("warm", [True, False], ids=["warmed-up", "first-call-in-capture"])
@pytest.mark.parametrize("backend", gpu_backends())
def test_rule12_captured_call_replays_correctly(backend, warm):
    sizes = (7, 5000, 70_000, 2_000_000)
    grads = [make_grad((n,), device="cuda", seed=n) for n in sizes]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    if warm:
        with torch.cuda.stream(side):
            for _ in range(3):
                znorm_kernels.znorm_(grads, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        znorm_kernels.znorm_(grads, backend=backend)
    for step in range(5):
        fresh = [make_grad((n,), device="cuda", seed=100 * step + n) * (step + 1) + step for n in sizes]
        for g, f in zip(grads, fresh):
            g.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        for g, e in zip(grads, expected_of(fresh)):
            torch.testing.assert_close(g, e, atol=2e-6, rtol=0)


@needs_cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_rule12_hook_inside_a_captured_training_step(backend):
    # A whole step (forward, backward, the ZNorm hook, SGD with momentum) captured once and replayed on new
    # batches, against the same steps run eagerly with the reference hook.
    from torch import nn

    def make(backend):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        znorm_kernels.register(opt, backend=backend)
        return net, opt

    def step(net, opt, x, y):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    data = [
        (torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")) for _ in range(8)
    ]
    net, opt = make(backend)
    ref, ref_opt = make("reference")
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: momentum buffers exist before capture
        for x, y in data[:3]:
            step(net, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:3]:
        step(ref, ref_opt, x, y)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):  # the gradients are new tensors here: the plan is built in capture
        nn.functional.cross_entropy(net(static_x), static_y).backward()
        opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):  # capture ran nothing
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        step(ref, ref_opt, x, y)
    torch.cuda.synchronize()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_rule12_compiled_with_cuda_graphs(backend):
    # torch.compile(mode="reduce-overhead") records the step into CUDA graphs (after warm-up runs) and replays
    # them: each replay must normalize the values the inputs hold then.
    torch._dynamo.reset()
    sizes = (7, 5000, 70_000)
    grads = [make_grad((n,), device="cuda", seed=n) for n in sizes]

    @torch.compile(mode="reduce-overhead")
    def step(grads):
        znorm_kernels.znorm_(grads, backend=backend)
        return grads[0].sum()

    try:
        for k in range(6):
            fresh = [make_grad((n,), device="cuda", seed=7 * k + n) * (k + 1) for n in sizes]
            for g, f in zip(grads, fresh):
                g.copy_(f)
            step(grads)
            torch.cuda.synchronize()
            for g, e in zip(grads, expected_of(fresh)):
                torch.testing.assert_close(g, e, atol=2e-6, rtol=0)
    finally:
        torch._dynamo.reset()

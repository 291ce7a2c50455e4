"""The hook's native steady path (znorm_kernels.grad_watch, csrc/grad_watch.cpp): the watch's answers, that it
holds no gradient, that the hook takes it and computes the same bits as the Python path, and the Triton
backend's prepared launch (triton_queue.launch_steady) passing what the full launch passes. The hook's
adversarial training cases (tests/test_host_paths.py) run through it for the "cpu" and "triton" backends."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import znorm_kernels
from tests.utils import count_calls, float64_znorm, make_grad
from znorm_kernels import grad_watch, step_cache
from znorm_kernels.backends import native

pytestmark = pytest.mark.skipif(not grad_watch.enabled(), reason=native.BUILD_HINT)

SAME, MOVED, CHANGED = grad_watch.SAME, grad_watch.MOVED, grad_watch.CHANGED


def _device(backend: str = "cpu") -> str:
    """Where a test's tensors live: Triton takes CUDA tensors, and CPU ones only under its interpreter."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _params(shapes, dtype=torch.float32, device="cpu"):
    params = [nn.Parameter(torch.zeros(s, dtype=dtype, device=device)) for s in shapes]
    for i, p in enumerate(params):
        p.grad = make_grad(tuple(p.shape), dtype, device, seed=i)
    return params


def _watch(params, groups=(), moves=True, alone=False):
    watch = grad_watch.new_watch(params)
    present = sum(p.grad is not None for p in params)
    assert watch.record([list(g) for g in groups], [list(range(present))], moves, alone)
    return watch


def test_the_watch_answers_same_for_new_objects_at_the_same_addresses():
    params = _params([(4, 3), (5,), (2, 2, 2)])
    watch = _watch(params)
    assert watch.step(1e-10, 0.0, None) == SAME
    for p in params:
        p.grad = p.grad.detach()  # new objects, same memory and layout
    assert watch.step(1e-10, 0.0, None) == SAME


def test_the_watch_answers_moved_with_the_gradients_in_order_and_keeps_the_new_addresses():
    params = _params([(4, 3), (5,), (7,)])
    params[1].grad = None
    watch = _watch(params)
    for p in (params[0], params[2]):
        p.grad = p.grad.clone()
    assert watch.step(1e-10, 0.0, None) == MOVED
    taken = watch.take()
    assert [t.data_ptr() for t in taken] == [params[0].grad.data_ptr(), params[2].grad.data_ptr()]
    assert watch.take() == [], "taken once"
    assert watch.step(1e-10, 0.0, None) == SAME, "the record follows the move"


def test_moves_are_checked_for_overlap_in_any_order_and_the_addresses_follow():
    # After a move sorted the ranges, later moves that keep their order are checked in one pass: an overlap
    # in that order, or a move into another order, must still be seen. addresses() follows each move the
    # watch accepts and keeps the record's through one it refuses.
    params = _params([(4, 4), (16,), (8,)])
    watch = _watch(params)
    assert watch.addresses().tolist() == [p.grad.data_ptr() for p in params]
    buf = torch.randn(256)

    def move(*offsets):  # each gradient to buf[offset:], 4 bytes an element
        for p, o in zip(params, offsets):
            p.grad = buf[o : o + p.numel()].view(p.shape)
        return watch.step(1e-10, 0.0, None)

    def at(*offsets):
        return [buf.data_ptr() + 4 * o for o in offsets]

    assert move(0, 16, 32) == MOVED  # (the first move sorts)
    assert watch.addresses().tolist() == at(0, 16, 32)
    assert move(64, 80, 96) == MOVED  # the same order: one pass
    assert move(128, 136, 160) == CHANGED  # the same order, the first two overlap
    assert watch.addresses().tolist() == at(64, 80, 96)
    assert move(64, 80, 96) == SAME
    assert move(112, 96, 64) == MOVED  # reversed, disjoint: sorted again
    assert watch.addresses().tolist() == at(112, 96, 64)
    assert move(200, 180, 160) == MOVED  # the new order kept: one pass
    assert move(200, 190, 160) == CHANGED  # that order, the second ends inside the first
    assert move(0, 16, 24) == CHANGED  # the first order again, the last two overlap
    assert move(0, 16, 32) == MOVED and watch.addresses().tolist() == at(0, 16, 32)


@pytest.mark.parametrize(
    "change",
    [
        "None appearing",
        "None disappearing",
        "dtype",
        "transposed",
        "reshaped",
        "requires_grad",
        "negative view",
        "sparse",
        "overlapping move",
        "duplicate move",
    ],
)
def test_the_watch_answers_changed_for_anything_else(change):
    params = _params([(4, 4), (16,), (3,)])
    params[2].grad = None
    watch = _watch(params)
    w, b = params[0], params[1]
    buf = torch.randn(64)
    if change == "None appearing":
        params[2].grad = torch.randn(3)
    elif change == "None disappearing":
        b.grad = None
    elif change == "dtype":
        b.data = b.data.double()
        b.grad = torch.randn(16, dtype=torch.float64)
    elif change == "transposed":
        w.grad = w.grad.t()
    elif change == "reshaped":
        w.data = w.data.view(2, 8)
        w.grad = w.grad.view(2, 8)
    elif change == "requires_grad":
        b.grad = b.grad.detach().requires_grad_()
    elif change == "negative view":
        b.grad = b.grad._neg_view()
    elif change == "sparse":
        w.grad = w.grad.to_sparse()
    elif change == "overlapping move":
        w.grad, b.grad = buf[0:16].view(4, 4), buf[8:24]
    elif change == "duplicate move":
        w.grad, b.grad = buf[0:16].view(4, 4), buf[0:16]
    assert watch.step(1e-10, 0.0, None) == CHANGED
    assert watch.take() == [], "nothing held"


def test_a_watch_that_runs_every_group_runs_them_after_a_move_too():
    params = _params([(6, 5), (40,)])
    watch = _watch(params, groups=[[0, 1]], alone=True)
    for p in params:
        p.grad = p.grad.clone()
    expected = [p.grad.clone() for p in params]
    torch.ops.znorm_kernels_C.znorm_(expected, 1e-10, 0.0, None, None)
    assert watch.step(1e-10, 0.0, None) == SAME
    assert watch.take() == []
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e)
    untouched = params[1].grad.clone()
    params[0].grad = params[0].grad.clone()
    watch = _watch(params, groups=[[0, 1]], alone=False)  # the caller has groups of its own
    params[1].grad = params[1].grad.clone()
    assert watch.step(1e-10, 0.0, None) == MOVED
    assert torch.equal(params[1].grad, untouched), "nothing run: the caller runs every group"
    assert len(watch.take()) == 2


def test_a_watch_whose_last_check_dropped_a_duplicate_takes_no_move():
    params = _params([(8,), (8,)])
    watch = _watch(params, moves=False)
    params[1].grad = params[1].grad.clone()
    assert watch.step(1e-10, 0.0, None) == CHANGED
    params[1].grad = params[1].grad.detach()
    assert watch.step(1e-10, 0.0, None) == CHANGED, "the record still holds the old address"


def test_record_refuses_positions_outside_the_present_gradients():
    params = _params([(3,), (4,)])
    watch = grad_watch.new_watch(params)
    with pytest.raises(RuntimeError, match="position 2 of 2 gradients"):
        watch.record([[0, 2]], [], True, True)
    with pytest.raises(RuntimeError, match="position -1 of 2 gradients"):
        watch.record([], [[-1]], True, True)


def test_the_watch_holds_no_gradient_between_steps():
    params = _params([(64,), (9,)])
    watch = _watch(params, groups=[[0, 1]])
    ref = weakref.ref(params[0].grad)
    assert watch.step(1e-10, 0.0, None) == SAME
    params[0].grad = torch.randn(64)  # made while the old one lives: at another address
    assert ref() is None, "the replaced gradient is freed"
    assert watch.step(1e-10, 0.0, None) == MOVED
    ref = weakref.ref(params[0].grad)
    watch.take()
    params[0].grad = torch.randn(64)
    assert ref() is None, "take() lets go"


def test_the_watch_runs_its_groups_exactly_as_the_op():
    params = _params([(6, 5), (40,), (3,)])
    expected = [p.grad.clone() for p in params]
    scale = torch.tensor(64.0)
    torch.ops.znorm_kernels_C.znorm_(expected[::2], 1e-3, 1.0, scale, None)
    watch = _watch(params, groups=[[0, 2]])
    assert watch.step(1e-3, 1.0, scale) == SAME
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e)
    assert torch.equal(params[1].grad, make_grad((40,), seed=1)), "a group not named is left alone"


def _hook_steps(backend: str, steady: bool, monkeypatch, scale: torch.Tensor | None = None) -> list:
    """The gradients after each of several steps of one hook (new objects, moves, a None appearing and
    disappearing, three dtypes), with the native steady path on or off."""
    monkeypatch.setattr(grad_watch, "_enabled", steady)
    shapes = [(8, 3, 3, 3), (8,), (30, 5), (4,), (1,), (70,)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.float16]
    device = _device(backend)
    params = [nn.Parameter(torch.zeros(s, dtype=d, device=device)) for s, d in zip(shapes, dtypes)]
    opt = torch.optim.SGD(params, lr=0.0)
    groups = count_calls(monkeypatch, step_cache.GradientGroups, "znorm_")
    handle = znorm_kernels.register(opt, backend=backend)
    hook = opt._optimizer_step_pre_hooks[handle.id]
    store = [torch.zeros(2 * p.numel(), dtype=p.dtype, device=device) for p in params]
    out = []
    for step, where in enumerate([0, 0, 0, 1, 1, 0, 0, 1]):
        for i, (p, s) in enumerate(zip(params, store)):
            n = p.numel()
            s[where * n : (where + 1) * n] = make_grad((n,), p.dtype, device, seed=10 * step + i).view(-1)
            p.grad = None if (i == 3 and step in (5, 6)) else s[where * n : (where + 1) * n].view(p.shape)
        opt.grad_scale = scale
        hook(opt, (), {})
        out.append([None if p.grad is None else p.grad.clone() for p in params])
    return out, len(groups)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_hook_takes_the_steady_path_and_computes_the_python_paths_bits(backend, monkeypatch):
    if backend not in znorm_kernels.available_backends():
        pytest.skip(f"{backend} unavailable")
    fast, python_calls_fast = _hook_steps(backend, True, monkeypatch)
    slow, python_calls_slow = _hook_steps(backend, False, monkeypatch)
    for a_step, b_step in zip(fast, slow):
        for a, b in zip(a_step, b_step):
            assert (a is None and b is None) or torch.equal(a, b)
    assert python_calls_slow == 8
    # The Python path: the first step, and the steps where a None appears (5) and disappears (7).
    assert python_calls_fast == 3


def test_the_steady_path_passes_the_grad_scale_of_still_scaled_gradients(monkeypatch):
    monkeypatch.setattr(torch.optim.SGD, "_step_supports_amp_scaling", True, raising=False)
    scale = torch.tensor(1024.0)
    fast, _ = _hook_steps("cpu", True, monkeypatch, scale)
    slow, _ = _hook_steps("cpu", False, monkeypatch, scale)
    unscaled, _ = _hook_steps("cpu", False, monkeypatch, None)
    for a_step, b_step, c_step in zip(fast, slow, unscaled):
        for a, b, c in zip(a_step, b_step, c_step):
            assert (a is None and b is None) or torch.equal(a, b)
            if a is not None and a.numel() >= 2:
                assert not torch.equal(a, c), "the scale reached the kernel"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a scale on the GPU")
def test_the_steady_path_reads_a_gpu_grad_scale_after_its_copy(monkeypatch):
    # Gradients on the CPU, the scale on the GPU behind a long kernel: the watch copies it to the CPU for the
    # op, and a copy that does not wait would hand the op the host buffer's old bytes. Each step's scale
    # differs, so a buffer handed back holding the last step's scale fails too.
    monkeypatch.setattr(torch.optim.SGD, "_step_supports_amp_scaling", True, raising=False)
    params = _params([(64, 64), (300,)])
    given = [p.grad.clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.0)
    python_path = count_calls(monkeypatch, step_cache.GradientGroups, "znorm_")
    handle = znorm_kernels.register(opt, backend="cpu")
    hook = opt._optimizer_step_pre_hooks[handle.id]
    for value in (2.0, 1024.0, 8.0, 65536.0):
        expected = [g.clone() for g in given]
        znorm_kernels.znorm_(expected, backend="cpu", grad_scale=torch.tensor(value))
        for p, g in zip(params, given):
            p.grad.copy_(g)  # the same addresses: after the first step, the watch's call
        torch.cuda._sleep(100_000_000)  # tens of ms of GPU time queued ahead of the scale and its copy
        opt.grad_scale = torch.full((), value, device="cuda")
        hook(opt, (), {})
        for p, e in zip(params, expected):
            assert torch.equal(p.grad, e), value
    assert len(python_path) == 1, "the steps after the first took the native steady path"


def test_no_watch_where_a_group_cannot_run_without_its_tensors(monkeypatch):
    # The reference backend binds nothing; statistics are kept by the Python path.
    for kwargs in ({"backend": "reference"}, {"backend": "cpu", "track_stats": True}):
        params = _params([(5, 4), (9,)])
        opt = torch.optim.SGD(params, lr=0.0)
        groups = count_calls(monkeypatch, step_cache.GradientGroups, "znorm_")
        znorm_kernels.register(opt, **kwargs)
        for _ in range(3):
            opt.step()
        assert len(groups) == 3, kwargs


def test_the_switch_turns_the_watch_off(monkeypatch):
    monkeypatch.setattr(grad_watch, "_enabled", False)
    assert not grad_watch.enabled()
    assert grad_watch.new_watch(_params([(3,)])) is None


# --- The Triton backend's prepared launch (triton_queue.launch_steady), with the kernel stood in for. ---


class _Kernel:
    """Stands in for the queue kernel: records each launch through it (``kernel[grid](...)``, as Triton's
    own launch) and through the compiled kernel it returns, which the direct launcher keeps (as on a GPU):
    ("triton" | "direct", programs, the runtime arguments)."""

    def __init__(self, real) -> None:
        self.arg_names = real.arg_names
        self.calls: list[tuple] = []
        kernel = self
        runtime = real.arg_names.index("DTYPE")  # the runtime arguments come before the constexprs

        class Compiled:
            def __getitem__(self, grid):
                return lambda *args, stream: kernel.calls.append(("direct", grid[0], args[:runtime]))

        self.compiled = Compiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("triton", grid[0], args))
            return self.compiled

        return launch


@pytest.fixture
def kernel(monkeypatch):
    if "triton" not in znorm_kernels.available_backends() or torch.cuda.is_available():
        pytest.skip("the stand-in kernel takes CPU tensors under Triton's interpreter")
    from znorm_kernels.backends import triton_kernels, triton_launch, triton_plan

    monkeypatch.setattr(triton_launch, "_enabled", True)
    triton_plan.clear_caches()  # plans prepared for another kernel
    fake = _Kernel(triton_kernels.znorm_queue_kernel)
    monkeypatch.setattr(triton_kernels, "znorm_queue_kernel", fake)
    yield fake
    triton_plan.clear_caches()


def _same_args(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        x is y or (not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b)
    )


@pytest.fixture
def full_launches(monkeypatch):
    """The full launches (triton_queue._launch_here: plan, workspace, arguments, key looked up), counted."""
    from znorm_kernels.backends import triton_queue

    return count_calls(monkeypatch, triton_queue, "_launch_here")


def test_a_prepared_launch_passes_what_the_full_launch_passed(kernel, full_launches):
    from znorm_kernels.backends import triton_host

    grads = [make_grad((n,), seed=n) for n in (5, 300, 9000)]
    bound = triton_host.bind(grads)
    bound(grads, 1e-10, 0.0, None)
    for _ in range(2):
        bound.launch_only(1e-10, 0.0, None)
    assert len(full_launches) == 1
    (how0, p0, a0), (how1, p1, a1), (how2, p2, a2) = kernel.calls
    assert (how0, how1, how2) == ("triton", "direct", "direct")
    assert p0 == p1 == p2 and _same_args(a0, a1) and _same_args(a0, a2)
    bound.launch_only(1e-3, 1.0, None)  # other eps and correction: prepared apart
    bound.launch_only(1e-3, 1.0, None)
    assert len(full_launches) == 2 and len(kernel.calls) == 5
    assert kernel.calls[4][2][6:8] == kernel.calls[3][2][6:8] != a0[6:8]


def test_a_prepared_launch_takes_each_steps_grad_scale(kernel, full_launches):
    from znorm_kernels.backends import triton_host

    grads = [make_grad((n,), seed=n) for n in (5, 300)]
    bound = triton_host.bind(grads)
    bound.launch_only(1e-10, 0.0, torch.tensor(8.0))
    bound.launch_only(1e-10, 0.0, torch.tensor(64.0, dtype=torch.float64))
    assert len(full_launches) == 1
    (how0, _, a0), (how1, _, a1) = kernel.calls
    assert (how0, how1) == ("triton", "direct")
    assert a1[5].dtype == torch.float32 and a1[5].item() == 64.0, "this step's scale, as the kernel takes it"
    assert _same_args(a0[:5] + a0[6:], a1[:5] + a1[6:])
    bound.launch_only(1e-10, 0.0, torch.zeros(5)[1:2])  # a scale not 16-byte aligned: another specialization
    assert len(full_launches) == 2 and kernel.calls[-1][0] == "triton"


def test_a_prepared_launch_is_not_used_where_the_full_launch_must_decide(kernel, full_launches, monkeypatch):
    from znorm_kernels.backends import triton_host, triton_launch

    grads = [make_grad((n,), seed=n) for n in (5, 300)]
    bound = triton_host.bind(grads)
    bound.launch_only(1e-10, 0.0, None)
    ws = triton_host.last_launch().plan.workspaces[0]
    ws.dropped = True  # a launch on it failed: a new workspace, through the full launch
    bound.launch_only(1e-10, 0.0, None)
    assert len(full_launches) == 2
    assert kernel.calls[1][2][1] is not ws.partials
    bound.launch_only(1e-10, 0.0, None)
    assert len(full_launches) == 2, "prepared again on the new workspace"
    triton_host.set_spin_limit(1000)  # debug mode synchronizes and checks after each launch
    try:
        bound.launch_only(1e-10, 0.0, None)
    finally:
        triton_host.set_spin_limit(0)
    assert len(full_launches) == 3
    monkeypatch.setattr(triton_launch, "_enabled", False)
    bound.launch_only(1e-10, 0.0, None)
    assert len(full_launches) == 4 and kernel.calls[-1][0] == "triton"
    monkeypatch.setattr(triton_launch, "_enabled", True)
    bound.launch_only(1e-10, 0.0, None)
    assert len(full_launches) == 4 and kernel.calls[-1][0] == "direct"


def test_a_prepared_launch_that_raises_drops_its_workspace(kernel):
    from znorm_kernels.backends import triton_host

    grads = [make_grad((n,), seed=n) for n in (5, 300)]
    bound = triton_host.bind(grads)
    bound.launch_only(1e-10, 0.0, None)
    plan = triton_host.last_launch().plan
    ws = plan.workspaces[0]

    class Failing:
        def __getitem__(self, grid):
            def fail(*args, stream):
                raise RuntimeError("launch failed")

            return fail

    steady = next(iter(plan.steady.values()))
    plan.steady = {k: v._replace(kept=(Failing(), v.kept[1])) for k, v in plan.steady.items()}
    with pytest.raises(RuntimeError, match="launch failed"):
        bound.launch_only(1e-10, 0.0, None)
    assert ws.dropped and 0 not in plan.workspaces
    assert steady.ws is ws


def test_the_hook_launches_once_per_step_through_the_prepared_launch(kernel, full_launches):
    params = _params([(6, 5), (300,), (3,)])
    opt = torch.optim.SGD(params, lr=0.0)
    znorm_kernels.register(opt, backend="triton")
    for _ in range(3):
        for p in params:
            p.grad = p.grad.detach()
        opt.step()
    assert [c[0] for c in kernel.calls] == ["triton", "direct", "direct"] and len(full_launches) == 1
    # Moved: the same plan, its table of addresses rewritten, launched as prepared (same arguments).
    from znorm_kernels.backends import triton_plan

    built, before = triton_plan.counts.built, kernel.calls[2][2][1].clone()
    params[1].grad = params[1].grad.clone()
    opt.step()
    opt.step()
    assert [c[0] for c in kernel.calls[3:]] == ["direct", "direct"] and len(full_launches) == 1
    assert triton_plan.counts.built == built, "no new plan"
    old, new = kernel.calls[2][2], kernel.calls[3][2]
    assert _same_args(new, old), "the same arguments: the tables are rewritten in place"
    bases = new[1].tolist()
    assert bases == [p.grad.data_ptr() for p in params] and bases[1] != int(before[1])
    assert bases[::2] == before[::2].tolist()
    # Moved to an address that is not 16-byte aligned: another specialization, through the full launch.
    buf = torch.zeros(301)
    buf[1:].copy_(params[1].grad)
    params[1].grad = buf[1:]
    opt.step()
    assert len(full_launches) == 2


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_lazily_negated_gradients_are_normalized_and_take_the_python_path(backend, monkeypatch):
    # torch's fallback refuses a negated view (``_neg_view``) in the op's mutable list: the native backend
    # normalizes a materialized copy and writes it back through the view, and the watch leaves its lists to
    # the Python path. (Triton normalizes the memory behind the view: ZNorm is odd, z(-x) = -z(x), exactly.)
    if backend not in znorm_kernels.available_backends():
        pytest.skip(f"{backend} unavailable")
    device = _device(backend)
    params = _params([(5, 4), (9,)], device=device)
    opt = torch.optim.SGD(params, lr=0.0)
    groups = count_calls(monkeypatch, step_cache.GradientGroups, "znorm_")
    znorm_kernels.register(opt, backend=backend)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = (-make_grad(tuple(p.shape), device=device, seed=10 * step + i))._neg_view()
        expected = [float64_znorm(p.grad.resolve_neg()) for p in params]
        opt.step()
        for p, e in zip(params, expected):
            assert p.grad.is_neg()
            torch.testing.assert_close(p.grad.double().resolve_neg(), e, atol=1e-5, rtol=0)
    assert len(groups) == (1 if backend == "triton" else 3)


def test_a_step_that_fails_after_a_move_leaves_nothing_stale(monkeypatch):
    # The watch records the new addresses before the Triton groups are bound to them: if binding fails,
    # neither may be used again (the plan, perhaps half moved, could write the old, freed gradients'
    # memory).
    if "triton" not in znorm_kernels.available_backends():
        pytest.skip("triton unavailable")
    from znorm_kernels.backends import triton_host

    device = _device("triton")
    p = nn.Parameter(torch.zeros(300, device=device))
    opt = torch.optim.SGD([p], lr=0.0)
    znorm_kernels.register(opt, backend="triton")
    old = make_grad((300,), device=device, seed=1)
    p.grad = old
    opt.step()
    new = make_grad((300,), device=device, seed=2)
    p.grad = new

    def fail(*args, **kwargs):
        raise RuntimeError("binding failed")

    with monkeypatch.context() as patch:
        patch.setattr(triton_host, "rebase", fail)  # moving the plan to the new addresses fails
        with pytest.raises(RuntimeError, match="binding failed"):
            opt.step()
    old_before, expected = old.clone(), float64_znorm(new)
    opt.step()
    assert torch.equal(old, old_before), "the old gradients' memory is not written"
    torch.testing.assert_close(new.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_parameters_swapped_by_torch_keep_being_normalized(backend):
    # torch.utils.swap_tensors (model.to() and load_state_dict under the swapping flag) refuses parameters
    # referenced elsewhere, as a watch's are: with the flag on, the watch is dropped at the next step and
    # none is made.
    if backend not in znorm_kernels.available_backends():
        pytest.skip(f"{backend} unavailable")
    swap = torch.__future__.get_swap_module_params_on_conversion()
    try:
        torch.manual_seed(0)
        device = _device(backend)
        model = nn.Sequential(nn.Linear(4, 30), nn.Linear(30, 3)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        handle = znorm_kernels.register(opt, backend=backend)
        for step in range(4):
            model(torch.randn(5, 4, device=device)).sum().backward()
            expected = [float64_znorm(p.grad) for p in model.parameters()]
            opt.step()
            for p, e in zip(model.parameters(), expected):
                torch.testing.assert_close(p.grad.double(), e, atol=1e-5, rtol=0)
            opt.zero_grad(set_to_none=True)
            if step == 0:
                torch.__future__.set_swap_module_params_on_conversion(True)
            if step >= 1:  # after a step with the flag on
                model.double()  # swaps every parameter for a float64 one
                model.float()
                model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        handle.remove()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def test_no_watch_while_torch_swaps_parameters_or_for_subclasses(monkeypatch):
    params = _params([(3, 4)])
    monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
    assert grad_watch.new_watch(params) is None
    monkeypatch.undo()
    assert grad_watch.new_watch(params) is not None

    class Sub(torch.Tensor):
        pass

    assert grad_watch.new_watch([*params, torch.zeros(3).as_subclass(Sub)]) is None

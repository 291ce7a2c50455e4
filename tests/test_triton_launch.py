"""The direct relaunch of a kept Triton kernel (backends/triton_launch.py): its key is at least as fine as
Triton's own specialization, a kept kernel gets every parameter in order and the stream, and anything new
goes through Triton. The real launch on a GPU is covered by the Triton backend's GPU tests."""

from __future__ import annotations

import itertools

import pytest
import torch

from znorm_kernels.backends import triton_launch
from znorm_kernels.backends.triton_launch import DirectLauncher, spec_key

SAMPLES = [
    0, 1, 2, 15, 16, 17, -1, -16, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**40, 2**63 - 1, 2**63,
    0.0, 1.5, True, False, None,
]  # fmt: skip


def _tensors():
    base = torch.zeros(64)
    return [base, base[1:], base[4:], base.double(), torch.zeros(8, dtype=torch.int64), torch.zeros(3).half()]


def test_spec_key_tells_apart_whatever_triton_specializes():
    triton = pytest.importorskip("triton")
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    del triton
    values = SAMPLES + _tensors()
    for a, b in itertools.combinations(values, 2):
        for specialize in (True, False):
            theirs_a = native_specialize_impl(BaseBackend, a, False, specialize, True)
            theirs_b = native_specialize_impl(BaseBackend, b, False, specialize, True)
            if theirs_a != theirs_b:
                assert spec_key([a]) != spec_key([b]), (a, b, theirs_a, theirs_b)


class FakeCompiled:
    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            self.launches.append((grid, args, stream))

        return runner


class FakeJit:
    """Stands in for a triton.jit function: ``fn[grid](*args, **kwargs)`` returns a CompiledKernel."""

    arg_names = ("x_ptr", "n", "eps", "BLOCK", "FLAG")

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.compiled: list[FakeCompiled] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]

        return launch


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setattr(triton_launch, "_enabled", True)


def test_kept_kernel_gets_every_parameter_in_order_and_the_stream(enabled):
    fn, x = FakeJit(), torch.zeros(32)
    launch = DirectLauncher(fn)
    first = launch((4,), 7, (x, 100, 0.5), "k", BLOCK=256, FLAG=True, num_warps=8)
    assert len(fn.calls) == 1 and first is fn.compiled[0]
    again = launch((6,), 9, (x, 100, 0.25), "k", BLOCK=256, FLAG=True, num_warps=8)
    assert again is first and len(fn.calls) == 1, "the second launch skips Triton's binding"
    assert first.launches == [((6, 1, 1), (x, 100, 0.25, 256, True), 9)]


@pytest.mark.parametrize(
    "change",
    [
        dict(n=1),  # Triton makes an integer argument of 1 a constant
        dict(n=96),  # divisible by 16
        dict(n=2**31),  # 64-bit
        dict(x=torch.zeros(33)[1:]),  # not 16-byte aligned
        dict(x=torch.zeros(32, dtype=torch.float64)),
        dict(eps=1),  # an int where a float was
    ],
)
def test_any_new_specialization_goes_through_triton(enabled, change):
    fn = FakeJit()
    launch = DirectLauncher(fn)
    args = dict(x=torch.zeros(32), n=100, eps=0.5)
    launch((4,), 0, tuple(args.values()), "k", BLOCK=256, FLAG=True)
    args.update(change)
    launch((4,), 0, tuple(args.values()), "k", BLOCK=256, FLAG=True)
    assert len(fn.calls) == 2
    assert not fn.compiled[0].launches


def test_another_caller_key_goes_through_triton(enabled):
    fn, x = FakeJit(), torch.zeros(32)
    launch = DirectLauncher(fn)
    launch((4,), 0, (x, 100, 0.5), ("float32", 256), BLOCK=256, FLAG=True)
    launch((4,), 0, (x, 100, 0.5), ("float32", 512), BLOCK=512, FLAG=True)
    assert len(fn.calls) == 2


def test_nothing_kept_without_a_compiled_kernel_or_with_a_defaulted_constexpr(enabled):
    fn, x = FakeJit(), torch.zeros(32)
    launch = DirectLauncher(fn)
    launch((4,), 0, (x, 100, 0.5), "k", BLOCK=256)  # FLAG left to its default: not known here
    launch((4,), 0, (x, 100, 0.5), "k", BLOCK=256)
    assert len(fn.calls) == 2

    class Interpreted(FakeJit):  # under TRITON_INTERPRET=1 a launch returns no CompiledKernel
        def __getitem__(self, grid):
            return lambda *a, **k: self.calls.append(a)

    fn = Interpreted()
    launch = DirectLauncher(fn)
    for _ in range(2):
        assert launch((4,), 0, (x, 100, 0.5), "k", BLOCK=256, FLAG=True) is None
    assert len(fn.calls) == 2


def test_a_direct_call_that_fails_turns_direct_launches_off_with_a_warning(enabled):
    class Broken(FakeCompiled):
        def __getitem__(self, grid):
            def runner(*args, stream=None):
                raise TypeError("launcher takes other arguments")

            return runner

    fn, x = FakeJit(), torch.zeros(32)
    launch = DirectLauncher(fn)
    launch((4,), 0, (x, 100, 0.5), "k", BLOCK=256, FLAG=True)
    launch.kept = {key: (Broken(), consts) for key, (_, consts) in launch.kept.items()}
    with pytest.warns(RuntimeWarning, match="directly failed"):
        launch((4,), 0, (x, 100, 0.5), "k", BLOCK=256, FLAG=True)
    assert len(fn.calls) == 2, "the failed launch was made through Triton"
    assert triton_launch._enabled is False
    launch((4,), 0, (x, 100, 0.5), "k", BLOCK=256, FLAG=True)
    assert len(fn.calls) == 3 and not launch.kept


def test_switched_off(monkeypatch):
    monkeypatch.setattr(triton_launch, "_enabled", False)
    fn, x = FakeJit(), torch.zeros(32)
    launch = DirectLauncher(fn)
    for _ in range(3):
        launch((4,), 0, (x, 100, 0.5), "k", BLOCK=256, FLAG=True)
    assert len(fn.calls) == 3 and not launch.kept


@pytest.mark.parametrize("what", ["launch_hook", "pre_run_hook", "debug"])
def test_launches_go_through_triton_when_triton_would_do_more(enabled, monkeypatch, what):
    # A profiler's launch hook, a pre-run hook or debug mode: Triton's run() honours them, so no direct launch
    # (a hook raising after a direct launch must not make the fallback launch the kernel twice, either).
    knobs = pytest.importorskip("triton.knobs")
    fn, x = FakeJit(), torch.zeros(32)
    if what == "launch_hook":

        def hook(*args, **kwargs):
            return None

        monkeypatch.setattr(knobs.runtime.launch_exit_hook, "calls", [hook])  # restored after the test
    elif what == "pre_run_hook":
        fn.pre_run_hooks = [lambda *a, **k: None]
    else:
        monkeypatch.setattr(knobs.runtime, "debug", True)  # read from TRITON_DEBUG once, at import
    launch = DirectLauncher(fn)
    for _ in range(3):
        launch((4,), 0, (x, 100, 0.5), "k", BLOCK=256, FLAG=True)
    assert len(fn.calls) == 3 and not any(c.launches for c in fn.compiled)

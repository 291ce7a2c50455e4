"""The native extension (csrc/, znorm_kernels._C): what the contract suite cannot see from outside.

Chunk and batch boundaries of the C++ work split, determinism across thread counts, huge and many tensors,
the op's schema (opcheck), the build (the CUDA kernel is compiled and registered whenever it should be), the
messages when the extension is missing, and, on a GPU, the CUDA kernel against the reference.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import znorm_kernels
from tests.utils import (
    DTYPES,
    assert_close_to_float64,
    float64_znorm,
    make_grad,
    same_bits,
    saved_per_cpu_isa,
)
from znorm_kernels import reference, registry
from znorm_kernels.backends import native as native_backend

# Work-item sizes of the native kernels: cpu_tiles::kChunk and cuda_tiles::kChunk in csrc/tiles.h. The
# boundary tests below are built around them; change them together.
CPU_CHUNK = 16384
CUDA_CHUNK = 8192
# cpu_tiles::kSerialBelow in csrc/tiles.h: lists of fewer elements in all run on one thread.
CPU_PARALLEL_FROM = 1 << 16

BUILT = native_backend.unavailable("cpu") is None
needs_ext = pytest.mark.skipif(not BUILT, reason="znorm_kernels._C is not built")
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and native_backend.unavailable("cuda") is None),
    reason="needs a CUDA device and the extension built with CUDA",
)


def _op(tensors, eps=1e-10, correction=0.0, grad_scale=None, stats=None):
    if stats is None:
        torch.ops.znorm_kernels_C.znorm_(tensors, eps, correction, grad_scale)  # the old four-argument call
    else:
        torch.ops.znorm_kernels_C.znorm_(tensors, eps, correction, grad_scale, stats)


def _cuda_expected_in_build() -> bool:
    """setup.py's rule: CUDA is built when torch is a CUDA build and nvcc is found, unless switched off."""
    from torch.utils import cpp_extension

    if os.environ.get("ZNORM_BUILD_CUDA", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


# ---------------------------------------------------------------------------------------------------------
# The build


def test_extension_is_built():
    # CI installs the package with the extension; a silently failed build must not pass as skipped tests.
    if os.environ.get("ZNORM_BUILD_NATIVE", "").strip() == "0":
        pytest.skip("ZNORM_BUILD_NATIVE=0: built without the extension on purpose")
    assert BUILT, native_backend.unavailable("cpu")
    assert "cpu" in znorm_kernels.available_backends()
    assert registry.resolve_backend("auto", "cpu") == "cpu"


@needs_ext
def test_cuda_kernel_compiled_and_registered():
    # Proves the CUDA part compiled and linked on machines without a GPU (CI): the op has a CUDA kernel.
    if not _cuda_expected_in_build():
        pytest.skip("torch without CUDA, no nvcc, or ZNORM_BUILD_CUDA=0")
    assert native_backend.has_cuda_kernel()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(native_backend.OP_NAME, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(native_backend.OP_NAME, "CPU")


@needs_ext
def test_cuda_table_cache_stats_op_registered():
    # The CUDA kernel's table cache reports its counters through a device-free op (csrc/cuda_table_cache.cpp).
    if not _cuda_expected_in_build():
        pytest.skip("torch without CUDA, no nvcc, or ZNORM_BUILD_CUDA=0")
    stats = native_backend.table_cache_stats()
    assert set(stats) == set(native_backend.TABLE_CACHE_FIELDS)
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())
    assert stats["entries"] <= 16


def test_table_cache_stats_without_the_cuda_kernel(monkeypatch):
    monkeypatch.setattr(native_backend, "has_cuda_kernel", lambda: False)
    assert native_backend.table_cache_stats() is None


@needs_ext
def test_schema_marks_the_list_mutated():
    schema = torch.ops.znorm_kernels_C.znorm_.default._schema
    assert str(schema) == (
        "znorm_kernels_C::znorm_(Tensor(a!)[] tensors, float eps, float correction, Tensor? grad_scale, "
        "Tensor(b!)? stats=None) -> ()"
    )
    assert schema.arguments[0].alias_info.is_write
    assert schema.arguments[4].alias_info.is_write
    assert len(schema.returns) == 0


@needs_ext
@pytest.mark.parametrize("with_scale", [False, True])
def test_opcheck(with_scale):
    tensors = [make_grad((5, 3)), make_grad((CPU_CHUNK + 7,), seed=1), make_grad((4, 2, 3, 3), torch.float64)]
    scale = torch.tensor(8.0) if with_scale else None
    torch.library.opcheck(torch.ops.znorm_kernels_C.znorm_.default, (tensors, 1e-10, 0.0, scale))


@needs_ext
@pytest.mark.parametrize("with_scale", [False, True])
def test_opcheck_with_stats(with_scale):
    tensors = [make_grad((5, 3)), make_grad((CPU_CHUNK + 7,), seed=1), make_grad((4, 2, 3, 3), seed=2)]
    scale = torch.tensor(8.0) if with_scale else None
    stats = torch.zeros(3, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.znorm_kernels_C.znorm_.default, (tensors, 1e-10, 0.0, scale, stats))


@needs_ext
def test_compiled_function_keeps_the_op():
    def step(gs):
        _op(gs)
        return gs[0] * 1

    gs = [make_grad((300,)), make_grad((CPU_CHUNK + 3,), seed=1)]
    inputs = [g.clone() for g in gs]
    torch.compile(step, backend="aot_eager", fullgraph=True)(gs)
    for g, x in zip(gs, inputs):
        assert_close_to_float64(g, x)


# ---------------------------------------------------------------------------------------------------------
# The CPU kernel's work split


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_boundaries(dtype):
    c = CPU_CHUNK
    sizes = [c - 1, c, c + 1, 2 * c - 1, 2 * c, 2 * c + 1, 3 * c + 5]
    grads = [make_grad((n,), dtype, seed=n) for n in sizes]
    inputs = [g.clone() for g in grads]
    znorm_kernels.znorm_(grads, backend="cpu")
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x)


@needs_ext
def test_batches_of_small_tensors_across_boundaries():
    # Small tensors are batched up to CPU_CHUNK elements per work item: runs that fill a batch exactly,
    # overflow it by one, and small tensors between large ones.
    c = CPU_CHUNK
    sizes = [c // 2, c // 2, 7, c // 2, c // 2 + 1, c, 2, c + 1, 3, 5, c - 2, 2, c // 4]
    grads = [make_grad((n,), seed=i) for i, n in enumerate(sizes)]
    inputs = [g.clone() for g in grads]
    _op(grads)
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.1, -3.7, 1e4])
def test_constant_tensor_over_several_chunks_is_exactly_zero(dtype, value):
    g = torch.full((3 * CPU_CHUNK + 11,), value, dtype=dtype)
    _op([g])
    assert torch.equal(g, torch.zeros_like(g))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_equal_for_any_thread_count(dtype):
    # Enough elements in all for the parallel path; large tensors cut into chunks and small ones batched. More
    # threads than this machine's cores make threads take items from each other's segments.
    small = [(n,) for n in range(2, 300, 7)]
    shapes = [(3 * CPU_CHUNK + 17,), (64, 32, 3, 3), *small, (CPU_PARALLEL_FROM + 5,)]
    inputs = [make_grad(s, dtype, seed=i) for i, s in enumerate(shapes)]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 5, 1):
            torch.set_num_threads(threads)
            gs = [x.clone() for x in inputs]
            _op(gs)
            results.append(gs)
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    for g, x in zip(results[0], inputs):
        assert_close_to_float64(g, x)


# The portable and the vector loops (csrc/cpu_znorm_kernels.h, csrc/cpu_vec_loops.h) on every kind of run they
# treat differently: every length up to past two vector groups and around the chunk size (the vector part,
# the portable tail), values that take each branch of the statistics (float sums, the float64 fallback of
# huge or tightly spread float runs, the scaled float64 sums), NaN, infinities and signed zeros anywhere,
# outliers, constants, values near bfloat16 and float16 rounding ties, float16 subnormals, and magnitudes
# spread so wide that the lanes' sums round; the stats output and the options too.
_ISA_SCRIPT = """
import sys, torch
import znorm_kernels._C  # registers the op
from tests.utils import DTYPES, make_grad

def runs(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    pos = int(torch.randint(0, n, (1,), generator=g))
    out = [x * 2 + 0.3, x * 1e-3 + 1, x * 1e-2 + 1e4]
    big = 1e30 if dtype != torch.float64 else 1e300
    out += [x * big, x * 1e-30, torch.full((n,), -0.0), torch.full((n,), 3.5)]
    for v in (float("nan"), float("inf"), -float("inf"), 5e3, -0.0):
        y = x.clone()
        y[pos] = v
        out.append(y)
    signs = torch.where(x > 0, 0.0, -0.0)  # zeros of both signs, then one value
    signs[pos] = 1.0
    out.append(signs)
    if n > 16:
        # z-scores that are float denormals (-4e-38 / sqrt(2n)): 1 and -1 sit in lanes whose sums meet first,
        # so the tiny value survives into the mean. vcvtne2ps2bf16 would write them as zero.
        y = torch.zeros(n, dtype=torch.float64)
        y[0], y[1], y[16] = 1.0, 4e-38, -1.0
        out.append(y)
    # Halfway between neighbours of the stored type after normalization is likeliest near many equal values.
    out.append(torch.randint(-3, 4, (n,), generator=g).double() * 0.125 + 1 / 3)
    # Magnitudes over a wide range, each value followed by its negation: the lanes' float64 sums round and
    # the total cancels, so what is left of the sums, the mean and the std's bits, is their rounding, which
    # shows which lane added which element.
    span = 12 if dtype == torch.float16 else 40
    y = x.sign() * torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 2 * span - span)
    y[1::2] = -y[: n // 2 * 2 : 2]
    out.append(y)
    if dtype == torch.float16:
        out.append(x * 1e-6)  # subnormal float16 inputs
    return [t.to(dtype) for t in out]

lengths = [*range(2, 72), 95, 96, 97, 127, 128, 129, 16383, 16384, 16385, 3 * 16384 + 17]
out = []
for k, dtype in enumerate(DTYPES):
    gs = []
    for n in lengths:
        gs += runs(n, dtype, seed=k * 1000 + n)
    inputs = [g.clone() for g in gs]
    stats = torch.empty(len(gs), 2, dtype=torch.float64)
    torch.ops.znorm_kernels_C.znorm_(gs, 1e-10, 0.0, None, stats)
    out += gs + [stats]
    gs = [x.clone() for x in inputs[::7]]
    stats = torch.empty(len(gs), 2, dtype=torch.float64)
    torch.ops.znorm_kernels_C.znorm_(gs, 0.5, 1.0, torch.tensor(1024.0), stats)
    out += gs + [stats]
torch.save(out, sys.argv[1])
"""


@needs_ext
@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="no AVX2: one version only"
)
def test_baseline_and_avx2_loops_bitwise_equal(tmp_path):
    # csrc/cpu_common.h compiles the loops three times (portable, AVX2, AVX-512) and picks one at run time;
    # the lane structure and -ffp-contract=off make them round alike. ZNORM_CPU_ISA=baseline or avx2 forces
    # one. Compared as bits: the sign of zero counts, and so does the NaN these runs produce (one NaN input
    # per run: with several NaN payloads in one lane, which one survives an addition is the hardware's).
    baseline, avx2, widest = saved_per_cpu_isa(_ISA_SCRIPT, tmp_path)
    assert len(baseline) == len(avx2) == len(widest) > 5000
    for i, (a, b, c) in enumerate(zip(baseline, avx2, widest)):
        assert same_bits(a, b), ("avx2", i, a.dtype, a.numel())
        assert same_bits(a, c), ("auto", i, a.dtype, a.numel())


@needs_ext
def test_five_thousand_small_tensors():
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(2, 40, (5000,), generator=gen).tolist()
    flat = make_grad((sum(sizes),), seed=3)
    grads = [t.clone() for t in flat.split(sizes)]
    inputs = [g.clone() for g in grads]
    znorm_kernels.znorm_(grads, backend="cpu")
    got = torch.cat(grads).double()
    expected = torch.cat([float64_znorm(x) for x in inputs])
    assert (got - expected).abs().max().item() <= 1e-5


@needs_ext
def test_mixed_dtypes_in_one_op_call():
    # The dispatcher groups by dtype, but the op takes any mix, and keeps each tensor's own dtype.
    grads = [
        make_grad((n,), DTYPES[i % 4], seed=i) for i, n in enumerate([5, 300, CPU_CHUNK + 9, 2, 1000, 77])
    ]
    inputs = [g.clone() for g in grads]
    _op(grads)
    for g, x in zip(grads, inputs):
        assert g.dtype == x.dtype
        assert_close_to_float64(g, x)


@needs_ext
def test_layouts_of_a_multi_chunk_tensor_in_place():
    base = make_grad((64, 40, 3, 3), seed=5)  # 23,040 elements: two chunks
    cases = {
        "channels_last": base.clone().to(memory_format=torch.channels_last),
        "permuted": base.clone().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1),
    }
    holder = torch.zeros(64, 40, 3, 7)
    holder[..., 1:7:2] = base
    cases["non_dense"] = holder[..., 1:7:2]
    for name, g in cases.items():
        ident, strides, ptr = id(g), g.stride(), g.data_ptr()
        _op([g])
        assert (id(g), g.stride(), g.data_ptr()) == (ident, strides, ptr), name
        assert_close_to_float64(g, base)
    # The non-dense view's gaps keep their values.
    assert torch.equal(holder[..., 0::2], torch.zeros(64, 40, 3, 4))


@needs_ext
def test_matches_reference_with_grad_scale_and_correction():
    grads = [make_grad(s, seed=i) * 4096 for i, s in enumerate([(10,), (CPU_CHUNK * 2 + 1,), (8, 3, 3, 3)])]
    expected = [g.clone() for g in grads]
    scale = torch.tensor(4096.0)
    reference.znorm_(expected, grad_scale=scale, correction=1)
    znorm_kernels.znorm_(grads, backend="cpu", grad_scale=scale, correction=1)
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(got, exp, atol=1e-5 * 4096, rtol=1e-5)


@needs_ext
def test_nan_in_a_multi_chunk_tensor_stays_there():
    grads = [make_grad((2 * CPU_CHUNK + 3,)), make_grad((100,), seed=1)]
    grads[0][CPU_CHUNK + 5] = float("nan")
    x1 = grads[1].clone()
    _op(grads)
    assert torch.isnan(grads[0]).all()
    assert_close_to_float64(grads[1], x1)


@needs_ext
def test_bad_input_to_the_op_is_an_error():
    with pytest.raises(RuntimeError, match="dtype"):
        _op([torch.zeros(4, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match="grad_scale"):
        _op([make_grad((4,))], grad_scale=torch.ones(2))


# ---------------------------------------------------------------------------------------------------------
# The optional stats output: (mean, std) per tensor, as the normalization used them


def _float64_stats(x, correction):
    v = x.detach().to(torch.float64).cpu().reshape(-1)
    return v.mean().item(), v.std(correction=correction).item()


def _check_stats(stats, inputs, correction, dtype):
    # float32 accumulation (two passes per run, then a float64 merge): within 1e-6 of the spread; float64
    # tensors within 1e-12. The float64 reference is of the same input values.
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    got = stats.cpu()
    for i, x in enumerate(inputs):
        mean, std = _float64_stats(x, correction)
        assert abs(got[i, 0].item() - mean) <= rel * std, (i, got[i].tolist(), mean, std)
        assert abs(got[i, 1].item() - std) <= rel * std, (i, got[i].tolist(), mean, std)


STATS_SIZES = [2, 3, 100, CPU_CHUNK - 1, CPU_CHUNK, CPU_CHUNK + 1, 2 * CPU_CHUNK + 5, CUDA_CHUNK + 1]


@needs_ext
@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_match_float64_and_leave_the_results_bitwise_unchanged(dtype, correction):
    inputs = [make_grad((n,), dtype, seed=i) for i, n in enumerate(STATS_SIZES)]
    inputs.append(make_grad((64, 40, 3, 3), dtype, seed=99).to(memory_format=torch.channels_last))
    without = [x.clone() for x in inputs]
    _op(without, correction=float(correction))
    grads = [x.clone() for x in inputs]
    stats = torch.full((len(grads), 2), -7.0, dtype=torch.float64)
    _op(grads, correction=float(correction), stats=stats)
    for g, w in zip(grads, without):
        assert torch.equal(g, w)
    _check_stats(stats, inputs, correction, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_of_constant_tensors(dtype):
    sizes = [2, 300, CPU_CHUNK, 3 * CPU_CHUNK + 11]
    values = [0.1, -3.7, 1e4, 0.0]
    grads = [torch.full((n,), v, dtype=dtype) for n, v in zip(sizes, values)]
    exact = [g[0].double().item() for g in grads]  # the value as stored in the dtype
    stats = torch.zeros(len(grads), 2, dtype=torch.float64)
    _op(grads, correction=1.0, stats=stats)
    assert stats[:, 0].tolist() == exact
    assert stats[:, 1].tolist() == [0.0] * len(grads)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@needs_ext
def test_stats_rows_follow_the_list_with_mixed_dtypes_and_tiny_tensors():
    # The dispatcher passes one dtype and no tiny tensors; the op takes any list, and row i is tensor i.
    grads = [
        make_grad((CPU_CHUNK + 9,), torch.float16, seed=1),
        torch.tensor([5.0]),
        make_grad((300,), seed=2),
        torch.empty(0, dtype=torch.float64),
        make_grad((2 * CPU_CHUNK + 1,), torch.float64, seed=3),
        make_grad((7,), torch.bfloat16, seed=4),
    ]
    inputs = [g.clone() for g in grads]
    stats = torch.zeros(len(grads), 2, dtype=torch.float64)
    _op(grads, stats=stats)
    for i in (1, 3):
        assert stats[i].isnan().all()
        assert torch.equal(grads[i], inputs[i])
    for i in (0, 2, 4, 5):
        _check_stats(stats[i : i + 1], inputs[i : i + 1], 0, inputs[i].dtype)
        assert_close_to_float64(grads[i], inputs[i])


@needs_ext
def test_stats_with_grad_scale_are_of_the_scaled_values():
    grads = [make_grad((n,), seed=n) * 4096 for n in (10, 2 * CPU_CHUNK + 1)]
    inputs = [g.clone() for g in grads]
    without = [g.clone() for g in grads]
    scale = torch.tensor(4096.0)
    _op(without, correction=1.0, grad_scale=scale)
    stats = torch.zeros(2, 2, dtype=torch.float64)
    _op(grads, correction=1.0, grad_scale=scale, stats=stats)
    for g, w in zip(grads, without):
        assert torch.equal(g, w)
    _check_stats(stats, inputs, 1, torch.float32)  # not divided by the scale
    assert stats[1, 1].item() > 1000


@needs_ext
def test_stats_of_non_finite_tensors_are_non_finite():
    grads = [make_grad((2 * CPU_CHUNK + 3,)), make_grad((100,), seed=1), make_grad((50,), seed=2)]
    grads[0][CPU_CHUNK + 5] = float("nan")
    grads[2][3] = float("inf")
    x1 = grads[1].clone()
    stats = torch.zeros(3, 2, dtype=torch.float64)
    _op(grads, stats=stats)
    assert not stats[0].isfinite().any() and not stats[2, 1].isfinite()
    _check_stats(stats[1:2], [x1], 0, torch.float32)


@needs_ext
def test_stats_on_the_parallel_path_equal_the_serial_ones():
    shapes = [(CPU_PARALLEL_FROM + 5,), (3 * CPU_CHUNK + 17,), *[(n,) for n in range(2, 300, 13)]]
    inputs = [make_grad(s, seed=i) for i, s in enumerate(shapes)]
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            stats = torch.zeros(len(inputs), 2, dtype=torch.float64)
            _op([x.clone() for x in inputs], stats=stats)
            runs.append(stats)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[0], runs[1])
    _check_stats(runs[0], inputs, 0, torch.float32)


def _bad_stats_cases(n):
    return {
        "float32": (torch.zeros(n, 2), "float64"),
        "wrong rows": (torch.zeros(n + 1, 2, dtype=torch.float64), "shape"),
        "three columns": (torch.zeros(n, 3, dtype=torch.float64), "shape"),
        "flat": (torch.zeros(2 * n, dtype=torch.float64), "shape"),
        "transposed": (torch.zeros(2, n, dtype=torch.float64).t(), "contiguous"),
    }


def _assert_bad_stats_refused(grads, cases):
    """Each (stats, message) of ``cases`` raises a RuntimeError that matches the message, and neither the
    stats tensor nor the gradients are written."""
    inputs = [g.clone() for g in grads]
    for name, (stats, match) in cases.items():
        stats.fill_(-1.0)
        with pytest.raises(RuntimeError, match=match):
            _op(grads, stats=stats)
        assert (stats == -1.0).all(), name
        for g, x in zip(grads, inputs):
            assert torch.equal(g, x), name


@needs_ext
def test_bad_stats_tensor_raises_and_modifies_nothing():
    grads = [make_grad((5,)), torch.tensor([1.0]), make_grad((CPU_CHUNK + 1,), seed=1)]
    _assert_bad_stats_refused(grads, _bad_stats_cases(len(grads)))
    with pytest.raises(RuntimeError, match="float64"):
        _op([], stats=torch.zeros(0, 2))
    _op([], stats=torch.zeros(0, 2, dtype=torch.float64))


@needs_ext
def test_group_fn_passes_stats_through():
    fn = native_backend.group_fn("cpu")
    grads = [make_grad((30,)), make_grad((CPU_CHUNK + 2,), seed=1)]
    inputs = [g.clone() for g in grads]
    stats = torch.zeros(2, 2, dtype=torch.float64)
    fn(grads, 1e-10, 0.0, None, stats=stats)
    _check_stats(stats, inputs, 0, torch.float32)
    fn(grads, 1e-10, 0.0, None)  # without: the old call
    with pytest.raises(TypeError):
        fn(grads, 1e-10, 0.0, None, stats)  # keyword only


# ---------------------------------------------------------------------------------------------------------
# Without the extension


@pytest.fixture
def not_built(monkeypatch):
    """Simulate a checkout where the extension was never compiled."""

    def missing():
        raise ImportError("No module named 'znorm_kernels._C'", name="znorm_kernels._C")

    monkeypatch.setattr(native_backend, "_import_extension", missing)
    monkeypatch.setattr(registry, "_fallback_warned", False)
    native_backend.loaded.cache_clear()
    registry.clear_caches()
    yield
    monkeypatch.undo()
    native_backend.loaded.cache_clear()
    registry.clear_caches()


def test_explicit_backend_without_extension_says_how_to_build(not_built):
    for name in ("cpu", "cuda"):
        why = native_backend.unavailable(name)
        assert "not built" in why and "pip install --no-build-isolation -e ." in why and "CUDA_HOME" in why
        assert name not in znorm_kernels.available_backends()
    g = make_grad((10,))
    before = g.clone()
    with pytest.raises(RuntimeError, match=r"'cpu'.*not built.*pip install --no-build-isolation"):
        znorm_kernels.znorm_([g], backend="cpu")
    assert torch.equal(g, before)
    with pytest.raises(RuntimeError, match="not built"):
        native_backend.load()


def test_auto_without_extension_warns_once_and_uses_reference(not_built):
    grads = [make_grad((50,)), make_grad((7, 3), seed=1)]
    expected = [g.clone() for g in grads]
    reference.znorm_(expected)
    with pytest.warns(RuntimeWarning, match="falls back to the pure-PyTorch reference.*not built"):
        znorm_kernels.znorm_(grads)
    for got, exp in zip(grads, expected):
        assert torch.equal(got, exp)
    registry.clear_caches()  # even when resolved afresh, the warning is not repeated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        znorm_kernels.znorm_([make_grad((5,))])


def test_cuda_backend_of_a_cpu_only_build(monkeypatch):
    if not BUILT:
        pytest.skip("znorm_kernels._C is not built")
    monkeypatch.setattr(native_backend, "has_cuda_kernel", lambda: False)
    why = native_backend.unavailable("cuda")
    assert "built without CUDA" in why and "ZNORM_BUILD_CUDA" in why
    assert native_backend.unavailable("cpu") is None


def test_serves_only_its_device():
    assert native_backend.serves("cpu", torch.device("cpu")) is None
    assert "CPU" in native_backend.serves("cpu", torch.device("cuda"))
    assert native_backend.serves("cuda", torch.device("cuda")) is None
    assert "CUDA" in native_backend.serves("cuda", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------
# The CUDA kernel (only on a GPU)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype):
    c = CUDA_CHUNK
    sizes = [2, 3, 255, 256, 257, 1025, c - 1, c, c + 1, 2 * c, 2 * c + 1, 5 * c + 3, CPU_CHUNK + 1]
    shapes = [(n,) for n in sizes] + [(64, 16, 3, 3), (10, 64)]
    grads = [make_grad(s, dtype, "cuda", seed=i) for i, s in enumerate(shapes)]
    expected = [g.clone() for g in grads]
    reference.znorm_(expected)
    inputs = [g.clone() for g in grads]
    znorm_kernels.znorm_(grads, backend="cuda")
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for got, exp, x in zip(grads, expected, inputs):
        torch.testing.assert_close(got, exp, atol=tol, rtol=tol)
        assert_close_to_float64(got, x)


@needs_gpu
@pytest.mark.cuda
def test_cuda_constant_layouts_many_and_deterministic():
    const = torch.full((3 * CUDA_CHUNK + 5,), 0.1, device="cuda")
    _op([const])
    assert torch.equal(const, torch.zeros_like(const))

    base = make_grad((64, 40, 3, 3), device="cuda", seed=2)
    cl = base.clone().to(memory_format=torch.channels_last)
    holder = torch.zeros(64, 40, 3, 7, device="cuda")
    holder[..., 1:7:2] = base
    view = holder[..., 1:7:2]
    _op([cl, view])
    assert_close_to_float64(cl, base)
    assert_close_to_float64(view, base)
    assert torch.equal(holder[..., 0], torch.zeros(64, 40, 3, device="cuda"))

    sizes = torch.randint(2, 40, (5000,), generator=torch.Generator().manual_seed(0)).tolist()
    flat = make_grad((sum(sizes),), device="cuda", seed=4)
    runs = []
    for _ in range(2):
        grads = [t.clone() for t in flat.split(sizes)] + [make_grad((4 * CUDA_CHUNK + 1,), device="cuda")]
        _op(grads)
        runs.append(torch.cat([g.reshape(-1) for g in grads]))
    assert torch.equal(runs[0], runs[1])
    expected = torch.cat([float64_znorm(x) for x in flat.split(sizes)])
    assert (runs[0][: sum(sizes)].double().cpu() - expected).abs().max().item() <= 1e-5


@needs_gpu
@pytest.mark.cuda
def test_cuda_grad_scale_without_host_sync():
    grads = [make_grad((s,), device="cuda", seed=s) * 65536 for s in (100, 3 * CUDA_CHUNK)]
    inputs = [g.clone() for g in grads]
    scale = torch.tensor(65536.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        znorm_kernels.znorm_(grads, backend="cuda", grad_scale=scale)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x, scale=65536.0)


def _cache_delta(before: dict[str, int]) -> dict[str, int]:
    after = native_backend.table_cache_stats()
    return {k: after[k] - before[k] for k in native_backend.TABLE_CACHE_FIELDS}


def _check_against_reference(got, inputs):
    expected = [x.clone() for x in inputs]
    reference.znorm_(expected)
    for g, e, x in zip(got, expected, inputs):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        assert_close_to_float64(g, x)


@needs_gpu
@pytest.mark.cuda
def test_cuda_repeated_call_reuses_its_table():
    # The second call with the same tensors finds the device table cached: no pinned allocation, no copy.
    grads = [make_grad((s,), device="cuda", seed=s) for s in (100, 3 * CUDA_CHUNK + 1, 7)]
    before = native_backend.table_cache_stats()
    for seed in (1, 2):
        fresh = [make_grad(tuple(g.shape), device="cuda", seed=seed * 10 + i) for i, g in enumerate(grads)]
        for g, f in zip(grads, fresh):
            g.copy_(f)
        _op(grads)
        _check_against_reference(grads, fresh)
    delta = _cache_delta(before)
    # The first call builds the table (or finds one of an earlier test's identical list); the second hits.
    assert delta["hits"] >= 1 and delta["builds"] + delta["hits"] == 2, delta


@needs_gpu
@pytest.mark.cuda
def test_cuda_table_cache_evicts_the_least_recently_used():
    # Sizes no other test uses, so that no entry left by an earlier test matches.
    lists = [[make_grad((1237 + 11 * k,), device="cuda", seed=k)] for k in range(20)]
    inputs = [[g.clone() for g in gs] for gs in lists]
    before = native_backend.table_cache_stats()
    for gs in lists:
        _op(gs)
    delta = _cache_delta(before)
    assert delta["builds"] == 20 and delta["evictions"] >= 4, delta
    assert native_backend.table_cache_stats()["entries"] <= 16
    for gs, xs in zip(lists, inputs):
        _check_against_reference(gs, xs)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_aligned_and_unaligned_tensors_bitwise_equal(dtype):
    # 16-byte aligned tensors take 128-bit loads and stores, others element by element; every thread folds
    # the same elements in the same order either way, so the bits do not depend on the address.
    c = CUDA_CHUNK
    # One 128-bit round of 256 threads is 4096 float32 elements (8192 halves, 2048 doubles): sizes around it.
    for n in (2, 9, 1023, 2051, 4099, 6000, c - 1, c, c + 5, 3 * c + 17):
        x = make_grad((n,), dtype, "cuda", seed=n)
        aligned = x.clone()
        holder = torch.empty(n + 1, dtype=dtype, device="cuda")
        unaligned = holder[1:]
        unaligned.copy_(x)
        assert aligned.data_ptr() % 16 == 0 and unaligned.data_ptr() % 16 != 0
        _op([aligned])
        _op([unaligned])
        assert torch.equal(aligned, unaligned), n
        assert_close_to_float64(aligned, x)


@needs_gpu
@pytest.mark.cuda
def test_cuda_two_streams_share_a_table_and_eviction_waits_for_them():
    # A table built on the default stream, then read on a side stream held back by a long sleep; meanwhile
    # the default stream evicts it and allocates small blocks that would reuse its memory. The side stream's
    # storage record keeps the block from reuse until its kernels have read it.
    grads = [make_grad((s,), device="cuda", seed=s) for s in (300, 2 * CUDA_CHUNK + 3)]
    _op(grads)  # builds the table on the current stream
    fresh = [make_grad(tuple(g.shape), device="cuda", seed=100 + i) for i, g in enumerate(grads)]
    for g, f in zip(grads, fresh):
        g.copy_(f)
    before = native_backend.table_cache_stats()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s: the kernels below start long after the host returns
        _op(grads)
    others = [[make_grad((20 + k,), device="cuda", seed=k)] for k in range(20)]
    for gs in others:
        _op(gs)  # evicts the shared table on the default stream
    junk = [torch.full((3 * len(grads) + 1,), -1, dtype=torch.int64, device="cuda") for _ in range(64)]
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    del junk
    delta = _cache_delta(before)
    assert delta["hits"] >= 1 and delta["stream_records"] >= 1, delta
    _check_against_reference(grads, fresh)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("warm", [True, False], ids=["cached", "built_in_capture"])
def test_cuda_graph_capture_and_replay(warm):
    # A captured launch reads its table at every replay: a cached one is kept for good, and one built during
    # capture copies from a pinned host buffer that is never freed (csrc/cuda_table_cache.cpp). Three replays
    # with new gradients copied in between, other calls (which churn the cache and the allocator) in between.
    static = [make_grad((s,), device="cuda", seed=s + int(warm)) for s in (100, 3 * CUDA_CHUNK + 1, 4099)]
    if warm:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _op(static)  # warm-up outside the capture, as torch.cuda.graphs asks: the table gets cached
        torch.cuda.current_stream().wait_stream(side)
    before = native_backend.table_cache_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _op(static)
    delta = _cache_delta(before)
    assert delta["graph_tables"] == 1 and delta["graph_builds"] == (0 if warm else 1), delta
    for seed in (1, 2, 3):
        for k in range(20):
            _op([make_grad((30 + k,), device="cuda", seed=k)])  # evicts every cached table
        fresh = [make_grad(tuple(g.shape), device="cuda", seed=seed * 100 + i) for i, g in enumerate(static)]
        for st, f in zip(static, fresh):
            st.copy_(f)
        graph.replay()
        _check_against_reference(static, fresh)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_tensors_on_another_device_than_the_current_one():
    torch.cuda.set_device(0)
    grads = [make_grad((s,), device="cuda:1", seed=s) for s in (100, 2 * CUDA_CHUNK + 1)]
    inputs = [g.clone() for g in grads]
    _op(grads)
    _op([make_grad((100,), device="cuda:0")])  # a list of the same shape on the current device
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    _check_against_reference(grads, inputs)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_stats_match_float64_and_leave_the_results_bitwise_unchanged(dtype, correction):
    c = CUDA_CHUNK
    sizes = [2, 257, c - 1, c, c + 1, 2 * c + 1, 5 * c + 3]
    inputs = [make_grad((n,), dtype, "cuda", seed=i) for i, n in enumerate(sizes)]
    inputs.append(torch.full((3 * c + 5,), 0.1, dtype=dtype, device="cuda"))
    without = [x.clone() for x in inputs]
    _op(without, correction=float(correction))
    grads = [x.clone() for x in inputs]
    stats = torch.full((len(grads), 2), -7.0, dtype=torch.float64, device="cuda")
    _op(grads, correction=float(correction), stats=stats)
    for g, w in zip(grads, without):
        assert torch.equal(g, w)
    _check_stats(stats[:-1], inputs[:-1], correction, dtype)
    assert stats[-1].tolist() == [inputs[-1][0].double().item(), 0.0]


@needs_gpu
@pytest.mark.cuda
def test_cuda_stats_rows_of_a_mixed_list_without_host_sync():
    grads = [
        make_grad((CUDA_CHUNK + 9,), torch.float16, "cuda", seed=1),
        torch.tensor([5.0], device="cuda"),
        make_grad((300,), device="cuda", seed=2) * 65536,
        make_grad((2 * CUDA_CHUNK + 1,), torch.float64, "cuda", seed=3),
    ]
    inputs = [g.clone() for g in grads]
    stats = torch.zeros(len(grads), 2, dtype=torch.float64, device="cuda")
    scale = torch.tensor(2.0, device="cuda")
    for _ in range(2):  # the second call finds its table (with the rows) cached
        for g, x in zip(grads, inputs):
            g.copy_(x)
        stats.zero_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _op(grads, grad_scale=scale, stats=stats)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert stats[1].isnan().all()
        for i in (0, 2, 3):
            _check_stats(stats[i : i + 1], inputs[i : i + 1], 0, inputs[i].dtype)


@needs_gpu
@pytest.mark.cuda
def test_cuda_bad_stats_tensor_raises_and_modifies_nothing():
    grads = [make_grad((5,), device="cuda"), make_grad((CUDA_CHUNK + 1,), device="cuda", seed=1)]
    cases = {k: (v.cuda(), m) for k, (v, m) in _bad_stats_cases(len(grads)).items()}
    cases["on the CPU"] = (torch.zeros(len(grads), 2, dtype=torch.float64), "device")
    _assert_bad_stats_refused(grads, cases)
    cpu_grads = [make_grad((5,))]
    with pytest.raises(RuntimeError, match="device"):
        _op(cpu_grads, stats=torch.zeros(1, 2, dtype=torch.float64, device="cuda"))


@needs_gpu
@pytest.mark.cuda
def test_cuda_stats_in_graph_capture_and_replay():
    static = [make_grad((s,), device="cuda", seed=s) for s in (100, 3 * CUDA_CHUNK + 1)]
    stats = torch.zeros(2, 2, dtype=torch.float64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _op(static, stats=stats)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _op(static, stats=stats)
    for seed in (1, 2):
        fresh = [make_grad(tuple(g.shape), device="cuda", seed=seed * 100 + i) for i, g in enumerate(static)]
        for st, f in zip(static, fresh):
            st.copy_(f)
        graph.replay()
        _check_stats(stats, fresh, 0, torch.float32)
        _check_against_reference(static, fresh)


def _gpu_memory() -> int:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0


@needs_gpu
@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(_gpu_memory() < 24 * 2**30, reason="needs a GPU with 24 GiB")
def test_cuda_bfloat16_beyond_int32_indexing():
    n = 2**31 + 3
    g = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    piece = 2**28
    for start in range(0, n, piece):
        g[start : start + piece].normal_(0.5, 2.0, generator=gen)
    g[-3:] = torch.tensor([40.0, -40.0, 7.0], dtype=torch.bfloat16)  # distinctive values past 2**31
    # Float64 statistics, piece by piece (shifted by 0.5, so the one-pass formula is exact enough in float64).
    total, total_sq = 0.0, 0.0
    for start in range(0, n, piece):
        p64 = g[start : start + piece].double() - 0.5
        total += p64.sum().item()
        total_sq += (p64 * p64).sum().item()
    mean = 0.5 + total / n
    std = (total_sq / n - (total / n) ** 2) ** 0.5
    check = torch.tensor([0, 1, 2**30, 2**31 - 1, 2**31, 2**31 + 1, 2**31 + 2], device="cuda")
    before = g[check].double()
    znorm_kernels.znorm_([g], backend="cuda")
    got = g[check].double()
    expected = (before - mean) / std
    # Rule 10 plus slack for the float64 statistics' own summation: bfloat16 rounding dominates.
    bound = 1e-4 + expected.abs() * 2**-8
    assert ((got - expected).abs() <= bound).all(), (got, expected)
    assert got[-3].item() > 15 and got[-2].item() < -15

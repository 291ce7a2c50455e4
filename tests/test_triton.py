"""The Triton backend's own paths: small-tensor items, chunked items, chunk-size classes, the plan cache, the
single launch, the statistics stage, and 64-bit sizes on a GPU. (The contract rules run in test_znorm.py.)

On a CPU-only machine these run through TRITON_INTERPRET=1 (set by conftest.py), with small sizes."""

from __future__ import annotations

import pytest
import torch

import znorm_kernels
from tests.utils import DTYPES, assert_close_to_float64, float64_znorm, make_grad
from znorm_kernels import registry
from znorm_kernels.backends.tiles import (
    DEFAULT_LARGE_LOADS,
    LARGE_LOADS,
    LARGE_TENSOR,
    LARGE_UNROLL,
    Tiles,
    tiles_for,
)

pytestmark = pytest.mark.skipif(
    "triton" not in znorm_kernels.available_backends(), reason="Triton backend not available"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def plans(triton_plans):
    """The Triton plan cache, empty for the test (and put back after)."""
    return triton_plans.plans


@pytest.fixture
def tb(plans):
    from znorm_kernels.backends import triton_host

    return triton_host


def _counters(plan, device) -> torch.Tensor:
    from znorm_kernels.backends.triton_common import stream_of

    return plan.workspaces[stream_of(device)].counters


class _WatchedLauncher:
    """A DirectLauncher calling ``record`` before each launch: ``record(grid, stream, args, key, **kwargs)``
    for a launch through its call, ``record(grid, stream, args, None)`` for a prepared one (``direct``)."""

    def __init__(self, launcher, record) -> None:
        self.launcher, self.record = launcher, record

    def __call__(self, grid, *args, **kwargs):
        self.record(grid, *args, **kwargs)
        return self.launcher(grid, *args, **kwargs)

    def direct(self, kept, grid, stream, args):
        self.record(grid, stream, args, None)
        return self.launcher.direct(kept, grid, stream, args)

    def __getattr__(self, name):
        return getattr(self.launcher, name)


def _watch_launches(tb, monkeypatch, record) -> None:
    """Calls ``record`` before every kernel launch (every launch goes through the host's launcher: Triton's
    own, the direct one of kept kernels, or a prepared one; see _WatchedLauncher)."""
    from znorm_kernels.backends import triton_queue

    real = triton_queue.launcher_for
    monkeypatch.setattr(triton_queue, "launcher_for", lambda fn: _WatchedLauncher(real(fn), record))


@pytest.fixture
def launches(tb, monkeypatch):
    """Counts kernel launches: the grid of each."""
    count = []
    _watch_launches(tb, monkeypatch, lambda grid, *args, **kwargs: count.append(grid))
    return count


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [16, 64])
def test_boundaries_of_block_and_chunks(tb, dtype, block):
    # Around BLOCK (small item vs chunked), and chunk multiples (one tile per chunk below LARGE_TENSOR).
    sizes = [2, block - 1, block, block + 1, 2 * block - 1, 2 * block, 2 * block + 1, 5 * block + 3]
    grads = [make_grad((n,), dtype, DEVICE, seed=n) for n in sizes]
    inputs = [g.clone() for g in grads]
    tb.znorm_group_(grads, 1e-10, 0, None, tiles=Tiles(block=block))
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x)


@pytest.mark.parametrize("unroll", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("doubling", [False, True], ids=["fixed", "doubling"])
def test_large_chunk_class(tb, dtype, unroll, doubling):
    # Above large_tensor, chunks hold large_min_chunk to large_chunk tiles, loaded UNROLL at a time: shrink
    # the sizes to exercise the grouped loads and their tail tiles, the Chan merge across tiles and the
    # vectorized merge of many partials (more than merge_block of them); with doubling, chunks of 2, 4 and 8
    # tiles in one list (at most 4 chunks a tensor until 8 tiles).
    block = 16
    if doubling:
        tiles = Tiles(block=block, unroll=unroll, large_tensor=100, merge_block=8, large_min_chunk=2,
                      large_chunk=8, max_partials=4)  # fmt: skip
        assert [tiles.chunk(n) // block for n in (101, 129, 257, 10_000)] == [2, 4, 8, 8]
    else:
        tiles = Tiles(block=block, unroll=unroll, large_tensor=100, merge_block=8, large_min_chunk=32)
    chunk = tiles.chunk(101)
    assert chunk == block * (2 if doubling else tiles.large_chunk)
    sizes = [101, chunk - 1, chunk, chunk + 1, chunk + 2 * block + 3, 3 * chunk, 9 * chunk + 17]
    grads = [make_grad((n,), dtype, DEVICE, seed=n) for n in sizes]
    grads[3][-1] = 1e4  # outliers at the start of a last chunk and of a grouped tile
    grads[4][min(block * (1 + unroll), sizes[4] - 1)] = -3e3
    grads.append(torch.full((4 * chunk + 5,), 0.1, dtype=dtype, device=DEVICE))
    inputs = [g.clone() for g in grads]
    tb.znorm_group_(grads, 1e-10, 0, None, tiles=tiles)
    for g, x in zip(grads[:-1], inputs):
        assert_close_to_float64(g, x)
    assert torch.equal(grads[-1], torch.zeros_like(grads[-1]))


@pytest.mark.parametrize("mid_tiles", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mid_chunk_class(tb, plans, dtype, mid_tiles):
    # mid_chunk (1 as shipped; bench.gpu_probe tries others) sets the chunks of tensors between the block and
    # large_tensor elements: several tiles each, a short last chunk, the same bits whatever the unroll.
    block = 16
    shape = dict(block=block, mid_chunk=mid_tiles, large_tensor=10_000)
    chunk = Tiles(**shape).chunk(block + 1)
    assert chunk == block * mid_tiles
    assert Tiles(**shape).chunk(10_001) == block * Tiles(**shape).large_min_chunk
    sizes = [block + 1, chunk - 1, chunk, chunk + 1, 3 * chunk + block + 5, 10_000]
    inputs = [make_grad((n,), dtype, DEVICE, seed=n) for n in sizes]
    inputs[3][-1] = 2e4  # an outlier alone in a last chunk of one element
    inputs[4][chunk + block] = -5e3  # and in the second tile of a chunk
    results = []
    for unroll in (1, 2):
        grads = [x.clone() for x in inputs]
        stats = torch.empty((len(grads), 2), dtype=torch.float64, device=DEVICE)
        tb.znorm_group_(grads, 1e-10, 0, None, stats=stats, tiles=Tiles(**shape, unroll=unroll))
        for g, x in zip(grads, inputs):
            assert_close_to_float64(g, x)
        results.append((grads, stats))
    assert torch.equal(results[0][1], results[1][1])
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    (plan,) = {p.num_partials for p in plans.values()}
    assert plan == sum(-(-n // chunk) for n in sizes)


@pytest.mark.parametrize(
    "dtype, aligned",
    [(torch.float32, True), (torch.bfloat16, True), (torch.float16, True), (torch.float64, True),
     (torch.float32, False), (torch.bfloat16, False)],
    ids=lambda v: str(v) if isinstance(v, torch.dtype) else ("aligned" if v else "unaligned"),
)  # fmt: skip
def test_grouped_loads_leave_the_bits_alone(tb, dtype, aligned):
    # UNROLL and PREFETCH only change when tiles' loads are issued (the chunks do not depend on them): every
    # unroll, and the next tile loaded while one is reduced, give the same bits, statistics included. Chunks
    # of 8 tiles: 101 and 1000 end on a partial tile, 2053 on one of 5, 1024 on full tiles only.
    block = 16
    sizes = (101, 1000, 2053, 1024)
    if aligned:
        inputs = [make_grad((n,), dtype, DEVICE, seed=n) for n in sizes]
    else:  # views one element into their storage: element-wise accesses
        inputs = [make_grad((n + 1,), dtype, DEVICE, seed=n)[1:] for n in sizes]
    inputs[2][700] = 5e3
    inputs[3][1023] = -7e3  # an outlier in the last tile of a tensor
    configs = [Tiles(block, unroll, large_tensor=100) for unroll in (1, 2, 4)]
    configs.append(Tiles(block, 1, prefetch=True, large_tensor=100))
    results = []
    for tiles in configs:
        grads = [x.clone() if aligned else x.new_empty(x.numel() + 1)[1:].copy_(x) for x in inputs]
        stats = torch.empty((len(grads), 2), dtype=torch.float64, device=DEVICE)
        tb.znorm_group_(grads, 1e-10, 0, None, stats=stats, tiles=tiles)
        results.append((grads, stats))
    for (grads, stats), tiles in zip(results[1:], configs[1:]):
        assert torch.equal(stats, results[0][1]), tiles
        for a, b in zip(grads, results[0][0]):
            assert torch.equal(a, b), tiles
    for g, x in zip(results[0][0], inputs):
        assert_close_to_float64(g, x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's path: the GPU compiles FUSED on")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_fused_reductions_compute_what_the_plain_ones_do(tb, dtype, monkeypatch):
    # On a GPU a tile's min, max and sum, then its centred sums, are each one reduction of several operands
    # (triton_moments.FUSED); the interpreter computes the plain ones. Here the fused form runs (element by
    # element in the interpreter: small tiles), prefetch included: within rule 10, constants exactly 0, NaN
    # spread to the whole tensor, and the statistics of the plain form up to the order of the sums.
    import triton.language as tl

    from znorm_kernels.backends import triton_moments

    tiles = Tiles(16, 1, prefetch=dtype != torch.float64, large_tensor=100)
    inputs = [make_grad((n,), dtype, DEVICE, seed=n) for n in (1, 2, 15, 16, 17, 100, 230)]
    inputs[6][200] = 4e3  # an outlier in a chunk's tile
    inputs.append(torch.full((40,), 0.5, dtype=dtype, device=DEVICE))
    inputs.append(make_grad((20,), dtype, DEVICE, seed=5))
    inputs[-1][3] = float("nan")
    results = []
    for fused in (False, True):
        monkeypatch.setattr(triton_moments, "FUSED", tl.constexpr(fused))
        grads = [x.clone() for x in inputs]
        stats = torch.empty((len(grads), 2), dtype=torch.float64, device=DEVICE)
        tb.znorm_group_(grads, 1e-10, 0, None, stats=stats, tiles=tiles)
        results.append((grads, stats))
    (_, plain_stats), (grads, stats) = results
    finite = torch.isfinite(stats).all(dim=1)
    assert not finite[-1] and finite[:-1].all()
    torch.testing.assert_close(stats[:-1], plain_stats[:-1], rtol=1e-6, atol=0)
    for g, x in zip(grads[1:-2], inputs[1:-2]):
        assert_close_to_float64(g, x)
    assert torch.equal(grads[-2], torch.zeros_like(grads[-2]))
    assert torch.isnan(grads[-1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_timeline_variant_computes_the_same_bits_and_records_every_ticket(tb, dtype):
    # triton_host.timeline_ (diagnostics, bench/timeline.py): the same z-scores as znorm_group_, bit for bit,
    # and one row per ticket of the queue (statistics, small items, normalize), none left unrun. Under the
    # interpreter the first program drains the queue and there is no timer.
    tiles = Tiles(16, 1, prefetch=dtype == torch.bfloat16, large_tensor=100)
    inputs = [make_grad((n,), dtype, DEVICE, seed=n) for n in (3, 16, 40, 300, 1000)]
    expected = [x.clone() for x in inputs]
    tb.znorm_group_(expected, 1e-10, 0, None, tiles=tiles)
    grads = [x.clone() for x in inputs]
    recorded = tb.timeline_(grads, tiles=tiles)
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)
    plan = tb.last_launch().plan
    assert (recorded.stats, recorded.small) == (plan.num_stats_items, plan.num_small_items)
    kinds = recorded.kinds()
    assert len(kinds) == recorded.rows.shape[0] == 2 * plan.num_stats_items + plan.num_small_items
    assert kinds.count("small") == 2 and kinds[0] == "stat" and kinds[-1] == "norm"
    assert recorded.rows.dtype == torch.int64 and recorded.rows.device.type == "cpu"
    assert (recorded.rows[:, 2] >= 0).all(), "a ticket left unrecorded"
    if not torch.cuda.is_available():
        assert (recorded.rows[:, [0, 1, 3]] == 0).all()
    else:
        assert (recorded.rows[:, 1] >= recorded.rows[:, 0]).all()


def test_the_list_sets_unroll():
    # A list with a tensor above LARGE_TENSOR runs with its dtype's loads (float32 LARGE_UNROLL tiles issued
    # together, 16-bit dtypes the next tile prefetched, float64 neither), any other with neither; the block
    # is the dtype's. (The tests above show that a tensor's bits depend on neither.)
    large = {
        torch.float32: (LARGE_UNROLL, False), torch.bfloat16: (1, True), torch.float16: (1, True),
        torch.float64: (1, False),
    }  # fmt: skip
    for dtype, (unroll, prefetch) in large.items():
        block = 2048 if dtype == torch.float64 else 8192
        assert tiles_for(dtype) == Tiles(block)
        assert tiles_for(dtype, [2, LARGE_TENSOR]) == Tiles(block)
        assert tiles_for(dtype, [2, LARGE_TENSOR + 1, 5]) == Tiles(block, unroll, prefetch=prefetch)
    with pytest.raises(ValueError, match="prefetch"):
        Tiles(block, 2, prefetch=True)
    with pytest.raises(ValueError, match="prefetch"):
        Tiles(block, 1, prefetch=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_a_tensor_keeps_its_bits_in_any_list(tb, plans, dtype):
    # Normalized alone, or in a list whose tiles unroll its loads: the same chunks, so the same bits. A call
    # without tiles runs with the list's own (tiles_for).
    tiles = Tiles(16, large_tensor=100)
    small = [make_grad((n,), dtype, DEVICE, seed=n) for n in (2, 16, 17, 100)]
    large = make_grad((1000,), dtype, DEVICE, seed=7)
    large[300] = -2e3
    alone = [x.clone() for x in small]
    tb.znorm_group_(alone, 1e-10, 0, None, tiles=tiles)
    big_alone = [large.clone()]
    tb.znorm_group_(big_alone, 1e-10, 0, None, tiles=tiles)
    together = [x.clone() for x in [*small, large]]
    unrolled = Tiles(16, 1 if dtype == torch.float64 else LARGE_UNROLL, large_tensor=100)
    tb.znorm_group_(together, 1e-10, 0, None, tiles=unrolled)
    for a, b in zip(together, [*alone, *big_alone]):
        assert torch.equal(a, b)
    plans.clear()
    tb.znorm_group_([x.clone() for x in small], 1e-10, 0, None)
    (plan,) = plans.values()
    assert plan.tiles == tiles_for(dtype, [x.numel() for x in small])


@pytest.mark.parametrize(
    "tiles",
    [{"unroll": 0}, {"unroll": 3}, {"block": 24}, {"block": 8}, {"block": 64.0}, {"merge_block": 6},
     {"mid_chunk": 0}, {"num_warps": 0}, {"programs": 0}, {"run": 0}, {"run": True}, {"run": 1.0},
     {"run_divisor": 0}, {"large_min_chunk": 0}, {"max_partials": 0},
     {"block": 1 << 20, "mid_chunk": 1 << 11}, {"block": 1 << 26}],
    ids=str,
)  # fmt: skip
def test_bad_tiles_are_refused(tiles):
    with pytest.raises(
        ValueError,
        match=r"((unroll|block|mid_chunk|num_warps|programs|run|divisor|min_chunk|partials) must be"
        r"|chunks of at most)",
    ):
        Tiles(**{"block": 64, **tiles})


def test_default_block_boundaries(tb):
    block = tiles_for(torch.float32).block
    sizes = [block - 1, block, block + 1, 2 * block, 2 * block + 1]
    grads = [make_grad((n,), torch.float32, DEVICE, seed=n) for n in sizes]
    inputs = [g.clone() for g in grads]
    tb.znorm_group_(grads, 1e-10, 0, None)
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x)


def test_a_kept_kernel_key_fixes_every_constexpr(tb, monkeypatch):
    # On a GPU the direct launcher reuses the kernel compiled for a key: launches with the same key must pass
    # the same constexprs and options, or another tile configuration would run the kernel compiled for one.
    seen: dict = {}

    def record(grid, stream, args, key, **kwargs):
        seen.setdefault(key, set()).add(tuple(sorted((k, str(v)) for k, v in kwargs.items())))

    _watch_launches(tb, monkeypatch, record)
    grads = [make_grad((n,), device=DEVICE, seed=n) for n in (5, 300)]
    for merge_block, block, unroll, warps in ((1024, 16, 1, 8), (8, 16, 1, 8), (8, 16, 2, 8), (8, 64, 2, 8),
                                              (8, 64, 2, 4)):  # fmt: skip
        tiles = Tiles(block, unroll, merge_block=merge_block, num_warps=warps)
        tb.znorm_group_(grads, 1e-10, 0, None, tiles=tiles)
    assert len(seen) == 5 and all(len(v) == 1 for v in seen.values())


def test_one_launch_per_group_whatever_the_count(tb, launches):
    grads = [make_grad((n % 50 + 2,), seed=n, device=DEVICE) for n in range(300)]
    grads += [make_grad((200,), seed=1, device=DEVICE), make_grad((5000,), seed=2, device=DEVICE)]
    znorm_kernels.znorm_(grads, backend="triton")
    assert len(launches) == 1
    mixed = [*grads, make_grad((9,), torch.bfloat16, DEVICE), make_grad((9,), torch.float16, DEVICE)]
    launches.clear()
    znorm_kernels.znorm_(mixed, backend="triton")
    assert len(launches) == 3  # float32, bfloat16, float16


def test_5000_tensors_in_one_call(tb, launches):
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(2, 9, (5000,), generator=gen).tolist()
    grads = [make_grad((n,), seed=i, device=DEVICE) for i, n in enumerate(sizes)]
    grads[17] = torch.full((6,), 2.5, device=DEVICE)
    inputs = [g.clone() for g in grads]
    znorm_kernels.znorm_(grads, backend="triton")
    assert len(launches) == 1
    for g, x in zip(grads, inputs):
        assert_close_to_float64(g, x)


def test_plan_is_cached_and_counters_reset(tb, plans):
    grads = [make_grad((n,), device=DEVICE, seed=n) for n in (3, 100, 5000, 20000)]
    inputs = [g.clone() for g in grads]
    tb.znorm_group_(grads, 1e-10, 0, None)
    assert len(plans) == 1
    plan = next(iter(plans.values()))
    counters = _counters(plan, grads[0].device)
    assert int(counters.abs().sum()) == 0, "the last program must leave the counters at zero"
    first = [g.clone() for g in grads]
    for g, x in zip(grads, inputs):
        g.copy_(x)
    tb.znorm_group_(grads, 1e-10, 0, None)
    assert len(plans) == 1 and next(iter(plans.values())) is plan
    for a, b in zip(first, grads):
        assert torch.equal(a, b)
    # New addresses: a new plan, the same bits.
    fresh = [x.clone() for x in inputs]
    tb.znorm_group_(fresh, 1e-10, 0, None)
    assert len(plans) == 2
    for a, b in zip(first, fresh):
        assert torch.equal(a, b)


def test_bits_do_not_depend_on_the_rest_of_the_list(tb):
    # Chunk sizes depend on a tensor's own size only, so alone or in company it gets the same bits.
    x = make_grad((30_000,), device=DEVICE, seed=3)
    alone = x.clone()
    tb.znorm_group_([alone], 1e-10, 0, None)
    company = [make_grad((n,), device=DEVICE, seed=n) for n in (5, 9000)]
    together = x.clone()
    tb.znorm_group_([company[0], together, company[1]], 1e-10, 0, None)
    assert torch.equal(alone, together)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_statistics_stage(tb, dtype):
    grads = [make_grad((n,), dtype, DEVICE, seed=n) for n in (2, 77, 4096, 9001)]
    inputs = [g.clone() for g in grads]
    stats = tb.statistics(grads, 1e-10, 0)
    assert stats.shape == (4, 4)
    assert stats.dtype == torch.float64
    for g, x in zip(grads, inputs):
        assert torch.equal(g, x), "the statistics stage must not modify the tensors"
    for (mean, std, inv, wide), x in zip(stats.cpu(), inputs):
        v = x.double().cpu()
        # The mean is accurate relative to the spread (what z-scores need), not to its own size.
        torch.testing.assert_close(mean, v.mean(), atol=1e-7 * float(v.std()), rtol=0)
        torch.testing.assert_close(std, v.std(correction=0), atol=0, rtol=1e-6)
        torch.testing.assert_close(1 / inv, v.std(correction=0) + 1e-10, atol=0, rtol=1e-6)
        assert wide == 0.0
        z = (v - mean) * inv
        torch.testing.assert_close(z, float64_znorm(x), atol=1e-6, rtol=0)


def test_eps_keeps_its_float64_value(tb):
    # The kernel takes eps as the bits of its float64 value: inv = 1 / (std + eps) exactly as in float64, for
    # an eps that float32 would round (a float kernel argument is float32 on a GPU), and for eps = 0.
    x = torch.tensor([0.0, 1e-44, 3e-44], device=DEVICE)
    for eps in (1e-45, 3e-45, 0.0):
        _, std, inv, _ = tb.statistics([x], eps, 0)[0].tolist()
        assert inv == 1.0 / (std + eps), (eps, inv, 1.0 / (std + eps))


def test_statistics_stage_extremes(tb):
    """Constant tensors get multiplier 0 and their value as mean (exact zeros); a spread beyond float32's
    comfortable range is flagged for the float64 normalize path."""
    constant = torch.full((5000,), 0.1, device=DEVICE)
    huge = make_grad((300,), device=DEVICE, std=1e20)
    tiny = make_grad((300,), device=DEVICE, std=1e-32, mean=0.0)
    stats = tb.statistics([constant, huge, tiny], 0.0, 0).cpu()
    assert stats[0, 0] == constant[0].double() and stats[0, 2] == 0.0
    assert stats[1, 3] == 0.0, "a spread of 1e21 stays on the float32 path"
    assert stats[2, 3] == 1.0, "1/std near 1e32 is beyond 2**100: float64 path"
    wider = make_grad((300,), device=DEVICE, std=1e36)
    assert tb.statistics([wider], 1e-10, 0).cpu()[0, 3] == 1.0


def test_triton_backend_serves_cpu_only_under_interpreter(monkeypatch):
    from znorm_kernels.backends import triton_host as triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_backend.serves("triton", torch.device("cpu")) is not None
    assert triton_backend.serves("triton", torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.serves("triton", torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_for_cuda():
    assert registry.resolve_backend("auto", "cuda") == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda(tb):
    grads = [make_grad((n,), device="cuda", seed=n) for n in (3, 5000, 300_000)]
    tb.znorm_group_(grads, 1e-10, 0, None)  # build the plan (its table copy may synchronize once)
    scale = torch.tensor(8.0, device="cuda")  # made before: a copy from a Python number synchronizes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        znorm_kernels.znorm_(grads, backend="triton")
        znorm_kernels.znorm_(grads, backend="triton", grad_scale=scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
    reason="needs a CUDA device with 40 GiB",
)
def test_more_than_2_31_elements_bfloat16(tb):
    n = 2**31 + 3
    g = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    g.copy_(torch.arange(n, device="cuda", dtype=torch.float32).remainder_(1000).sub_(500))
    g[-1] = 7.0  # past 2**31: indexing there must be 64-bit
    # Expected from float64 statistics of the same values, computed in slices.
    total, sq = 0.0, 0.0
    for s in range(0, n, 2**28):
        part = g[s : s + 2**28].double()
        total += float(part.sum())
    mean = total / n
    for s in range(0, n, 2**28):
        part = g[s : s + 2**28].double()
        sq += float(((part - mean) ** 2).sum())
    std = (sq / n) ** 0.5
    tail_in = g[-5:].double().clone()
    head_in = g[:5].double().clone()
    znorm_kernels.znorm_([g], backend="triton")
    for got, x in ((g[-5:], tail_in), (g[:5], head_in)):
        expected = (x - mean) / (std + 1e-10)
        assert ((got.double() - expected).abs() <= 1e-5 + expected.abs() * 2**-8).all()


@pytest.mark.parametrize("programs", [2, 5])
def test_several_programs_share_the_queue_and_the_last_resets(tb, plans, launches, programs):
    # Under the interpreter programs run one after another: the first drains the queue, the others find it
    # empty; whichever leaves last must reset the counters for the next launch.
    grads = [make_grad((n,), device=DEVICE, seed=n) for n in (3, 100, 1000)]
    inputs = [g.clone() for g in grads]
    for _ in range(2):  # the second launch needs the first to have reset the counters
        for g, x in zip(grads, inputs):
            g.copy_(x)
        tb.znorm_group_(grads, 1e-10, 0, None, tiles=Tiles(64, programs=programs))
        for g, x in zip(grads, inputs):
            assert_close_to_float64(g, x)
    assert launches == [(programs,), (programs,)]
    plan = next(iter(plans.values()))
    assert int(_counters(plan, grads[0].device).abs().sum()) == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_hook_steps_reuse_the_bound_plan(tb, plans, launches, channels_last):
    # The hook binds the group to the gradients' addresses, with a plan of its own; later steps skip the
    # plan look-up.
    from torch import nn

    from znorm_kernels import reference
    from znorm_kernels.backends import triton_plan

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(2, 3, 8, 8))
    net = net.to(DEVICE)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    znorm_kernels.register(opt, backend="triton")
    built = triton_plan.counts.built
    for step in range(3):
        opt.zero_grad(set_to_none=False)
        x = torch.randn(2, 3, 8, 8, device=DEVICE)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        net(x).square().sum().backward()
        expected = [p.grad.clone() for p in net.parameters()]
        for e in expected:
            reference.znorm_tensor_(e)
        opt.step()
        for p, e in zip(net.parameters(), expected):
            torch.testing.assert_close(p.grad, e, atol=2e-6, rtol=0)
        assert len(launches) == step + 1
    assert triton_plan.counts.built == built + 1 and not plans, "one plan, the bound group's own"


def test_bound_group_sees_a_new_dtype_at_the_old_addresses(tb, launches):
    # model.half() with set_to_none gradients can put float16 gradients at the float32 ones' addresses; the
    # bound plan's chunk addresses are in bytes of the old dtype, so the bound run must not use it then.
    buf = torch.zeros(2 * 20_000 + 64, dtype=torch.float32, device=DEVICE)
    old = [buf[:20_000], buf[20_032 : 20_032 + 100]]
    for k, t in enumerate(old):
        t.copy_(make_grad(t.shape, device=DEVICE, seed=k))
    run = tb.bind(old)
    half = buf.view(torch.float16)
    new = [half[:20_000], half[40_064 : 40_064 + 100]]
    assert [t.data_ptr() for t in new] == [t.data_ptr() for t in old]
    for k, t in enumerate(new):
        t.copy_(make_grad(t.shape, dtype=torch.float16, device=DEVICE, seed=10 + k))
    inputs = [t.clone() for t in new]
    between = half[20_000:40_064].view(torch.int16).clone()  # bits: old float32 bytes may read as NaN
    run(new, 1e-10, 0, None)
    for t, x in zip(new, inputs):
        assert_close_to_float64(t, x)
    assert torch.equal(half[20_000:40_064].view(torch.int16), between), "nothing written outside the new ones"


def test_statistics_of_a_constant_tensor_have_std_zero_exactly(tb):
    # Over several chunks the merge of the chunk means can leave a rounding residue (float64 1/3 repeated);
    # a constant tensor's std is 0 all the same, its mean its value, its multiplier 0.
    from znorm_kernels.backends import triton_host

    for x in (torch.full((6_151,), 1 / 3, dtype=torch.float64, device=DEVICE), torch.full((9_000,), 0.1)):
        mean, std, inv, _ = triton_host.statistics([x.to(DEVICE)], 1e-10, 0)[0].tolist()
        assert std == 0.0 and inv == 0.0 and mean == x[0].item()


def _rows_of(xs: list[torch.Tensor], unknown_bounds: bool = False) -> torch.Tensor:
    """float64 [T, 5] (count, mean, M2, min, max) of whole tensors, as the DTensor path merges them; with
    ``unknown_bounds`` the (-inf, +inf) that the statistics stage reports for a non-constant tensor."""
    rows = []
    for x in xs:
        v = x.detach().double().reshape(-1)
        lo, hi = v.min(), v.max()
        if unknown_bounds and bool(lo != hi):
            lo, hi = v.new_tensor(float("-inf")), v.new_tensor(float("inf"))
        mean = v.mean()
        rows.append(torch.stack([v.new_tensor(float(v.numel())), mean, ((v - mean) ** 2).sum(), lo, hi]))
    return torch.stack(rows).to(xs[0].device)


@pytest.mark.parametrize("unknown_bounds", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_given_statistics(tb, dtype, unknown_bounds):
    # apply_ with rows from apply_rows: the kernel's normalize pass alone (small items, chunked and grouped
    # large ones), within rule 10 of the float64 z-scores; constants exactly 0; the tensors' own statistics
    # are not recomputed (a wrong row shows); no normalize item waits (no statistics item publishes).
    unroll, prefetch = LARGE_LOADS.get(dtype, DEFAULT_LARGE_LOADS)  # as shipped for lists with a large tensor
    tiles = Tiles(64, unroll, prefetch=prefetch, large_tensor=100)
    sizes = [1, 2, 7, 64, 65, 300, 1000, 2053]
    xs = [make_grad((n,), dtype, DEVICE, seed=n) for n in sizes]
    xs[6][500] = 3e3  # an outlier inside a grouped tile
    xs.append(torch.full((700,), 0.25, dtype=dtype, device=DEVICE))  # constant, chunked
    xs.append(torch.full((5,), -1.5, dtype=dtype, device=DEVICE))  # constant, small
    grads = [x.clone() for x in xs]
    rows = tb.apply_rows(_rows_of(xs, unknown_bounds), 1e-10, 0)
    assert rows.shape == (len(xs), 4) and rows.dtype == torch.float64
    tb.set_spin_limit(1000)  # a normalize item that waited would give up and report
    try:
        tb.apply_(grads, rows, tiles=tiles)
    finally:
        tb.set_spin_limit(0)
    for g, x in zip(grads[1:-2], xs[1:-2]):
        assert_close_to_float64(g, x)
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))  # one element: (x - x) * inv
    for g in grads[-2:]:
        assert torch.equal(g, torch.zeros_like(g))
    # The rows are what is applied: a shifted mean shifts every result by -shift * inv.
    shifted = rows.clone()
    shifted[:, 0] += 1.0 / shifted[:, 2].clamp(min=1.0)
    again = [x.clone() for x in xs]
    tb.apply_(again, shifted, tiles=tiles)
    assert not torch.equal(again[3], grads[3]) and not torch.equal(again[4], grads[4])  # small and chunked


def test_apply_rows_matches_the_kernels_own(tb):
    # The rows the host computes from merged statistics agree with those the statistics stage publishes: mean
    # and std to float64 rounding, inv to rounding, the same constant and wide decisions; a grad scale too.
    xs = [make_grad((n,), torch.float32, DEVICE, seed=n) for n in (2, 50, 9000)]
    xs.append(torch.full((40,), 3.0, device=DEVICE))
    xs.append(make_grad((30,), torch.float32, DEVICE, seed=1) * 1e35)  # a spread beyond 2**100: wide
    for scale in (None, torch.tensor(512.0, device=DEVICE)):
        # eps 0.5 (a power of two, exact in the kernel's float32 argument) against stds near 1: s * eps shows.
        for eps, correction in ((1e-10, 0), (0.0, 1), (0.5, 0)):
            want = tb.statistics(xs, eps, correction, scale)
            for unknown_bounds in (False, True):  # the stage's rows: sqrt(M2) decides "wide" in their stead
                got = tb.apply_rows(_rows_of(xs, unknown_bounds), eps, correction, scale)
                torch.testing.assert_close(got[:, :3], want[:, :3], rtol=1e-6, atol=0)
                assert torch.equal(got[:, 3], want[:, 3]), (got[:, 3], want[:, 3])
            assert got[3, 2] == 0 and got[3, 1] == 0 and got[3, 0] == 3.0
    # eps reaches the kernel with its float64 value (1e-45 as a float32 would be 1.4e-45, 40% off, beside a
    # standard deviation of 5e-45): the same rows here and there.
    tiny = torch.tensor([0.0, 1e-44], device=DEVICE)
    want = tb.statistics([tiny], 1e-45, 0)
    got = tb.apply_rows(_rows_of([tiny]), 1e-45, 0)
    torch.testing.assert_close(got[:, :3], want[:, :3], rtol=1e-9, atol=0)
    # NaN propagates to the rows (and from there to the output: rule 4).
    nan = make_grad((20,), torch.float32, DEVICE, seed=2)
    nan[3] = float("nan")
    assert bool(tb.apply_rows(_rows_of([nan]), 1e-10, 0)[0, :3].isnan().any())

"""The Triton queue's tickets: runs of chunks cut by guided self-scheduling (issue #23).

A statistics ticket computes a run of consecutive chunks of one tensor, each into its own partial slot, and a
normalize ticket covers the same run; the runs are cut per list (tiles.ticket_runs), long ones first and
one-chunk ones at the end, in the list's order. None of that may change a bit: a tensor's chunks keep the
length of its own size alone. The table's properties are checked in pure Python (fast); the bits through the
kernel, under the interpreter on a CPU host, with small tiles so that tensors have many short chunks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import znorm_kernels
from tests.utils import assert_close_to_float64, make_grad
from znorm_kernels.backends import triton_plan as tp
from znorm_kernels.backends.tiles import MAX_TICKET, RUN_DIVISOR, Tiles, ticket_runs
from znorm_kernels.backends.triton_grid import ASSUMED_PROGRAMS, resident_programs

pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

ITEM = tp.ITEM
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_only = pytest.mark.skipif(
    "triton" not in znorm_kernels.available_backends(), reason="Triton backend not available"
)

# Small tiles: chunks of 2 tiles (32 elements) up to 100 elements, of 3 tiles (48) above; merges of more than
# merge_block partials.
SMALL = Tiles(16, mid_chunk=2, large_chunk=3, large_tensor=100, merge_block=8)
# (run, programs): one chunk per ticket (as before #23), runs of 2 and 3, one ticket per tensor, and the
# rule's runs for the assumed H100 grid and for a few programs (which cuts longer runs).
VARIANTS = [(1, None), (2, 3), (3, 7), (1000, 1), (None, None), (None, 1), (None, 3)]


# --- the run rule and the table (pure Python) ---


def test_ticket_runs_are_guided():
    # One tensor of 100 chunks of 16, one program, divisor 2: each run half the elements not yet cut.
    assert ticket_runs([1600], Tiles(16), 1) == ((50, 25, 12, 6, 3, 2, 1, 1),)
    tiles = Tiles(16, mid_chunk=1, large_chunk=4, large_tensor=1000)
    numels = [10, 16, 100, 5000, 40]
    runs = ticket_runs(numels, tiles, 2)
    assert runs[0] == runs[1] == () and runs[4] == (1, 1, 1)  # small tensors have no chunks
    assert [sum(r) for r in runs] == [0, 0, 7, 79, 3]  # chunks of 16, and of 4 tiles above large_tensor
    assert runs[2] == (7,)  # a quarter of the 5140 elements: all of the first tensor
    elements = [min((sum(r[:i]) + k) * c, n) - sum(r[:i]) * c for r, n, c in
                ((runs[3], 5000, 64),) for i, k in enumerate(r)]  # fmt: skip
    assert elements[:3] == [1216, 896, 704] and elements[-1] == 8  # 19, 14, 11 chunks ... the remainder
    assert elements[:-1] == sorted(elements[:-1], reverse=True)  # long first, shorter and shorter
    assert runs[3][-6:] == (1,) * 6  # the phase ends on one-chunk tickets
    # more programs, shorter runs; never less than one chunk, however many programs
    assert ticket_runs(numels, tiles, 10_000) == ((), (), (1,) * 7, (1,) * 79, (1, 1, 1))
    assert max(ticket_runs(numels, tiles, 8)[3]) < max(runs[3])
    assert max(ticket_runs(numels, dataclasses.replace(tiles, run_divisor=1), 2)[3]) > max(runs[3])
    # a fixed run wins, for every chunked tensor, up to MAX_TICKET elements
    fixed = ticket_runs(numels, dataclasses.replace(tiles, run=5), 2)
    assert fixed == ((), (), (5, 2), (5,) * 15 + (4,), (3,))
    huge = Tiles(16, run=1 << 40)  # chunks of 16 * 32 elements above 2**20 elements... and 2**30
    assert ticket_runs([10**12], huge, 1)[0][0] == MAX_TICKET // 512
    assert ticket_runs([10**12], Tiles(16), 1)[0][0] == MAX_TICKET // 512
    assert Tiles(16).run_divisor == RUN_DIVISOR


def test_chunks_of_large_tensors_depend_on_their_size_alone():
    tiles = Tiles(8192)
    assert tiles.chunk(8193) == tiles.chunk(1 << 20) == 8192  # one tile up to 2**20 elements
    assert tiles.chunk((1 << 20) + 1) == 8 * 8192  # then 8 tiles...
    assert tiles.chunk(8192 * 8 * 1024) == 8 * 8192  # ...while that makes at most 1024 chunks
    assert tiles.chunk(8192 * 8 * 1024 + 1) == 16 * 8192  # then doubled
    assert tiles.chunk(10**12) == 32 * 8192  # up to 32 tiles
    assert -(-100_000_000 // tiles.chunk(100_000_000)) <= 1024


def test_the_programs_a_plan_is_cut_for():
    assert resident_programs(torch.device("cpu")) == ASSUMED_PROGRAMS == 264  # an H100's, off CUDA
    assert resident_programs(torch.device("cpu"), 7) == 7
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert resident_programs(torch.device("cuda", 0)) == 2 * sms


def _parse(rows: list[int], s: int, m: int, p: int, t: int):
    """The table's parts: chunk records, small items, normalize records, tensors, starts."""
    records = [tuple(rows[i : i + ITEM]) for i in range(0, len(rows), ITEM)]
    chunks, small, normalize = records[:p], records[p : p + m], records[p + m : p + m + s]
    tensors = records[p + m + s : p + m + s + t]
    starts = rows[ITEM * (p + m + s + t) :]
    assert len(starts) == -(-s // ITEM) * ITEM and not any(starts[s:]), "starts: S of them, zero-padded rows"
    return chunks, small, normalize, tensors, starts[:s]


def check_table(numels, elsize: int, tiles: Tiles, programs: int) -> None:
    """Every property of the table the kernel relies on (a record's address is its byte offset in its
    tensor)."""
    rows, s, m, p = tp.table(numels, elsize, tiles, programs)
    chunks, small, normalize, tensors, starts = _parse(rows, s, m, p, len(numels))
    runs = ticket_runs(numels, tiles, programs)
    large = [i for i, n in enumerate(numels) if n > tiles.block]
    assert m == len(numels) - len(large)
    assert small == [(0, n, i, 0) for i, n in enumerate(numels) if n <= tiles.block]

    # The tensor records, and each chunk's slot: a tensor's chunks have slots first .. first + chunks - 1.
    slot = 0
    for i, (n, chunk, first, nchunks) in enumerate(tensors):
        if i not in large:
            assert (n, chunk, first, nchunks) == (numels[i], 0, 0, 0)
            continue
        assert (n, chunk, first, nchunks) == (numels[i], tiles.chunk(n), slot, -(-n // tiles.chunk(n)))
        slot += nchunks
    assert p == slot

    # Statistics tickets: each a run of consecutive chunk records of one tensor, whose last record carries
    # the run's chunks (the amount its program adds to the tensor's counter).
    assert starts[0:1] in ([], [0]) and starts == sorted(starts) and len(set(starts)) == s
    seen = [0] * p
    cut: dict[int, list[int]] = {t: [] for t in large}
    added = dict.fromkeys(large, 0)
    tickets = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < s else p
        run = chunks[start:end]
        t = run[0][2]
        n, chunk, first, nchunks = tensors[t]
        c = (run[0][3] & 0xFFFFFFFF) - first
        assert len(run) == runs[t][len(cut[t])], "the runs of ticket_runs, in order"
        cut[t].append(len(run))
        for j, (addr, count, owner, aux) in enumerate(run):
            last = j == len(run) - 1
            assert owner == t and aux == (first + c + j) | ((len(run) << 32) if last else 0)
            assert addr == (c + j) * chunk * elsize and count == min(chunk, n - (c + j) * chunk)
            seen[first + c + j] += 1
        added[t] += len(run)
        tickets.append((sum(r[1] for r in run), t, c))
    assert seen == [1] * p, "every chunk in exactly one run"
    assert all(added[t] == tensors[t][3] for t in large), "a tensor's adds sum to its chunks"

    assert all(tuple(cut[t]) == runs[t] for t in large)
    # In the list's order, tensor by tensor, chunk by chunk.
    assert tickets == sorted(tickets, key=lambda x: (x[1], x[2]))

    # Normalize tickets: the same runs in the same order, one record each, waiting for chunks + 1.
    assert len(normalize) == s
    per_tensor = dict.fromkeys(large, 0)
    for (elements, t, c), (addr, count, owner, aux) in zip(tickets, normalize):
        n, chunk, _, nchunks = tensors[t]
        assert (addr, count, owner, aux) == (c * chunk * elsize, elements, t, nchunks + 1)
        per_tensor[t] += count
    assert all(per_tensor[t] == numels[t] for t in large), "a tensor's normalize runs cover it once"


def test_table_of_a_list_with_runs():
    numels = (0, 1, 2, 16, 17, 33, 64, 100, 101, 300, 1000, 1234)
    for run in (None, 1, 2, 3, 1000):
        for programs in (1, 3, 264):
            check_table(numels, 4, dataclasses.replace(SMALL, run=run), programs)
    _, s, _, p = tp.table(numels, 4, dataclasses.replace(SMALL, run=3), 264)
    assert p == sum(-(-n // SMALL.chunk(n)) for n in numels if n > 16) and s < p


def test_tickets_keep_tensor_and_chunk_order():
    # Three tensors of the same size, cut in runs of 2 chunks: tensor by tensor, chunk by chunk.
    tiles = Tiles(16, run=2)
    numels = (80, 80, 80)  # 5 chunks each: runs of 2, 2, 1
    rows, s, m, p = tp.table(numels, 4, tiles, 1)
    _, _, normalize, _, _ = _parse(rows, s, m, p, 3)
    order = [(r[2], r[0] // 64, r[1]) for r in normalize]  # (tensor, first chunk, elements)
    assert order == [(0, 0, 32), (0, 2, 32), (0, 4, 16), (1, 0, 32), (1, 2, 32), (1, 4, 16),
                     (2, 0, 32), (2, 2, 32), (2, 4, 16)]  # fmt: skip


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    numels=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
    block=st.sampled_from([16, 32]),
    mid=st.integers(1, 3),
    large=st.integers(1, 4),
    large_tensor=st.sampled_from([50, 500, 5000]),
    run=st.one_of(st.none(), st.integers(1, 9)),
    divisor=st.integers(1, 5),
    programs=st.sampled_from([1, 2, 3, 7, 264]),
    elsize=st.sampled_from([2, 4, 8]),
)
def test_every_table_covers_each_chunk_once(numels, block, mid, large, large_tensor, run, divisor,
                                             programs, elsize):  # fmt: skip
    tiles = Tiles(block, mid_chunk=mid, large_chunk=large, large_tensor=large_tensor, run=run,
                  run_divisor=divisor, large_min_chunk=1, max_partials=4)  # fmt: skip
    check_table(tuple(numels), elsize, tiles, programs)


# --- the kernel: the same bits whatever the runs and their order ---


@pytest.fixture
def tb(triton_plans):
    """The Triton host with empty plan caches, and a spin limit: a kernel whose counters never reach the mark
    (a wrong add) raises instead of hanging."""
    from znorm_kernels.backends import triton_host

    triton_host.set_spin_limit(1000)
    yield triton_host
    triton_host.set_spin_limit(0)


def _inputs(dtype) -> list[torch.Tensor]:
    """Tensors of many chunks with short last ones, of 0, 1 and 2 elements, small ones; NaN and inf inside a
    run, an outlier, a constant tensor."""
    sizes = [0, 1, 2, 7, 16, 17, 33, 100, 101, 150, 480, 1000, 1234]
    xs = [make_grad((n,), dtype, DEVICE, seed=n) for n in sizes]
    xs[11][700] = float("nan")  # chunk 15 of 21
    xs[9][100] = float("inf")
    xs[12][500] = 4e3
    xs.append(torch.full((333,), 0.1, dtype=dtype, device=DEVICE))
    return xs


def _bits(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.detach().cpu().view(torch.uint8) if x.numel() else x.cpu() for x in xs]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for i, (x, y) in enumerate(zip(_bits(a), _bits(b))):
        assert torch.equal(x, y), f"{what}: tensor {i} differs"


def _normalized(tb, xs, tiles):
    ys = [x.clone() for x in xs]
    ws = tb.launch(ys, 1e-10, 0, None, tiles=tiles)
    return ys, ws.stats.clone()


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_same_bits_whatever_the_runs_and_the_programs(tb, dtype):
    xs = _inputs(dtype)
    want, want_stats = _normalized(tb, xs, dataclasses.replace(SMALL, run=1))
    plan = tb.last_launch().plan
    assert plan.num_stats_items == plan.num_partials  # one chunk per ticket, as before #23
    for g, x in zip(want[3:8], xs[3:8]):
        assert_close_to_float64(g, x)
    assert want[11].isnan().all() and not want[9].isfinite().all() and torch.equal(want[-1], 0 * want[-1])
    tickets = set()
    for run, programs in VARIANTS[1:]:
        got, stats = _normalized(tb, xs, dataclasses.replace(SMALL, run=run, programs=programs))
        _assert_same(got, want, f"run={run} programs={programs}")
        assert torch.equal(stats.view(torch.int64), want_stats.view(torch.int64))
        plan = tb.last_launch().plan
        tickets.add(plan.num_stats_items)
        assert plan.num_partials == sum(-(-x.numel() // SMALL.chunk(x.numel())) for x in xs if x.numel() > 16)
        assert int(plan.workspaces[0].counters.abs().sum()) == 0
    assert len(tickets) >= 4, "the variants cut different runs"


@triton_only
def test_a_tensors_bits_do_not_depend_on_its_companions(tb):
    # The same tensor in lists whose sizes make the run rule cut its chunks differently, and sort its tickets
    # among others: the same bits.
    x = make_grad((1500,), device=DEVICE, seed=3)
    x[900] = -2e3
    tiles = dataclasses.replace(SMALL, programs=2)
    a, b, c, d = (make_grad((n,), device=DEVICE, seed=n) for n in (5, 9000, 400, 3000))
    lists = [[x], [a, x], [x, b], [c, x, d]]
    outs, runs = [], set()
    for companions in lists:
        ys = [c.clone() for c in companions]
        tb.znorm_group_(ys, 1e-10, 0, None, tiles=tiles)
        outs.append(next(y for y, c in zip(ys, companions) if c is x))
        runs.add(
            ticket_runs([c.numel() for c in companions], tiles, 2)[[c is x for c in companions].index(True)]
        )
    assert len(runs) >= 3, runs
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert_close_to_float64(outs[0], x)


@triton_only
def test_statistics_stage_and_given_rows_with_runs(tb):
    # normalize=False: the rows alone, the tensors untouched; GIVEN: the rows applied (tickets start at the
    # small items, past the statistics tickets, and no normalize ticket waits): the same bits with any runs.
    xs = _inputs(torch.float32)[1:]
    want_rows = tb.statistics([x.clone() for x in xs], 1e-10, 0, tiles=dataclasses.replace(SMALL, run=1))
    want = [x.clone() for x in xs]
    tb.apply_(want, want_rows, tiles=dataclasses.replace(SMALL, run=1))
    for g, x in zip(want[2:7], xs[2:7]):
        assert_close_to_float64(g, x)
    for run, programs in VARIANTS[1:]:
        tiles = dataclasses.replace(SMALL, run=run, programs=programs)
        ys = [x.clone() for x in xs]
        rows = tb.statistics(ys, 1e-10, 0, tiles=tiles)
        _assert_same(ys, xs, "the statistics stage wrote")
        assert torch.equal(rows.view(torch.int64), want_rows.view(torch.int64)), (run, programs)
        tb.apply_(ys, rows, tiles=tiles)
        _assert_same(ys, want, f"given rows, run={run} programs={programs}")


@triton_only
def test_the_workspace_is_sized_by_chunks_and_pooled_by_them(tb):
    # Plans of one list with other runs have other tickets but the same chunks: one pooled workspace, of
    # 4 partials per chunk (made for the first plan, whose tickets are fewer than its chunks).
    xs = [make_grad((n,), device=DEVICE, seed=n) for n in (5, 300, 1000)]
    for run in (5, 2, 1):
        tb.znorm_group_([x.clone() for x in xs], 1e-10, 0, None, tiles=dataclasses.replace(SMALL, run=run))
    plans = list(tp.plans.values())
    assert len(plans) == 3 and len({p.num_stats_items for p in plans}) == 3
    (ws,) = {id(p.workspaces[0]): p.workspaces[0] for p in plans}.values()
    assert ws.partials.numel() == 4 * plans[0].num_partials == 4 * (7 + 21)

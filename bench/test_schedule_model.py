"""The schedule model (bench/schedule_model.py) and its calibration: the queue it builds covers every element
once per phase in the order the design says, its times obey the bounds any schedule must, and its fitted
constants still reproduce the recorded H100 runs."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from bench.schedule_calibration import DESIGNS, FITTED, fitting_set, loss, numels_of, points
from bench.schedule_model import Design, Machine, simulate, tickets_for

LISTS = [
    [5, 100, 64, 65, 1000, 129, 0, 1, 2],
    [10_000, 3, 70_000, 255, 257],
    [1 << 12, 3 * (1 << 12) + 7, 40_000, 11],
]
SMALL = Design(block=64, unroll=2, large_chunk=4, large_tensor=1000)


@pytest.mark.parametrize("numels", LISTS)
@pytest.mark.parametrize("runs", [None, 1, 2, 4])
@pytest.mark.parametrize("max_partials", [None, 2, 16])
def test_every_element_once_per_phase(numels, runs, max_partials) -> None:
    design = replace(SMALL, runs=runs, max_partials=max_partials)
    queue, partials = tickets_for(numels, design, programs=3)
    kinds = [tk.kind for tk in queue]
    # statistics, then small items, then normalize tickets
    assert kinds == sorted(kinds, key=["stat", "small", "norm"].index)
    for t, n in enumerate(numels):
        if n <= design.block:
            assert [tk.elements for tk in queue if tk.tensor == t] == [n]
            assert partials[t] == 0
            continue
        assert sum(tk.elements for tk in queue if tk.kind == "stat" and tk.tensor == t) == n
        assert sum(tk.elements for tk in queue if tk.kind == "norm" and tk.tensor == t) == n
        assert sum(tk.partials for tk in queue if tk.kind == "stat" and tk.tensor == t) == partials[t]
        assert partials[t] == -(-n // design.chunk(n))


def test_partials_depend_on_the_tensor_alone() -> None:
    design = replace(SMALL, max_partials=4)
    assert [design.chunk(n) for n in (65, 256, 257, 1024, 1025, 10**6)] == [64, 64, 128, 256, 256, 256]
    # with runs, a tensor keeps its partials whatever its companions
    alone = tickets_for([5000], replace(design, runs=2), 3)[1]
    mixed = tickets_for([7, 5000, 90_000], replace(design, runs=2), 3)[1]
    assert alone == [mixed[1]]


@pytest.mark.parametrize("largest_first", [False, True])
def test_runs_shrink_to_one_partial_at_the_end(largest_first) -> None:
    numels = [3000, 100_000, 640, 50_000]
    design = replace(SMALL, large_chunk=1, runs=2, largest_first=largest_first)
    queue, _ = tickets_for(numels, design, programs=4)
    for kind in ("stat", "norm"):
        tickets = [tk for tk in queue if tk.kind == kind]
        owners = [tk.tensor for tk in tickets]
        assert owners == sorted(owners, key=[1, 3, 0, 2].index if largest_first else int)
        assert max(tk.elements for tk in tickets) > 8 * design.block  # guided: long tickets first...
        assert all(tk.elements <= design.block for tk in tickets[-4:])  # ...and the last ones a partial
        # within a tensor, a run never outgrows the one before it (the remainder may be shorter still)
        for a, b in itertools.pairwise(tickets):
            assert a.tensor != b.tensor or b.elements <= a.elements
    today = tickets_for(numels, replace(design, runs=None), programs=4)[0]
    assert all(tk.partials == 1 for tk in today)
    owners = [tk.tensor for tk in today if tk.kind == "stat"]
    assert owners == sorted(owners)


def test_one_program_runs_the_tickets_back_to_back() -> None:
    machine = Machine(launch=0.0, merge_fixed=0.0, merge_partial=0.0, wake=0.0, spill=0.0)
    numels = [300, 50, 129]
    design = Design(block=64, unroll=1, large_chunk=1, large_tensor=1 << 20)
    queue, _ = tickets_for(numels, design, 1)
    lat, scale = machine.lat_l2, design.block / 1024
    expected = 0.0
    for tk in queue:
        if tk.kind == "stat":
            group, per = design.block * 4, lat + machine.stat_tile * scale
            expected += machine.stat_fixed + tk.elements * 4 / (group / per)
        elif tk.kind == "norm":
            group, per = 2 * design.block * 4, lat + machine.norm_tile * scale
            expected += machine.norm_fixed + 2 * tk.elements * 4 / (group / per)
        else:
            expected += machine.small_fixed + lat + (machine.stat_tile + machine.norm_tile) * scale
    result = simulate(numels, 4, design, machine, programs=1)
    assert result.time == pytest.approx(expected)
    assert result.busy == pytest.approx(1.0)


@pytest.mark.parametrize("runs", [None, 2])
def test_times_obey_the_bounds_of_any_schedule(runs) -> None:
    numels = [3_000_000, 40_000, 9000, 100, 2_500_000, 0, 1]
    design = Design(runs=runs, max_partials=64 if runs else None)
    total = sum(numels) * 4
    times = [simulate(numels, 4, design, FITTED, programs=p).time for p in (1, 8, 64, 264)]
    # more programs never slower here (no contention at these sizes beyond the shared bandwidth)
    assert times == sorted(times, reverse=True)
    # never faster than three passes over the bytes at the memory system's bandwidth
    bw = FITTED.dram_bw if total > FITTED.l2_bytes else FITTED.l2_bw
    assert times[-1] >= 3 * total / bw
    assert simulate(numels, 4, design, FITTED).time == times[-1]  # the resident grid by default


def test_spans_are_the_tickets_each_once() -> None:
    numels = [70_000, 300, 5000]
    result = simulate(numels, 2, replace(SMALL, runs=2), FITTED, programs=5, record=True)
    queue, _ = tickets_for(numels, replace(SMALL, runs=2), 5)
    assert result.queue == queue  # the tickets the spans index
    assert sorted(k for _, k, _, _ in result.spans) == list(range(len(queue)))
    for program in range(5):
        mine = sorted((start, end) for p, _, start, end in result.spans if p == program)
        # a program runs one ticket at a time
        assert all(a[1] <= b[0] + 1e-9 for a, b in itertools.pairwise(mine))
    assert max(end for *_, end in result.spans) + FITTED.launch == pytest.approx(result.time)


def test_the_fitted_constants_reproduce_the_recorded_runs() -> None:
    pts = points()
    assert len(pts) == 186  # every Triton row of the second and third H100 runs
    fit = fitting_set(pts, FITTED)
    assert math.sqrt(loss(fit, FITTED)) < 0.11
    # and the fit is not a flat line: a machine with other constants does worse
    assert loss(fit, replace(FITTED, stat_tile=FITTED.stat_tile * 2)) > loss(fit, FITTED)


def test_each_further_chunk_of_a_run_costs_a_record() -> None:
    numels = [5000, 70, 3000]
    design = replace(SMALL, runs=1)
    queue, _ = tickets_for(numels, design, 1)
    extra = sum(tk.partials - 1 for tk in queue if tk.kind == "stat")
    assert extra > 0
    free = simulate(numels, 4, design, replace(FITTED, chunk_fixed=0.0), programs=1).time
    paid = simulate(numels, 4, design, replace(FITTED, chunk_fixed=1.5), programs=1).time
    assert paid - free == pytest.approx(1.5 * extra)


def test_the_timeline_draws_the_model_spans(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from bench.timeline import Span, draw, model_spans, summary

    spans = model_spans("resnet56", "bfloat16", "until #23")
    assert {s.kind for s in spans} == {"stat", "small", "norm"}
    facts = summary(spans, FITTED.resident)
    result = simulate(
        numels_of("resnet56"), 2, DESIGNS["until #23"]("bfloat16", numels_of("resnet56")), FITTED
    )
    assert facts["length"] + FITTED.launch == pytest.approx(result.time)
    assert facts["busy"] == pytest.approx(result.busy)
    assert facts["tail"] == pytest.approx(result.tail)
    path = draw(spans, tmp_path / "t.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two = [Span(0, "stat", 0.0, 2.0), Span(1, "norm", 1.0, 4.0)]
    assert summary(two) == {"length": 4.0, "busy": pytest.approx(5 / 8), "tail": 2.0}


def test_measured_spans_come_from_the_timeline_variant() -> None:
    # Under the interpreter (no GPU timer: times 0) every ticket of the shipped plan is recorded once, with
    # the queue's kinds; spans_of reads the rows' fields (program in the low 32 bits, SM above; -1 unrun).
    import torch

    from bench.timeline import Span, measured_spans, spans_of
    from znorm_kernels.backends import triton_host

    if torch.cuda.is_available():
        pytest.skip("the interpreter's form (on a GPU, gpu_check.sh draws the measured timeline)")
    spans, programs = measured_spans("resnet8", "float32", device="cpu")
    plan = triton_host.last_launch().plan
    assert len(spans) == 2 * plan.num_stats_items + plan.num_small_items
    assert [s.kind for s in spans].count("small") == plan.num_small_items
    assert programs >= 1 and all(s.program == 0 and s.start == s.end == 0.0 for s in spans)
    rows = torch.tensor([[1000, 3000, (5 << 32) | 7, 0], [2000, 2500, 3, 4], [-1, -1, -1, -1]])
    assert spans_of(rows, ["stat", "norm", "small"]) == [Span(7, "stat", 0.0, 2.0), Span(3, "norm", 1.0, 1.5)]


@pytest.mark.parametrize("list_name", ["resnet56", "llm-d512", "plain100m", "resnet50"])
def test_the_model_cuts_the_tickets_the_kernel_runs(list_name) -> None:
    # The model's "runs k=2" design is the shipped table: the same chunks and runs, in the same order.
    import torch

    from znorm_kernels.backends.tiles import ticket_runs, tiles_for

    if list_name == "resnet50":
        pytest.importorskip("torchvision")
    numels = numels_of(list_name)
    tiles = tiles_for(torch.bfloat16, numels)
    shipped = [
        (
            t,
            min((sum(runs[:i]) + k) * tiles.chunk(numels[t]), numels[t])
            - sum(runs[:i]) * tiles.chunk(numels[t]),
            k,
        )
        for t, runs in enumerate(ticket_runs(numels, tiles, FITTED.resident))
        for i, k in enumerate(runs)
    ]
    queue, partials = tickets_for(numels, DESIGNS["runs k=2"]("bfloat16", numels), FITTED.resident)
    assert [(tk.tensor, tk.elements, tk.partials) for tk in queue if tk.kind == "stat"] == shipped
    assert partials == [-(-n // tiles.chunk(n)) if n > tiles.block else 0 for n in numels]

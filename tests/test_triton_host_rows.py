"""The triton backend's host side that runs without a Triton kernel: which devices it serves and when it is
available, what its entry points ask the launch for, and the rows ``apply_rows`` derives from merged
statistics (the DTensor path's), against the formula worked out exactly."""

from __future__ import annotations

from decimal import Decimal, localcontext
from types import SimpleNamespace

import pytest
import torch

from znorm_kernels.backends import triton_host, triton_queue
from znorm_kernels.backends.float64_range import factor_of

_W = 2.0**100  # the kernel's WIDE_SPREAD and WIDE_INV


def test_triton_serves_cuda_tensors_and_cpu_ones_only_under_its_interpreter(monkeypatch):
    why = "Triton takes CUDA tensors (and CPU tensors only under TRITON_INTERPRET=1)"
    for interpret, cpu in (("0", why), ("1", None)):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert triton_host.serves("triton", torch.device("cuda")) is None
        assert triton_host.serves("triton", torch.device("cuda", 1)) is None
        assert triton_host.serves("triton", torch.device("cpu")) == cpu
        assert triton_host.serves("triton", torch.device("meta")) == why


def test_triton_is_unavailable_without_a_gpu_unless_interpreted(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (
        triton_host.unavailable("triton")
        == "no CUDA device (CPU tensors run through Triton only under TRITON_INTERPRET=1)"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert triton_host.unavailable("triton") is None


def test_entry_points_ask_the_launch_for_their_stage(monkeypatch):
    # The kernel cannot run here: a stand-in for the launch records what each entry point asks of it, and
    # writes a marker where the kernel would write z, so the write-back of non-dense views shows too.
    calls = []

    def launch_here(tensors, device, eps, correction, grad_scale, normalize, tiles, plan, given, timeline):
        calls.append(
            (list(tensors), device, eps, correction, grad_scale, normalize, tiles, plan, given, timeline)
        )
        if normalize:
            for t in tensors:
                t.fill_(7.0)
        return SimpleNamespace(stats=torch.zeros(len(tensors), 4, dtype=torch.float64))

    monkeypatch.setattr(triton_queue, "_launch_here", launch_here)
    x, scale, tiles, plan, rows = torch.randn(5), torch.tensor(2.0), object(), object(), torch.zeros(1, 4)
    triton_host.znorm_group_([x], 0.5, 1, scale, tiles=tiles)
    triton_host.statistics([x])  # the library's defaults: eps 1e-10, correction 0
    triton_host.statistics([x], 0.25, 2, scale, tiles=tiles)
    triton_host.statistics([x], 0.25, 2, scale, plan=plan)
    triton_host.apply_([x], rows, tiles=tiles)
    cpu = torch.device("cpu")
    assert [c[1:] for c in calls] == [
        (cpu, 0.5, 1, scale, True, tiles, None, None, None),
        (cpu, 1e-10, 0, None, False, None, None, None, None),
        (cpu, 0.25, 2, scale, False, tiles, None, None, None),
        (cpu, 0.25, 2, scale, False, None, plan, None, None),
        (cpu, 0.0, 0.0, None, True, tiles, None, rows, None),
    ]
    assert all(c[0][0] is x for c in calls), "dense tensors are passed themselves"
    recorded = triton_host.timeline_([x])  # the timeline variant: its plan, and a table of rows to fill
    (*head, plan_given, given, table) = calls[-1][1:]
    assert head == [cpu, 1e-10, 0, None, True, None] and given is None
    assert plan_given.num_tensors == 1 and table.dtype == torch.int64
    tickets = 2 * plan_given.num_stats_items + plan_given.num_small_items
    assert table.shape == (tickets, 4) == recorded.rows.shape
    # A view with gaps is launched as a contiguous stand-in, and the result is written back into it.
    base = torch.zeros(10)
    view = base[::2]
    triton_host.znorm_group_([view], 0.5, 1)
    stand_in = calls[-1][0][0]
    assert stand_in is not view and stand_in.is_contiguous()
    assert torch.equal(base[::2], torch.full((5,), 7.0)) and torch.equal(base[1::2], torch.zeros(5))


def _stats_and_row(values, eps, correction, scale):
    """The float64 (count, mean, M2, min, max) of ``values`` as the kernels keep them (M2 times f**2, f =
    factor_of(min, max)), and the (mean, std, inv, wide) row apply_rows must give, worked out exactly
    (decimal) from the contract: constant -> (value, 0, 0); inv = s / (std + s * eps), 0 where that
    denominator is 0, stored as inv / f; wide = f where f != 1, the spread reaches 2**100 or inv leaves
    [2**-100, 2**100] (0 excluded), else 0."""
    with localcontext() as ctx:
        ctx.prec = 1000  # exact sums of these floats
        n, lo, hi = len(values), min(values), max(values)
        d = [Decimal(v) for v in values]
        mean = sum(d) / n
        m2 = sum((x - mean) ** 2 for x in d)
        f = float(factor_of(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)))
        stats = [float(n), float(mean), float(m2 * Decimal(f) ** 2), lo, hi]
        if lo == hi:
            return stats, [lo, 0.0, 0.0, 0.0 if f == 1 else f]
        dof = max(n - Decimal(correction), Decimal(0))
        std = (m2 / dof).sqrt() if dof > 0 else Decimal("Infinity")
        s = Decimal(1) if scale is None else Decimal(scale)
        denom = std + s * Decimal(eps)
        inv = (s / denom if denom != 0 else Decimal(0)) / Decimal(f)
        w = Decimal(_W)
        wide = f != 1 or Decimal(hi) - Decimal(lo) >= w or inv > w or 0 < inv < 1 / w
        return stats, [float(mean), float(std), float(inv), f if wide else 0.0]


# (values, eps, correction, grad scale): each case sits on one edge of the formula.
_CASES = {
    "plain": ([0.3, -1.2, 2.5, 0.7, 1.1], 1e-10, 0, None),
    "constant": ([0.25] * 5, 1e-3, 0, None),
    "std + eps exactly 1": ([-1.0, 1.0], 0.0, 0, None),
    "eps and scale both count": ([-1.0, 1.0], 0.1, 0, 3.0),
    "correction 1": ([0.5, 2.0, -1.0, 3.5], 1e-10, 1, None),
    "correction leaving half a degree of freedom": ([0.5, 2.0, -1.0], 1e-10, 2.5, None),
    "inv exactly 2**-100 (scaled)": ([-1.0, 1.0], 0.0, 0, 2.0**-100),
    "inv 1.5 * 2**-100 (scaled)": ([-1.0, 1.0], 0.0, 0, 1.5 * 2.0**-100),
    "inv below 2**-100 (scaled)": ([-1.0, 1.0], 0.0, 0, 2.0**-101),
    "inv exactly 2**100": ([-(2.0**-100), 2.0**-100], 0.0, 0, None),
    "inv beyond 2**100": ([-(2.0**-110), 2.0**-110], 0.0, 0, None),
    "spread exactly 2**100, symmetric": ([2.0**99, -(2.0**99), 0.0, 0.0], 0.0, 0, None),
    "spread below 2**100": ([2.0**98, -(2.0**98), 0.0, 0.0], 0.0, 0, None),
    "huge values (statistics scaled)": ([1e300, -1e300, 3e299, 5e299], 1e-10, 0, None),
    "tiny values (statistics scaled)": ([1e-130, -2e-130, 3e-130], 1e-140, 0, 2.0),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_apply_rows_follow_the_formula(case):
    values, eps, correction, scale = _CASES[case]
    stats, want = _stats_and_row(values, eps, correction, scale)
    grad_scale = None if scale is None else torch.tensor(scale)  # float32, as GradScaler keeps it
    got = triton_host.apply_rows(torch.tensor([stats], dtype=torch.float64), eps, correction, grad_scale)
    assert got.dtype == torch.float64 and got.shape == (1, 4)
    mean, std, inv, wide = got[0].tolist()
    assert mean == want[0]
    assert std == pytest.approx(want[1], rel=1e-14, abs=0)
    assert inv == pytest.approx(want[2], rel=1e-14, abs=0)
    assert wide == want[3]


def test_apply_rows_work_in_float64_whatever_the_statistics_dtype():
    rows = [_stats_and_row(v, eps, c, None)[0] for v, eps, c, _ in _CASES.values()]
    stats = torch.tensor(rows, dtype=torch.float64)
    stats = stats[stats[:, 1:].abs().amax(dim=1) < 1e30].float()  # what float32 holds
    got = triton_host.apply_rows(stats, 1e-10, 0.5)
    assert got.dtype == torch.float64
    assert torch.equal(got, triton_host.apply_rows(stats.double(), 1e-10, 0.5))

"""The watch's answer to moved gradients, on sequences of moves hypothesis draws: a move is accepted (MOVED)
exactly where the moved gradients' byte ranges are pairwise disjoint, whatever order they come in and
whatever order the last accepted move left (the watch checks a kept order in one pass and sorts again
otherwise); SAME where nothing moved; and ``addresses()`` always holds the last accepted addresses."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from znorm_kernels import grad_watch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SAME, MOVED, CHANGED = grad_watch.SAME, grad_watch.MOVED, grad_watch.CHANGED
SIZES = (5, 1, 12, 3, 8)  # elements; the 1-element gradient has no range to overlap
BUFFER = 64

pytestmark = pytest.mark.skipif(not grad_watch.enabled(), reason="the native extension is not built")


def _disjoint(offsets: list[int]) -> bool:
    ranges = sorted((o, o + n) for o, n in zip(offsets, SIZES) if n > 1)
    return all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(ranges))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(*(st.integers(0, BUFFER - n) for n in SIZES)), min_size=1, max_size=8))
def test_a_move_is_accepted_exactly_where_the_ranges_are_disjoint(moves):
    buf = torch.zeros(BUFFER)
    params = [nn.Parameter(torch.zeros(n)) for n in SIZES]
    start = [0, 5, 6, 18, 21]  # disjoint, in order
    for p, o in zip(params, start):
        p.grad = buf[o : o + p.numel()]
    watch = grad_watch.new_watch(params)
    assert watch.record([], [list(range(len(params)))], True, False)
    accepted = start
    for offsets in moves:
        offsets = list(offsets)
        for p, o in zip(params, offsets):
            p.grad = buf[o : o + p.numel()]
        expected = SAME if offsets == accepted else MOVED if _disjoint(offsets) else CHANGED
        assert watch.step(1e-10, 0.0, None) == expected, (accepted, offsets)
        if expected == MOVED:
            accepted = offsets
        assert watch.addresses().tolist() == [buf.data_ptr() + 4 * o for o in accepted]

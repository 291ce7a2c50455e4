"""The `cpu` backend's result does not depend on its threads: on lists hypothesis draws (tensors cut into
chunks at and around the chunk size, batches of small ones, mixed dtypes, the parallel path's threshold), any
thread count gives bitwise the one-thread result. More threads than this machine's cores make threads take
items from each other's runs (csrc/cpu_common.h, run_segments)."""

from __future__ import annotations

import pytest
import torch

from tests.test_native import CPU_CHUNK, CPU_PARALLEL_FROM, _op, needs_ext
from tests.utils import make_grad, same_bits

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@st.composite
def cpu_lists(draw) -> list[tuple[int, torch.dtype]]:
    size = st.one_of(
        st.integers(0, 300),  # batched with their neighbours (fewer than 2 elements: left out)
        st.tuples(st.sampled_from([CPU_CHUNK, 2 * CPU_CHUNK, 3 * CPU_CHUNK]), st.integers(-2, 2)).map(sum),
        st.integers(2, 5 * CPU_CHUNK),
    )
    entries = draw(st.lists(st.tuples(size, st.sampled_from(DTYPES)), min_size=1, max_size=14))
    if draw(st.booleans()):  # enough elements in all for the threads
        entries.append((CPU_PARALLEL_FROM + draw(st.integers(0, 5)), draw(st.sampled_from(DTYPES))))
    return entries


@needs_ext
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(entries=cpu_lists(), threads=st.sampled_from([2, 3, 4, 7]))
def test_any_thread_count_gives_the_one_thread_bits(entries, threads):
    inputs = [make_grad((n,), dtype, seed=i) for i, (n, dtype) in enumerate(entries)]
    before = torch.get_num_threads()
    results = []
    try:
        for count in (1, threads):
            torch.set_num_threads(count)
            gs = [x.clone() for x in inputs]
            _op(gs)
            results.append(gs)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert same_bits(a, b)

"""Adam's step counters read and advanced in one native call each (backends/step_counters.py): the values
torch's own add_ gives, in the counters' dtype, recorded as in-place writes; anything else refused before
any counter is touched, and then served by the Python path."""

from __future__ import annotations

import pytest
import torch

from znorm_kernels.backends import native, step_counters

pytestmark = pytest.mark.skipif(native.loaded()[0] is None, reason="the native extension is not built")


def _counters():
    values = ((0.0, torch.float32), (2.0**24, torch.float32), (7.0, torch.float64), (2.0**53, torch.float64))
    return [torch.tensor(v, dtype=d) for v, d in values]


def test_counts_and_add_one_match_torch():
    ours, theirs = _counters(), _counters()
    assert torch.ops.znorm_kernels_C.step_counts(ours) == [float(c) for c in theirs]
    versions = [c._version for c in ours]
    for _ in range(3):
        torch.ops.znorm_kernels_C.add_one_(ours)
        for c in theirs:
            c.add_(1.0)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)  # 2**24 + 1 rounds in float32 as add_ rounds it
    assert [c._version for c in ours] == [v + 3 for v in versions]
    assert step_counters.counts(ours) == [float(c) for c in theirs]


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2), torch.tensor(1, dtype=torch.int64), torch.tensor(1.0, dtype=torch.bfloat16),
     torch.zeros(1, 1)[:, :0], torch.tensor(1.0, dtype=torch.complex64)],
    ids=["two elements", "int64", "bfloat16", "empty", "complex"],
)  # fmt: skip
def test_a_wrong_counter_is_refused_before_any_is_touched(bad):
    counters = [*_counters(), bad.clone()]
    before = [c.clone() for c in counters]
    for op in (torch.ops.znorm_kernels_C.add_one_, torch.ops.znorm_kernels_C.step_counts):
        with pytest.raises(RuntimeError, match="counter 4 must be a one-element float32 or float64 CPU"):
            op(counters)
    for a, b in zip(counters, before):
        assert torch.equal(a, b)


def test_the_python_path_serves_what_the_ops_refuse():
    counters = [torch.tensor(3.0, dtype=torch.bfloat16), torch.tensor(1.5)]
    assert step_counters.counts(counters) == [3.0, 1.5]
    step_counters.add_one_(counters)
    assert counters[0].item() == 4 and counters[1].item() == 2.5
    step_counters.add_one_([])
    assert step_counters.counts([]) == []


def test_an_extension_built_before_the_ops_takes_the_python_path(monkeypatch):
    # torch.ops.znorm_kernels_C without step_counts and add_one_ (an older build): no AttributeError.
    import types

    monkeypatch.setattr(step_counters, "_ops", lambda: types.SimpleNamespace())
    counters = [torch.tensor(2.0), torch.tensor(5.0, dtype=torch.float64)]
    assert step_counters.counts(counters) == [2.0, 5.0]
    step_counters.add_one_(counters)
    assert [c.item() for c in counters] == [3.0, 6.0]

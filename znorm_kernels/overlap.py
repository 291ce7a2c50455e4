"""Rule 11 of the contract: the same memory given twice in one call is normalized once, and tensors that
share only part of their memory are refused (normalizing one would change the other).

``disjoint`` is the quick test over address ranges (each tensor's range runs from its first byte to its
last); where ranges meet, ``duplicates`` decides exactly: the same elements at the same address (the same
tensor, or a view of exactly its elements) are a duplicate, kept once; any other shared byte is an error.
Interleaved views such as ``x[0::2]`` and ``x[1::2]`` share a range but no byte, and are accepted.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .memory import extent, is_dense
from .naming import where

__all__ = ["disjoint", "duplicates", "span"]


def disjoint(starts: list[int], ends: list[int]) -> bool:
    """Whether the address ranges [start, end) (none empty) have no byte in common: with the starts and the
    ends each sorted, the k-th end comes at or before the (k+1)-th start. (If so, at most one range holds any
    address x: ranges started by x number k where S_k <= x < S_k+1, and at least k - 1 of them ended, as
    E_k-1 <= S_k; conversely, disjoint ranges sorted by start are sorted by end too.)"""
    return all(map(operator.le, sorted(ends), itertools.islice(sorted(starts), 1, None)))


def span(t: Tensor) -> int:
    """Bytes from t's first byte to its last (what ``disjoint`` compares)."""
    return extent(t) * t.element_size()


def _same_elements(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one dtype starting at one address are views of exactly the same elements."""
    if a.numel() != b.numel():
        return False
    if a.shape == b.shape and a.stride() == b.stride():
        return True
    # Dense tensors fill [data_ptr, data_ptr + numel) whatever their shape and order.
    return is_dense(a) and is_dense(b)


def _unit_offsets(t: Tensor, base: int, unit: int) -> Tensor:
    """The memory units (of ``unit`` bytes, counted from address ``base``) that t's elements occupy."""
    elements = torch.arange(extent(t), dtype=torch.int64).as_strided(t.shape, t.stride()).reshape(-1)
    per = t.element_size() // unit
    first = (t.data_ptr() - base) // unit + elements * per
    return (first.unsqueeze(1) + torch.arange(per, dtype=torch.int64)).reshape(-1)


def _share_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors whose address ranges intersect have a byte in common (interleaved views such as
    x[0::2] and x[1::2] do not). Dense tensors fill their range, so only other views are looked at closely."""
    if is_dense(a) and is_dense(b):
        return True
    unit = math.gcd(a.element_size(), b.element_size())
    base = min(a.data_ptr(), b.data_ptr())
    ua, ub = _unit_offsets(a, base, unit), _unit_offsets(b, base, unit)
    return bool(torch.isin(ub, ua).any())


def duplicates(items: list, spans: list[tuple], names: Sequence[str] | None, op: str) -> set[int]:
    """Positions that repeat an earlier position's memory exactly (to be skipped); raises ValueError for two
    tensors that share part of their memory. ``spans`` holds (device type, index, start, end, position)."""
    spans.sort(key=lambda s: (s[0], s[1] if s[1] is not None else -1, s[2], s[3]))
    found: set[int] = set()
    active: list[tuple] = []  # earlier spans on the same device that reach past the current start
    for entry in spans:
        device, start = entry[:2], entry[2]
        active = [a for a in active if a[:2] == device and a[3] > start]
        if device[0] == "meta":  # no memory behind meta tensors
            continue
        for other in active:
            i, j = sorted((other[4], entry[4]))
            a, b = items[i], items[j]
            if a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and _same_elements(a, b):
                found.add(j)
            elif _share_memory(a, b):
                raise ValueError(
                    f"{op}: {where(i, names)} and {where(j, names)} share part of their memory; "
                    "normalizing one would change the other (the same tensor twice is fine, a partial "
                    "overlap is not)"
                )
        active.append(entry)
    return found

"""The checks of every call's entries, and their grouping by (device, dtype).

``collect_indices`` validates the entries (nothing is modified when one is bad), drops None, empty and
1-element tensors, applies rule 11 (``overlap``) and groups the rest by (device, dtype), in input order. A
fast path decides the common case (plain strided tensors of supported dtypes in disjoint memory) in a few
C-level passes over the list; the exact path decides everything else and raises the errors. Recent results
are kept (``check_cache``) for calls that pass the same tensors again.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .check_cache import recent_checks
from .memory import extent
from .naming import where
from .overlap import disjoint, duplicates, span
from .tensor_types import PLAIN_TYPES

__all__ = ["SUPPORTED_DTYPES", "as_items", "check_and_group", "collect", "collect_indices"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)


def _rejection(i: int, t: object, names: Sequence[str] | None, op: str) -> TypeError:
    """The TypeError for an entry that is not a dense real floating tensor, naming what is wrong."""
    at = where(i, names)
    if not isinstance(t, Tensor):
        return TypeError(f"{op}: {at} is a {type(t).__name__}, expected a Tensor or None")
    if t.layout != torch.strided:
        return TypeError(f"{op}: {at} is sparse ({t.layout}); ZNorm needs dense gradients")
    if t.is_complex():
        return TypeError(f"{op}: {at} is complex ({t.dtype}); ZNorm needs real gradients")
    return TypeError(f"{op}: {at} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64")


def as_items(tensors: Tensor | Iterable[Tensor | None], op: str) -> list:
    """The entries of a call as a list (one tensor becomes a list of one)."""
    if isinstance(tensors, Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable):
        raise TypeError(f"{op}: expected an iterable of tensors, got {type(tensors).__name__}")
    return list(tensors)


def collect_indices(
    tensors: Tensor | Iterable[Tensor | None], names: Iterable[str] | None = None, *, op: str = "znorm_"
) -> tuple[list, dict[tuple[torch.device, torch.dtype], list[int]]]:
    """Validate the entries; return them as a list and the positions to normalize grouped by (device, dtype),
    in input order.

    None, empty and 1-element tensors are dropped. Sparse, complex or non-floating tensors raise TypeError
    naming the position (and the parameter's name when ``names`` gives it); nothing has been modified then.
    The same memory given twice (the same tensor, or a view of exactly the same elements) is kept once, at its
    first position; tensors that share only part of their memory raise ValueError naming both positions.
    A call whose entries are at a recent call's addresses with its layouts (the same first tensor object)
    reuses that call's result (``check_cache``); the groups are then a ``CheckedGroups``, whose ``memo`` lives
    as long as that result holds (so what callers keep there is made on a list's second call, not for lists
    seen once).
    """
    items = as_items(tensors, op)
    groups = recent_checks.get(items)
    if groups is None:
        seen: list = []
        groups = check_and_group(items, names, op, seen)
        recent_checks.put(items, groups, *seen)
    return items, groups


def collect(
    tensors: Tensor | Iterable[Tensor | None], names: Iterable[str] | None = None, *, op: str = "znorm_"
) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """Validate the entries and group the tensors to normalize by (device, dtype): see collect_indices."""
    items, groups = collect_indices(tensors, names, op=op)
    return {key: [items[i] for i in idx] for key, idx in groups.items()}


def check_and_group(
    items: list, names: Iterable[str] | None, op: str, seen: list | None = None
) -> dict[tuple, list[int]]:
    """The checks and grouping of ``collect_indices``, without its cache: the fast path for the common case,
    else the exact one, which decides every other case and raises the errors. The fast path appends to
    ``seen`` what it read that the cache keeps."""
    groups = _fast_groups(items, seen)
    if groups is None:
        groups = _exact_groups(items, list(names) if names is not None else None, op)
    return groups


_NoneType = type(None)
_data_ptr, _is_contiguous, _numel = Tensor.data_ptr, Tensor.is_contiguous, Tensor.numel
_itemsize_of = operator.attrgetter("itemsize")


def _group_by_device_and_dtype(tensors: list[Tensor]) -> dict:
    """{(device, dtype): positions in ascending order}, grouped in C (as torch's foreach optimizers do)."""
    grouped = torch._C._group_tensors_by_device_and_dtype([tensors], True)
    return {key: idx for key, (_, idx) in grouped.items()}


if not hasattr(torch._C, "_group_tensors_by_device_and_dtype"):  # pragma: no cover (private torch API)

    def _group_by_device_and_dtype(tensors: list[Tensor]) -> dict:
        groups: dict = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        return groups


def _fast_groups(items: list, seen: list | None = None) -> dict[tuple, list[int]] | None:
    """The result of ``_exact_groups`` for the common case, or None when the exact path must decide.

    It reads each attribute for all tensors in one C-level pass and leaves to the exact path: an entry that
    is not a plain tensor or None, a tensor without storage (sparse), an unsupported dtype, a meta tensor, a
    non-contiguous tensor whose elements share memory, and any two tensors whose address ranges intersect (a
    duplicate, a partial overlap, interleaved views). ``seen``, when given, receives (present entries, their
    addresses) on success."""
    kinds = set(map(type, items))
    positions = None
    if _NoneType in kinds:
        kinds.discard(_NoneType)
        positions = [i for i, t in enumerate(items) if t is not None]
        present = [items[i] for i in positions]
    else:
        present = items
    if not kinds <= PLAIN_TYPES:
        return None
    if not present:
        return {}
    try:
        starts = list(map(_data_ptr, present))  # raises for tensors without storage (sparse, mkldnn)
        numels = list(map(_numel, present))
        contiguous = list(map(_is_contiguous, present))
        grouped = _group_by_device_and_dtype(present)
    except Exception:  # whatever it is, the exact path reports it
        return None
    if len(grouped) == 1:
        dtype = next(iter(grouped))[1]
        dtypes = [dtype] * len(present)
        itemsizes = itertools.repeat(dtype.itemsize)
    else:
        dtypes = [None] * len(present)
        for (_, dtype), idx in grouped.items():
            for i in idx:
                dtypes[i] = dtype
        itemsizes = map(_itemsize_of, dtypes)
    keep = [n >= 2 for n in numels] if min(numels) < 2 else None  # fewer than 2 elements: dropped
    if not all(contiguous):
        for i in [i for i, c in enumerate(contiguous) if not c]:
            t = present[i]
            if torch._debug_has_internal_overlap(t) == 1:
                return None
            numels[i] = extent(t)  # elements from its first in memory to its last
    ends = list(map(operator.add, starts, map(operator.mul, numels, itemsizes)))
    groups: dict[tuple, list[int]] = {}
    devices: dict[torch.device, list[int]] = {}  # positions per device, for the overlap check
    for key, idx in sorted(grouped.items(), key=lambda kv: kv[1][0]):
        device, dtype = key
        if dtype not in _SUPPORTED or device.type == "meta":
            return None
        if keep is not None:
            idx = list(itertools.compress(idx, map(keep.__getitem__, idx)))
            if not idx:
                continue
        devices.setdefault(device, []).extend(idx)
        groups[key] = idx if positions is None else list(map(positions.__getitem__, idx))
    if len(devices) == 1 and keep is None:
        if not disjoint(starts, ends):
            return None
    else:
        for idx in devices.values():
            if not disjoint(list(map(starts.__getitem__, idx)), list(map(ends.__getitem__, idx))):
                return None
        groups = dict(sorted(groups.items(), key=lambda kv: kv[1][0]))  # tiny ones dropped: re-sort
    if seen is not None:
        seen.append((present, starts))
    return groups


def _exact_groups(items: list, names: Sequence[str] | None, op: str) -> dict[tuple, list[int]]:
    """Check every entry one by one, with the exact rule-11 analysis: the path that raises the errors."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    spans: list[tuple] = []  # memory range of every tensor to normalize, for rule 11 (duplicates, overlaps)
    # The reasons for a rejection are worked out only once an entry is rejected.
    for i, t in enumerate(items):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.layout is not torch.strided or t.dtype not in _SUPPORTED:
            raise _rejection(i, t, names, op)
        if t.numel() < 2:
            continue
        if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(
                f"{op}: {where(i, names)} has elements that share memory (e.g. made by expand()); "
                "an in-place normalization needs distinct elements"
            )
        device = t.device
        groups.setdefault((device, t.dtype), []).append(i)
        start = t.data_ptr()
        spans.append((device.type, device.index, start, start + span(t), i))
    if len(spans) > 1:
        found = duplicates(items, spans, names, op)
        if found:
            groups = {k: [i for i in idx if i not in found] for k, idx in groups.items()}
    return groups

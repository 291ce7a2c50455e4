"""The results of the last few successful checks, for calls that pass the same tensors again.

A result still holds when a call has the same entries (the same tensor objects, and None at the same
positions) at the same addresses with the same dtypes and numbers of elements: that is what the checks read,
but for strides, which only an in-place ``as_strided_`` or ``set_`` at the same address and size changes
(the backends read the strides afresh, so that cannot make them touch other memory). A new tensor object at a
known address (a fresh view) is checked again: it may cover other elements.

The objects are compared by id while all of them live: each entry holds weak references whose callbacks
drop the entry when one of its tensors dies, before its id can be reused. Entries are found by (length, id
of the first entry); a hit costs a few C-level passes over the list, and nothing here keeps a tensor alive.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections import OrderedDict

from torch import Tensor

from .guards import same_addresses

__all__ = ["RecentChecks", "recent_checks"]

_NoneType = type(None)
_dtype_of = operator.attrgetter("dtype")


class RecentChecks:
    """Up to SIZE results of ``validation.check_and_group``, keyed by the lists they were made for."""

    SIZE = 8

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[int, int], tuple] = OrderedDict()

    def get(self, items: list) -> dict[tuple, list[int]] | None:
        """A copy of the groups found for ``items`` by a recent check that still holds, else None."""
        entry = self.entries.get((len(items), id(items[0]))) if items else None
        if entry is None:
            return None
        present_mask, absent_mask, ids, starts, indices, dtypes, sizes, groups, _ = entry
        if present_mask is None:
            present = items
        else:
            present = list(itertools.compress(items, present_mask))
            if not all(map(operator.is_, itertools.compress(items, absent_mask), itertools.repeat(None))):
                return None
        if list(map(id, present)) != ids or not same_addresses(present, starts, indices):
            return None
        if list(map(_dtype_of, present)) != dtypes or list(map(Tensor.numel, present)) != sizes:
            return None
        return {k: list(v) for k, v in groups.items()}

    def put(self, items: list, groups: dict[tuple, list[int]], seen: tuple | None = None) -> None:
        """Keep the result of checking ``items``; ``seen`` is what the fast path read (present entries,
        addresses, numbers of elements, dtypes), else it is read here."""
        if not items or not groups:
            return
        present_mask = absent_mask = None
        if seen is not None:
            present, starts, sizes, dtypes = seen
            if len(present) != len(items):
                present_mask = [t is not None for t in items]
                absent_mask = [t is None for t in items]
        else:
            if _NoneType in set(map(type, items)):
                present_mask = [t is not None for t in items]
                absent_mask = [t is None for t in items]
            present = items if present_mask is None else list(itertools.compress(items, present_mask))
            try:
                starts = list(map(Tensor.data_ptr, present))
            except (TypeError, RuntimeError):  # no storage: not cached
                return
            sizes, dtypes = list(map(Tensor.numel, present)), list(map(_dtype_of, present))
        key = (len(items), id(items[0]))
        entries = self.entries
        token = object()

        def forget(_ref: weakref.ref) -> None:  # one of the entry's tensors died: its id may be reused now
            entry = entries.get(key)
            if entry is not None and entry[-1][1] is token:
                entries.pop(key, None)

        try:
            refs = list(map(weakref.ref, present, itertools.repeat(forget)))
        except TypeError:  # an entry that cannot be referenced weakly: not cached
            return
        entries[key] = (
            present_mask,
            absent_mask,
            list(map(id, present)),
            starts,
            list(range(len(present))),
            dtypes,
            sizes,
            {k: list(v) for k, v in groups.items()},
            (refs, token),  # kept for their callbacks
        )
        entries.move_to_end(key)
        while len(entries) > self.SIZE:
            entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


recent_checks = RecentChecks()

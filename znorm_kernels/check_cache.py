"""The results of the last few successful checks, for calls that pass the same tensors again.

A result still holds when a call has the same entries (tensors, and None at the same positions) at the same
addresses with the same layouts: Python type, dtype, device, dispatch keys, sizes and strides, compared in
one C call (``guards.layout_guard``). That is everything the checks read, so a new tensor object at a known
address with the same layout (a fresh view of the same elements) gets the same answer; one that differs in
anything is checked again.

Entries are found by (length, id of the first entry) and dropped when one of their tensors dies (weak
references whose callbacks remove the entry before an id can be reused); a hit costs two C calls over the
list, and nothing here keeps a tensor alive.

Each entry also holds a ``memo`` dict, handed out with its groups (``CheckedGroups.memo``), where callers keep
what they derived from the list's addresses and layouts (the dispatcher keeps its backends' bound group
functions there): it is reached only through a hit, so only while those still hold, and it goes with the
entry.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections import OrderedDict

from torch import Tensor

from .guards import layout_guard, same_addresses

__all__ = ["CheckedGroups", "RecentChecks", "recent_checks"]

_NoneType = type(None)


class CheckedGroups(dict):
    """The groups of a check, ``{(device, dtype): positions}``, with the ``memo`` of its cache entry."""

    def __init__(self, groups: dict, memo: dict) -> None:
        super().__init__(groups)
        self.memo = memo


class RecentChecks:
    """Up to SIZE results of ``validation.check_and_group``, keyed by the lists they were made for."""

    SIZE = 8

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[int, int], tuple] = OrderedDict()

    def get(self, items: list) -> CheckedGroups | None:
        """A copy of the groups found for ``items`` by a recent check that still holds (with its entry's
        memo), else None."""
        entry = self.entries.get((len(items), id(items[0]))) if items else None
        if entry is None:
            return None
        present_mask, absent_mask, starts, indices, repeats, guard, groups, memo, _ = entry
        if present_mask is None:
            present = items
        else:
            present = list(itertools.compress(items, present_mask))
            if not all(map(operator.is_, itertools.compress(items, absent_mask), itertools.repeat(None))):
                return None
        # Addresses first: they are False for an entry that is not a tensor with storage.
        if not same_addresses(present, starts, indices):
            return None
        if repeats is not None:  # the same tensor at several positions (the guard takes each once)
            first, later, guarded = repeats
            if not all(map(operator.is_, map(present.__getitem__, later), map(present.__getitem__, first))):
                return None
            present = list(itertools.compress(present, guarded))
        if not guard.check(*present):
            return None
        return CheckedGroups({k: list(v) for k, v in groups.items()}, memo)

    def put(self, items: list, groups: dict[tuple, list[int]], seen: tuple | None = None) -> None:
        """Keep the result of checking ``items``; ``seen`` is what the fast path read (present entries and
        their addresses), else it is read here."""
        if not items or not groups:
            return
        present_mask = absent_mask = None
        if seen is not None:
            present, starts = seen
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
        # torch's guard rejects a tensor given twice: it is guarded once, and its later positions must hold
        # the very same object (first positions, later positions, mask of the positions guarded).
        repeats = None
        seen_at: dict[int, int] = {}
        for i, t in enumerate(present):
            seen_at.setdefault(id(t), i)
        if len(seen_at) != len(present):
            later = [i for i, t in enumerate(present) if seen_at[id(t)] != i]
            first = [seen_at[id(present[i])] for i in later]
            repeats = (first, later, [seen_at[id(t)] == i for i, t in enumerate(present)])
        unique = present if repeats is None else list(itertools.compress(present, repeats[2]))
        memo: dict = {}
        entries[key] = (
            present_mask,
            absent_mask,
            starts,
            list(range(len(present))),
            repeats,
            layout_guard(unique),
            {k: list(v) for k, v in groups.items()},
            memo,
            (refs, token),  # kept for their callbacks
        )
        entries.move_to_end(key)
        while len(entries) > self.SIZE:
            entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


recent_checks = RecentChecks()

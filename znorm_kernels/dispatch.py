"""Dispatch: the one place that checks the input of ``znorm_`` and hands it to backends.

``run_znorm_`` validates every entry (nothing is modified when one is bad), drops None, empty and 1-element
tensors, groups the rest by (device, dtype), resolves a backend for each group ("auto" picks the fastest one
that can serve that device), and only then runs the groups. ``BACKENDS`` is the table of backends (fastest
first); each names a module of ``znorm_kernels.backends`` with a function that normalizes a list of
same-device, same-dtype tensors. Imports flow one way: api -> ops -> dispatch -> backends.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import numbers
import operator
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import is_dense, triton_interpret
from .stats import StatsBuffer

__all__ = [
    "BACKENDS",
    "Backend",
    "GradientGroups",
    "available_backends",
    "collect",
    "resolve_backend",
    "run_znorm_",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)

# A backend's group function: (tensors of one device and dtype, eps, correction, grad_scale or None).
GroupFn = Callable[[list[Tensor], float, float, "Tensor | None"], None]


@dataclass(frozen=True)
class Backend:
    """A way to compute ZNorm. ``unavailable()`` says why it cannot run in this process (None: it can);
    ``serves(device)`` says why it cannot take tensors on that device (None: it can)."""

    name: str
    unavailable: Callable[[], str | None]
    serves: Callable[[torch.device], str | None]
    load: Callable[[], GroupFn]


def _module_backend(name: str, module: str) -> Backend:
    """A backend implemented in ``znorm_kernels.backends.<module>``, imported only when first asked about.

    The module provides ``unavailable(name) -> str | None``, ``serves(name, device) -> str | None`` and
    ``group_fn(name) -> GroupFn`` (one module may implement several backends, told apart by name).
    """

    def get():
        return importlib.import_module(f"{__package__}.backends.{module}")

    def unavailable() -> str | None:
        try:
            return get().unavailable(name)
        except ImportError as err:
            if err.name == f"{__package__}.backends.{module}":
                return f"it is not part of this version (no module znorm_kernels.backends.{module})"
            return (
                f"znorm_kernels.backends.{module} cannot be imported ({err})"  # e.g. a dependency is missing
            )

    return Backend(
        name=name,
        unavailable=unavailable,
        serves=lambda device: get().serves(name, device),
        load=lambda: get().group_fn(name),
    )


# Fastest first; "auto" takes, per device, the first one in AUTO_ORDER that is available and serves it.
BACKENDS: dict[str, Backend] = {
    "triton": _module_backend("triton", "triton_host"),
    "cuda": _module_backend("cuda", "native"),
    "cpu": _module_backend("cpu", "native"),
    "reference": _module_backend("reference", "reference"),
}

# Which backends "auto" may choose for a device type, in order of preference (docs/contract.md).
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def _unavailable(name: str) -> str | None:
    return _unavailable_cached(name, triton_interpret())


@functools.cache
def _unavailable_cached(name: str, interpret: bool) -> str | None:
    return BACKENDS[name].unavailable()


@functools.cache
def _group_fn(name: str) -> GroupFn:
    return BACKENDS[name].load()


def _cache_clear() -> None:
    _unavailable_cached.cache_clear()
    _group_fn.cache_clear()
    _resolve_cached.cache_clear()
    _checked.clear()


def available_backends() -> list[str]:
    """The backends usable in this process, fastest first ("reference" is always there)."""
    return [name for name in BACKENDS if _unavailable(name) is None]


_fallback_warned = False


def _warn_fallback_once(device_type: str) -> None:
    """One warning per process when "auto" runs the slow reference because the native extension is missing."""
    global _fallback_warned
    missing = [n for n in AUTO_ORDER.get(device_type, ()) if n in ("cpu", "cuda") and _unavailable(n)]
    if missing and not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"znorm_kernels: backend='auto' falls back to the pure-PyTorch reference for {device_type} "
            f"tensors, because backend {missing[0]!r} is unavailable: {_unavailable(missing[0])}",
            RuntimeWarning,
            stacklevel=4,
        )


def _resolve(backend: str, device_type: str) -> str:
    return _resolve_cached(backend, device_type, triton_interpret())


@functools.cache
def _resolve_cached(backend: str, device_type: str, interpret: bool) -> str:
    device = torch.device(device_type)
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            if name in BACKENDS and _unavailable(name) is None and BACKENDS[name].serves(device) is None:
                if name == "reference":
                    _warn_fallback_once(device_type)
                return name
        return "reference"
    if backend not in BACKENDS:
        known = ", ".join([*BACKENDS, "auto"])
        raise ValueError(f"unknown ZNorm backend {backend!r}; known backends: {known}")
    why = _unavailable(backend)
    if why is None:
        why = BACKENDS[backend].serves(device)
    if why is not None:
        raise RuntimeError(f"ZNorm backend {backend!r} cannot serve tensors on {device_type}: {why}")
    return backend


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend that ``backend`` (a name or "auto") means for tensors on ``device``.
    Raises ValueError for an unknown name, RuntimeError when that backend cannot serve the device."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return _resolve(backend, torch.device(device).type)


# Options already accepted, as (type, value) pairs: the common call skips the checks (NaN never matches).
_accepted_options: set[tuple] = set()


def check_options(eps: float, correction: float, backend: str) -> None:
    """Reject bad scalar options with a clear error (before any tensor is touched)."""
    key = (type(eps), eps, type(correction), correction, type(backend), backend)
    try:
        if key in _accepted_options:
            return
    except TypeError:  # unhashable: _check_options says what is wrong with it
        key = None
    _check_options(eps, correction, backend)
    if key is not None and len(_accepted_options) < 64:
        _accepted_options.add(key)


def _check_options(eps: float, correction: float, backend: str) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if (
        isinstance(correction, bool)
        or not isinstance(correction, numbers.Real)
        or not math.isfinite(correction)
        or correction < 0
    ):
        raise ValueError(f"correction must be a finite number >= 0, got {correction!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        known = ", ".join([*BACKENDS, "auto"])
        raise ValueError(f"unknown ZNorm backend {backend!r}; known backends: {known}")


def _where(position: int, names: Sequence[str] | None) -> str:
    if names is not None and position < len(names) and names[position]:
        return f"tensor at position {position} (parameter {names[position]!r})"
    return f"tensor at position {position}"


def _rejection(i: int, t: object, names: Sequence[str] | None, op: str) -> TypeError:
    """The TypeError for an entry that is not a dense real floating tensor, naming what is wrong."""
    where = _where(i, names)
    if not isinstance(t, Tensor):
        return TypeError(f"{op}: {where} is a {type(t).__name__}, expected a Tensor or None")
    if t.layout != torch.strided:
        return TypeError(f"{op}: {where} is sparse ({t.layout}); ZNorm needs dense gradients")
    if t.is_complex():
        return TypeError(f"{op}: {where} is complex ({t.dtype}); ZNorm needs real gradients")
    return TypeError(f"{op}: {where} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64")


def _as_items(tensors: Tensor | Iterable[Tensor | None], op: str) -> list:
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

    A call with the same tensor objects as a recent one, at the same addresses, with the same dtypes and
    sizes, reuses that call's result (see ``_Checked``).
    """
    items = _as_items(tensors, op)
    groups = _checked.get(items)
    if groups is None:
        seen: list = []
        groups = check_and_group(items, names, op, seen)
        _checked.put(items, groups, *seen)
    return items, groups


def check_and_group(
    items: list, names: Iterable[str] | None, op: str, seen: list | None = None
) -> dict[tuple, list[int]]:
    """The checks and grouping of ``collect_indices``, without its cache: the fast path for the common case
    (plain strided tensors of supported dtypes, in disjoint memory), else the exact one, which decides every
    other case and raises the errors. The fast path appends to ``seen`` what it read that the cache keeps."""
    groups = _fast_groups(items, seen)
    if groups is None:
        groups = _exact_groups(items, list(names) if names is not None else None, op)
    return groups


_NoneType = type(None)
_PLAIN = frozenset((Tensor, torch.nn.Parameter))  # no __torch_function__ of their own
_data_ptr, _is_contiguous = Tensor.data_ptr, Tensor.is_contiguous
_numel, _get_dtype, _get_itemsize = (
    Tensor.numel,
    operator.attrgetter("dtype"),
    operator.attrgetter("itemsize"),
)


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

    It reads each attribute for all tensors in one C-level pass (a few tens of ns per tensor, where a Python
    loop costs several times that) and leaves to the exact path: an entry that is not a plain tensor or None,
    a tensor without storage (sparse), an unsupported dtype, a meta tensor, a non-contiguous tensor whose
    elements share memory, and any two tensors whose address ranges intersect (a duplicate, a partial overlap,
    interleaved views). ``seen``, when given, receives (present entries, their addresses, numbers of elements
    and dtypes) on success."""
    kinds = set(map(type, items))
    positions = None
    if _NoneType in kinds:
        kinds.discard(_NoneType)
        positions = [i for i, t in enumerate(items) if t is not None]
        present = [items[i] for i in positions]
    else:
        present = items
    if not kinds <= _PLAIN:
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
        itemsizes = map(_get_itemsize, dtypes)
    if seen is not None:
        fingerprint = (present, starts, list(numels), dtypes)
    keep = [n >= 2 for n in numels] if min(numels) < 2 else None  # fewer than 2 elements: dropped
    if not all(contiguous):
        for i in [i for i, c in enumerate(contiguous) if not c]:
            t = present[i]
            if torch._debug_has_internal_overlap(t) == 1:
                return None
            numels[i] = _extent(t)  # elements from its first in memory to its last
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
        if not _disjoint(starts, ends):
            return None
    else:
        for idx in devices.values():
            if not _disjoint(list(map(starts.__getitem__, idx)), list(map(ends.__getitem__, idx))):
                return None
        groups = dict(sorted(groups.items(), key=lambda kv: kv[1][0]))  # tiny ones dropped: re-sort
    if seen is not None:
        seen.append(fingerprint)
    return groups


def _disjoint(starts: list[int], ends: list[int]) -> bool:
    """Whether the address ranges [start, end) (none empty) have no byte in common: with the starts and the
    ends each sorted, the k-th end comes at or before the (k+1)-th start. (If so, at most one range holds any
    address x: ranges started by x number k where S_k <= x < S_k+1, and at least k - 1 of them ended, as
    E_k-1 <= S_k; conversely, disjoint ranges sorted by start are sorted by end too.)"""
    return all(map(operator.le, sorted(ends), itertools.islice(sorted(starts), 1, None)))


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
                f"{op}: {_where(i, names)} has elements that share memory (e.g. made by expand()); "
                "an in-place normalization needs distinct elements"
            )
        device = t.device
        key = (device, t.dtype)
        group = groups.get(key)
        if group is None:
            groups[key] = [i]
        else:
            group.append(i)
        start = t.data_ptr()
        spans.append((device.type, device.index, start, start + _extent(t) * t.element_size(), i))
    if len(spans) > 1:
        duplicates = _duplicates(items, spans, names, op)
        if duplicates:
            groups = {k: [i for i in idx if i not in duplicates] for k, idx in groups.items()}
    return groups


class _Checked:
    """The results of the last few successful checks, for calls that pass the same tensors again.

    A result still holds when a call has the same entries (the same tensor objects, and None at the same
    positions) at the same addresses with the same dtypes and numbers of elements: that is what the checks
    read, but for strides, which only an in-place ``as_strided_`` or ``set_`` at the same address and size
    changes (the backends read the strides afresh, so that cannot make them touch other memory). A new tensor
    object at a known address (a fresh view) is checked again: it may cover other elements.

    The objects are compared by id while all of them live: each entry holds weak references whose callbacks
    drop the entry when one of its tensors dies, before its id can be reused. Entries are found by (length,
    id of the first entry); a hit costs a few C-level passes over the list, and nothing here keeps a tensor
    alive.
    """

    SIZE = 8

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[int, int], tuple] = OrderedDict()

    def get(self, items: list) -> dict[tuple, list[int]] | None:
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
        if list(map(id, present)) != ids or not _ptrs_equal(present, starts, indices):
            return None
        if list(map(_get_dtype, present)) != dtypes or list(map(_numel, present)) != sizes:
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
                starts = list(map(_data_ptr, present))
            except (TypeError, RuntimeError):  # no storage: not cached
                return
            sizes, dtypes = list(map(_numel, present)), list(map(_get_dtype, present))
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
        entry = (
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
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.SIZE:
            entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


def _ptrs_equal(tensors: list[Tensor], starts: list[int], indices: list[int]) -> bool:
    """Whether tensors[i].data_ptr() == starts[i] for i in indices; False where one has no address."""
    try:
        return _ptrs_equal_c(tensors, starts, indices)
    except (TypeError, RuntimeError):  # a None, or a tensor without storage
        return False


if hasattr(torch._C, "_tensors_data_ptrs_at_indices_equal"):  # private torch API (CUDA graph trees use it)
    _ptrs_equal_c = torch._C._tensors_data_ptrs_at_indices_equal
else:  # pragma: no cover

    def _ptrs_equal_c(tensors: list, starts: list[int], indices: list[int]) -> bool:
        return all(tensors[i].data_ptr() == starts[i] for i in indices)


_checked = _Checked()


def _extent(t: Tensor) -> int:
    """Elements from t's first to its last in memory (numel for a contiguous tensor)."""
    if t.is_contiguous():
        return t.numel()
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


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
    elements = torch.arange(_extent(t), dtype=torch.int64).as_strided(t.shape, t.stride()).reshape(-1)
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


def _duplicates(items: list, spans: list[tuple], names: Sequence[str] | None, op: str) -> set[int]:
    """Positions that repeat an earlier position's memory exactly (to be skipped); raises ValueError for two
    tensors that share part of their memory. ``spans`` holds (device type, index, start, end, position)."""
    spans.sort(key=lambda s: (s[0], s[1] if s[1] is not None else -1, s[2], s[3]))
    duplicates: set[int] = set()
    active: list[tuple] = []  # earlier spans on the same device that reach past the current start
    for span in spans:
        device, start = span[:2], span[2]
        active = [a for a in active if a[:2] == device and a[3] > start]
        if device[0] == "meta":  # no memory behind meta tensors
            continue
        for other in active:
            i, j = sorted((other[4], span[4]))
            a, b = items[i], items[j]
            if a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and _same_elements(a, b):
                duplicates.add(j)
            elif _share_memory(a, b):
                raise ValueError(
                    f"{op}: {_where(i, names)} and {_where(j, names)} share part of their memory; "
                    "normalizing one would change the other (the same tensor twice is fine, a partial "
                    "overlap is not)"
                )
        active.append(span)
    return duplicates


def collect(
    tensors: Tensor | Iterable[Tensor | None], names: Iterable[str] | None = None, *, op: str = "znorm_"
) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """Validate the entries and group the tensors to normalize by (device, dtype): see collect_indices."""
    items, groups = collect_indices(tensors, names, op=op)
    return {key: [items[i] for i in idx] for key, idx in groups.items()}


def _plan(
    tensors: Tensor | Iterable[Tensor | None], backend: str, names: Iterable[str] | None
) -> tuple[list, list[tuple[GroupFn, list[int]]]]:
    """Validate and group, then resolve every group's backend before any runs (so an unservable request
    modifies nothing): the entries and a list of (group function, positions)."""
    items, groups = collect_indices(tensors, names)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return items, [(_group_fn(_resolve(backend, device.type)), idx) for (device, _), idx in groups.items()]


def as_scale(grad_scale: Tensor | float | None) -> Tensor | None:
    """A GradScaler scale as the 0-d tensor the backends take (a plain number is accepted too)."""
    if grad_scale is None or isinstance(grad_scale, Tensor):
        return grad_scale
    return torch.tensor(float(grad_scale))


def run_znorm_(
    tensors: Tensor | Iterable[Tensor | None],
    eps: float,
    correction: float,
    backend: str,
    grad_scale: Tensor | float | None,
    names: Iterable[str] | None,
    stats: StatsBuffer | None = None,
) -> None:
    """The eager path of ``znorm_``: check, group, resolve every group's backend, then run them. ``stats``
    (the hook's, with DTensor gradients) receives every entry's mean and std."""
    check_options(eps, correction, backend)
    grad_scale = as_scale(grad_scale)
    if _DTENSOR_MODULE in sys.modules:  # DTensors may exist: they go to znorm_kernels.distributed
        tensors = _as_items(tensors, "znorm_")
        dtensors = _dtensor_positions(tensors)
        if dtensors:
            _run_with_dtensors_(tensors, dtensors, eps, correction, backend, grad_scale, names, stats)
            return
    items, plan = _plan(tensors, backend, names)
    for fn, idx in plan:
        fn(_pick(items, idx), float(eps), float(correction), grad_scale)


# --- DTensor routing (FSDP2, tensor parallelism): the one place DTensors leave the single-tensor path. ---
# A DTensor's statistics span ranks, so DTensor entries are split off before the checks and normalized by
# znorm_kernels.distributed.znorm_dtensors_ (one collective per process group); the other entries take the
# normal path. DTensors exist only once torch.distributed.tensor is imported: until then the cost is one
# dict lookup, and after it one set of types per call.
_DTENSOR_MODULE = "torch.distributed.tensor"


def _dtensor_positions(items: list) -> list[int] | None:
    """The positions of DTensor entries in ``items``, or None when there are none."""
    dtensor = getattr(sys.modules.get(_DTENSOR_MODULE), "DTensor", None)
    if dtensor is None or not any(issubclass(k, dtensor) for k in set(map(type, items))):
        return None
    return [i for i, t in enumerate(items) if isinstance(t, dtensor)]


def _run_with_dtensors_(
    items: list,
    dtensors: list[int],
    eps: float,
    correction: float,
    backend: str,
    grad_scale: Tensor | None,
    names: Iterable[str] | None,
    stats: StatsBuffer | None = None,
) -> None:
    """Every entry is checked before any is modified: the plain ones here, the DTensors by znorm_dtensors_
    (which checks them all before it communicates or writes); then the DTensors, then the plain groups.
    ``stats`` gets one buffer per plain group and one for the DTensors (their whole tensors' figures)."""
    from .distributed import znorm_dtensors_

    names = list(names) if names is not None else None
    skip = set(dtensors)
    rest = [None if i in skip else t for i, t in enumerate(items)]
    _, plan = _plan(rest, backend, names)
    outs: list[Tensor | None] = [None] * (len(plan) + 1)
    if stats is not None:
        groups = [(idx, items[idx[0]].device) for _, idx in plan]
        groups.append((dtensors, items[dtensors[0]]._local_tensor.device))
        outs = stats.reset(len(items), groups)
    znorm_dtensors_(
        [items[i] for i in dtensors],
        float(eps),
        float(correction),
        backend,
        grad_scale,
        names=names,
        positions=dtensors,
        stats_out=outs[-1],
    )
    for (fn, idx), out in zip(plan, outs):
        fn(_pick(rest, idx), float(eps), float(correction), grad_scale, stats=out)


def _pick(items: list, idx: list[int]) -> list:
    """items[i] for i in idx (ascending positions): the list itself when idx takes every entry."""
    return items if len(idx) == len(items) else list(map(items.__getitem__, idx))


def _signature(t: Tensor) -> tuple:
    return (type(t), t.dtype, t.device, t.layout, t.shape, t.stride(), t.requires_grad, t.is_neg())


class _PythonGuard:
    """What ``TensorGuards`` checks, in Python (for a torch without it): slower, the same answers."""

    def __init__(self, *tensors: Tensor) -> None:
        self.signatures = list(map(_signature, tensors))

    def check(self, *tensors: Tensor) -> bool:
        try:
            return list(map(_signature, tensors)) == self.signatures
        except (AttributeError, TypeError, RuntimeError):  # not a tensor, or one without strides
            return False


def layout_guard(tensors: list[Tensor]):
    """An object whose ``.check(*others)`` says, in one C call, whether ``others`` match ``tensors`` now in
    everything but their addresses: Python type, dtype, device, dispatch keys (layout, sparse, conj/neg
    views), requires_grad, sizes and strides. ``others`` must have the same length. It is torch's own check
    of a compiled graph's tensor inputs (dynamo's ``TensorGuards``, about 65 ns a tensor); its dispatch keys
    are read under the thread's dispatch state, so a call under another mode (autocast, inference mode) only
    fails to match, it never matches wrongly."""
    if _TensorGuards is not None:
        try:
            return _TensorGuards(
                *tensors,
                dynamic_dims_sizes=[list(t.shape) for t in tensors],
                dynamic_dims_strides=[list(t.stride()) for t in tensors],
            )
        except Exception:  # pragma: no cover (a private torch API that changed): the Python check decides
            pass
    return _PythonGuard(*tensors)


try:  # private torch API, in torch since 2.0
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover
    _TensorGuards = None


class GradientGroups:
    """``znorm_`` for an optimizer's gradients, step after step, without re-validating unchanged lists.

    A step's gradients are usually new tensor objects (``zero_grad(set_to_none=True)``), at the same
    addresses as the step before (the caching allocator hands the same blocks back) or at others. What the
    checks and grouping decide depends only on each present gradient's Python type, dtype, device, layout,
    sizes and strides (which ``layout_guard`` compares in one C call) and its address. Autograd keeps a
    gradient to its parameter's shape, dtype and device, but ``.grad`` can be assigned by hand (a view, a
    transposed tensor) and a parameter's ``.data`` replaced, so nothing is assumed: each call compares all of
    it against the last full check. Then:

    - the same None positions, layouts and addresses: last call's checks, grouping and bound group functions
      hold as they are (a guard call and a pass reading the addresses);
    - the same layouts at other addresses: everything but rule 11 still holds, and where the last check kept
      every tensor of 2 elements or more (no duplicate dropped), disjoint address ranges on each device (each
      range from its tensor's first byte to its last) show there is still no duplicate and no overlap; the
      group functions are bound again to the new addresses (``bound.rebind``, without re-reading layouts);
    - anything else (a None appearing or disappearing, another stride or dtype, ranges that meet): the full
      path of ``run_znorm_``, which raises for bad gradients.
    """

    def __init__(self, eps: float, correction: float, backend: str, stats: StatsBuffer | None = None) -> None:
        check_options(eps, correction, backend)
        self.eps, self.correction, self.backend = float(eps), float(correction), backend
        self.stats = stats  # receives every step's per-tensor mean and std, when given
        self.stats_out: list[Tensor] = []  # per group of self.plan: its float64 [T, 2] statistics
        self.length = -1  # no valid cache: the next call takes the full path
        self.present_mask: list[bool] | None = None  # which entries are tensors (None: all of them)
        self.absent_mask: list[bool] | None = None  # which entries are None
        self.guard = None  # layout_guard of the present gradients at the last full check
        self.starts: list[int] = []  # data_ptr of every present gradient, in order
        self.indices: list[int] = []  # range(len(self.starts)), for the one-call address check
        # Rule 11 for gradients that moved: per device, the positions (among the present gradients) of the
        # normalized ones, and every present gradient's span in bytes; None where the last check dropped a
        # duplicate (a move then takes the full path).
        self.by_device: list[list[int]] | None = None
        self.spans: list[int] = []
        # (group function, the function bound to the present gradients' addresses, positions among the
        # present gradients; None: all of them, in order)
        self.plan: list[tuple[GroupFn, GroupFn, list[int] | None]] = []

    def _present(self, grads: list[Tensor | None]) -> list[Tensor] | None:
        """The present gradients if the cached checks still hold for ``grads`` (binding the groups again if
        they moved), else None."""
        if len(grads) != self.length:
            return None
        if self.present_mask is None:
            present = grads
        else:
            present = list(itertools.compress(grads, self.present_mask))
            if not all(
                map(operator.is_, itertools.compress(grads, self.absent_mask), itertools.repeat(None))
            ):
                return None
        try:
            if not self.guard.check(*present):
                return None
            # The usual step: every gradient where it was (one C call); else their new addresses.
            if _ptrs_equal_c(present, self.starts, self.indices):
                return present
            starts = list(map(_data_ptr, present))
        except (TypeError, RuntimeError):  # not a tensor, or no storage: the full path says what is wrong
            return None
        return present if self._moved(present, starts) else None

    def _moved(self, present: list[Tensor], starts: list[int]) -> bool:
        """The same layouts at new addresses: whether rule 11 still holds (then the groups are bound to the
        new addresses and True returned), else False."""
        if self.by_device is None:
            return False
        ends = list(map(operator.add, starts, self.spans))
        for idx in self.by_device:
            if not _disjoint(list(map(starts.__getitem__, idx)), list(map(ends.__getitem__, idx))):
                return False
        plan = []
        for fn, bound, idx in self.plan:
            rebind = getattr(bound, "rebind", None)
            if rebind is not None:
                if idx is None:
                    bound = rebind(present, tuple(starts))
                else:
                    bound = rebind(list(map(present.__getitem__, idx)), tuple(map(starts.__getitem__, idx)))
            plan.append((fn, bound, idx))
        self.plan, self.starts = plan, starts
        return True

    def _check(self, grads: list[Tensor | None], names: list[str]) -> list[Tensor]:
        """The full path: check and group (raising for bad gradients), bind the groups, cache the key."""
        self.length = -1
        _, plan = _plan(grads, self.backend, names)
        positions = [i for i, g in enumerate(grads) if g is not None]
        if len(positions) == len(grads):
            present, self.present_mask, self.absent_mask = grads, None, None
        else:
            present = [grads[i] for i in positions]
            self.present_mask = [g is not None for g in grads]
            self.absent_mask = [g is None for g in grads]
        rank = {p: k for k, p in enumerate(positions)}
        if self.stats is not None:
            self.stats_out = self.stats.reset(len(grads), [(idx, grads[idx[0]].device) for _, idx in plan])
        self.plan = []
        by_device: dict[torch.device, list[int]] = {}
        for fn, idx in plan:
            tensors = [grads[i] for i in idx]
            # A backend may bind its group function to these addresses (``fn.bind``): cheaper next calls.
            bound = fn.bind(tensors) if hasattr(fn, "bind") else fn
            self.plan.append((fn, bound, None if len(idx) == len(present) else [rank[i] for i in idx]))
            by_device.setdefault(tensors[0].device, []).extend(rank[i] for i in idx)
        kept = sum(map(len, by_device.values()))
        self.by_device = list(by_device.values()) if kept == sum(_numel(g) >= 2 for g in present) else None
        self.spans = [_extent(g) * g.element_size() if _numel(g) >= 2 else 0 for g in present]
        self.guard = layout_guard(present)
        self.starts = list(map(_data_ptr, present))
        self.indices = list(range(len(present)))
        self.length = len(grads)
        return present

    def znorm_(self, grads: list[Tensor | None], names: list[str], grad_scale: Tensor | None) -> None:
        present = self._present(grads)
        if present is None:
            if _DTENSOR_MODULE in sys.modules and _dtensor_positions(grads):
                # DTensor gradients (FSDP2): uncached, through run_znorm_ (their statistics cross ranks).
                self.length = -1  # the cached plan (if any) is not this list's
                run_znorm_(grads, self.eps, self.correction, self.backend, grad_scale, names, self.stats)
                if self.stats is not None:
                    self.stats.unscale(grad_scale)
                return
            present = self._check(grads, names)
        if self.stats is None:
            for _, fn, idx in self.plan:
                fn(
                    present if idx is None else list(map(present.__getitem__, idx)),
                    self.eps,
                    self.correction,
                    grad_scale,
                )
            return
        for (_, fn, idx), out in zip(self.plan, self.stats_out):
            tensors = present if idx is None else list(map(present.__getitem__, idx))
            fn(tensors, self.eps, self.correction, grad_scale, stats=out)
        self.stats.unscale(grad_scale)

"""What a param group's fused step derives from its parameters (``FusedLayout``): which fused path serves
them, the checks' verdict and the (device, dtype) buckets, kept while the parameters and their gradients'
addresses and layouts stay the same; and the two pieces every fused step shares: the statistics rows of a
bucket on the Triton path (``statistics``) and the assembly of ``track_stats`` rows (``stats_rows``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..backends import native
from ..backends.triton_common import device_table
from ..dtensors import dtensor_positions
from ..guards import layout_guard, same_addresses
from ..registry import resolve_backend
from ..validation import check_and_group
from .settings import FusedCaches

__all__ = ["FusedLayout", "fused_path", "layout_of", "statistics", "stats_rows"]

# The backends whose fused steps a ZNorm optimizer may take ("reference" has none).
FUSED_BACKENDS = ("auto", "triton", "cpu", "cuda")


def fused_path(backend: str, params: list[Tensor]) -> str | None:
    """The fused step that serves these parameters under ``backend``: "triton", "cpu" or "cuda" (the native
    steps), or None."""
    if dtensor_positions(params) is not None:  # FSDP2: the general path normalizes over whole tensors
        return None
    try:
        resolved = {resolve_backend(backend, device) for device in {p.device for p in params}}
    except (RuntimeError, ValueError):
        return None
    if resolved == {"triton"}:
        return "triton"
    for name in ("cpu", "cuda"):
        if resolved == {name} and all(p.device.type == name for p in params):
            return name if native.has_optim_kernels(name) else None
    return None


@dataclass(eq=False)
class FusedLayout:
    """See the module docstring. Autograd keeps a gradient's shape, dtype and layout those of its parameter,
    but nothing is assumed: ``guard`` and the addresses are compared every step."""

    ids: list[int]  # id of every parameter with a gradient, in group order
    starts: list[int]  # their gradients' addresses
    options: tuple  # (znorm, min_ndim) the treated flags were made for
    path: str | None
    name_of: dict[int, str]
    guard: Any = None  # layout_guard of the gradients and parameters the layout was made for
    buckets: list[tuple[list[int], list[bool]]] = field(default_factory=list)  # positions, treated
    indices: dict[tuple, tuple[Tensor, Tensor | None]] = field(default_factory=dict)

    def index(self, rows: list[int], device: torch.device) -> Tensor:
        """``rows`` as an index tensor on ``device``, made once per layout, through pinned memory without
        blocking (a plain copy of a list to a GPU would wait for the device, on every step)."""
        key = (tuple(rows), device)
        entry = self.indices.get(key)
        if entry is None:
            entry = self.indices[key] = device_table(rows, device)  # (tensor, pinned source kept in capture)
        return entry[0]


def layout_of(
    opt,
    backend: str,
    caches: FusedCaches,
    group: dict[str, Any],
    params: list[Tensor],
    names: Callable[[], list[str]],
    options: tuple,
) -> FusedLayout:
    """The group's layout (kept in ``caches`` while it holds); path None where no fused step serves."""
    cache = caches.layouts
    grads = [p.grad for p in params]
    layout = cache.get(id(group))
    if (
        layout is not None
        and layout.options == options
        and len(layout.ids) == len(params)
        and list(map(id, params)) == layout.ids
        and same_addresses(grads, layout.starts, list(range(len(grads))))
        # Same addresses are not enough: a .grad assigned by hand (a transposed or strided view, another
        # dtype) or a parameter's .data replaced can keep an address with another layout.
        and (layout.guard is None or layout.guard.check(*grads, *params))
    ):
        return layout
    name_of = {id(p): n for p, n in zip(group["params"], names())}
    path = fused_path(backend, params)
    if path is None:  # not cached: the general path checks (and reports) for itself
        return FusedLayout([], [], options, None, name_of)
    # The contract's errors (sparse, complex, overlapping gradients), named, before any address is read.
    check_and_group(grads, [name_of[id(p)] for p in params], f"{type(opt).__name__}.step")
    layout = FusedLayout(list(map(id, params)), list(map(Tensor.data_ptr, grads)), options, path, name_of)
    layout.guard = layout_guard([*grads, *params])
    znorm, min_ndim = options
    positions: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        positions.setdefault((p.device, p.dtype), []).append(i)
    layout.buckets = [
        (idx, [znorm and params[i].dim() >= min_ndim and params[i].numel() >= 2 for i in idx])
        for idx in positions.values()
    ]
    if len(cache) >= 64:
        cache.clear()
    cache[id(group)] = layout
    return layout


def statistics(
    grads: list[Tensor], treated: list[bool], eps: float, correction: float, layout: FusedLayout, plan=None
) -> Tensor:
    """float64 [T, 4] rows for the Triton update kernel: the statistics stage's for treated tensors, the raw
    gradient's row elsewhere (tensors ZNorm skips or leaves alone): (0, 0, 1, 0), z = (g - 0) * 1.
    ``plan``: the statistics plan of the treated gradients, from a step that found them at these addresses
    with these layouts (all dense), or None (looked up)."""
    from ..backends import triton_host

    picked = grads if all(treated) else [g for g, t in zip(grads, treated) if t]
    stats = triton_host.statistics(picked, eps, correction, plan=plan) if picked else None
    if stats is not None and len(picked) == len(grads):
        return stats
    device = grads[0].device
    full = torch.zeros((len(grads), 4), dtype=torch.float64, device=device)
    full[:, 2] = 1.0
    if stats is not None:
        full.index_copy_(0, layout.index([i for i, t in enumerate(treated) if t], device), stats)
    return full


def stats_rows(
    selected: list[Tensor],
    layout: FusedLayout,
    launches: list,
    group: dict[str, Any],
    names: Callable[[], list[str]],
) -> tuple[list[str], Tensor]:
    """(names, float64 [k, 2] mean and std) of the selected parameters, from the buckets' statistics rows
    (``launches``: (params, treated, stats, ...) per bucket). The names come from the layout, or afresh
    from the group where a parameter was added to it since (the layout sees only parameters with a
    gradient)."""
    row_of = {id(p): k for k, p in enumerate(selected)}
    device = launches[0][2].device
    values = torch.full((len(selected), 2), float("nan"), dtype=torch.float64, device=device)
    for ps, treated, stats, *_ in launches:
        rows = [i for i, t in enumerate(treated) if t]
        if rows:
            src = layout.index(rows, stats.device)
            dst = layout.index([row_of[id(ps[i])] for i in rows], device)
            values.index_copy_(0, dst, stats.index_select(0, src)[:, :2].to(device))
    name_of = layout.name_of
    if not all(id(p) in name_of for p in selected):
        name_of = {id(p): n for p, n in zip(group["params"], names())}
    return [name_of[id(p)] for p in selected], values

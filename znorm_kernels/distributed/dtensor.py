"""ZNorm of DTensor gradients (FSDP2's ``fully_shard``, tensor parallelism): exact per WHOLE tensor.

A DTensor's statistics run over the global tensor, whose elements are spread over ranks. Each rank computes,
for its local shards, a float64 row (count, mean, M2, min, max) each (``shard_statistics``); the few floats
per tensor of all tensors that share a process group travel in ONE all_gather per group (never the gradients);
every rank merges them with Chan's formula in rank order, so the merged statistics are deterministic and
bitwise the same on every rank; then each rank normalizes its own shard with the global mean and standard
deviation: where the local statistics came from the Triton stage, with one launch of the Triton kernel's
normalize pass per (device, dtype) group (``triton_host.apply_``, the kernel's own float32 arithmetic, rule
10), else exactly as the reference backend applies them (``reference.write_z_``, float64). Either way
constant tensors, detected by the exact test global min == global max, become exactly 0, NaN and Inf
propagate, and ``grad_scale`` has its usual meaning.

Where the local statistics come from (the backend ``znorm_`` resolves for the shards' device):
- "triton" (what "auto" picks for CUDA shards; CPU shards under TRITON_INTERPRET=1 when named): the Triton
  kernel's statistics stage, ``triton_host.statistics``, one launch per (device, dtype) group of shards of at
  least 2 elements, float32 accumulation (float64 for float64 shards), the contract's corrected tile sums and
  exact constant test. It returns (mean, std, inv, wide) per tensor; called with correction=0 and eps=1 the
  row converts as count = n, mean = mean, M2 = std**2 * n (std = sqrt(M2 / n), correctly rounded: the square
  costs at most a few float64 ulps of M2, far below the stage's own float32 rounding), and the shard is
  constant (the kernel's exact min == max test) exactly where inv == 0 and std == 0 (with eps=1, inv = 0 means
  constant, or std = inf). The stage does not return the shard's min and max, so its rows carry (c, c) for a
  constant shard of value c and (-inf, +inf) otherwise: the merged min equals the merged max exactly where
  every non-empty shard is constant with the same value, which is the global exact test.
- every other backend ("cpu", "cuda", "reference"; the native extension has no statistics-only mode and no
  apply-with-given-statistics mode): ``local_statistics``, a corrected two-pass in float64 PyTorch ops with
  the true min and max. So are shards of fewer than 2 elements (the stage takes tensors of at least 2).

Placements: ``Shard(d)`` (and FSDP2+TP's strided shards) over a mesh dimension -> statistics combined over
that mesh dimension's process group; ``Replicate`` -> nothing to combine; ``Partial`` -> ValueError (the
gradient is not reduced yet: reduce it first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Replicate

from ..backends.float64_range import factor_of
from ..backends.reference import write_z_
from ..backends.triton_common import device_table
from ..naming import where
from ..registry import resolve_backend

__all__ = ["local_statistics", "mean_and_std", "merge_statistics", "shard_statistics", "znorm_dtensors_"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Columns of a statistics row: count, mean, M2 (sum of squared deviations from the mean), min, max.
_N, _MEAN, _M2, _MIN, _MAX = range(5)


def _sharded_mesh_dims(t: DTensor, position: int, names: Sequence[str] | None) -> tuple[int, ...]:
    """The mesh dimensions over which ``t``'s elements are split (statistics are combined over those)."""
    dims = []
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise ValueError(
                f"znorm_: {where(position, names, 'DTensor')} has a Partial placement on mesh dimension "
                f"{mesh_dim} "
                f"({placement}): its values are unreduced partial sums, whose z-scores mean nothing; reduce "
                "the gradient first (e.g. .redistribute(placements=[Replicate() or Shard(d)])) and then "
                "normalize it"
            )
        if isinstance(placement, Replicate) or placement.is_replicate():
            continue
        # Shard(d), and strided shards (FSDP2 + tensor parallelism): each rank holds a disjoint part.
        dims.append(mesh_dim)
    return tuple(dims)


def local_statistics(local: Tensor) -> Tensor:
    """float64 [5] (count, mean, M2, min, max) of a local shard, on its device, without synchronization.

    The reference backend's corrected two-pass: mean, then the mean of the deviations from it added back, and
    M2 as the sum of the squared corrected deviations. An empty shard gives (0, 0, 0, +inf, -inf). As the
    kernels keep their partials (``float64_range.factor_of``), a shard whose largest magnitude is beyond
    2**400 has its sums taken on scaled values and its M2 kept scaled, so that nothing overflows."""
    n = local.numel()
    if n == 0:  # filled on the device: a Python list copied to a GPU would wait for it
        empty = torch.zeros(5, dtype=torch.float64, device=local.device)
        empty[3], empty[4] = float("inf"), float("-inf")
        return empty
    x = local.detach().reshape(-1).to(torch.float64)
    lo, hi = torch.aminmax(x)
    f = factor_of(lo, hi)
    x = x * f
    mean = x.mean()
    centred = x - mean
    shift = centred.mean()  # what rounding the mean cost (the corrected two-pass)
    m2 = (centred - shift).square().sum()
    count = torch.full((), float(n), dtype=torch.float64, device=x.device)
    return torch.stack([count, (mean + shift) / f, m2, lo, hi])


def _triton_rows(shards: list[Tensor]) -> Tensor:
    """float64 [T, 5] rows (count, mean, M2, min, max) of same-device, same-dtype shards of at least 2
    elements, from one launch of the Triton statistics stage (see the module's docstring for the
    conversion; min and max are (c, c) for a constant shard of value c, else (-inf, +inf))."""
    from ..backends import triton_host

    device = shards[0].device
    stage = triton_host.statistics(shards, 1.0, 0)  # [T, 4]: mean, std, inv, wide (eps=1, correction=0)
    mean, std, inv = stage[:, 0], stage[:, 1], stage[:, 2]
    count = _to_device(torch.tensor([float(x.numel()) for x in shards], dtype=torch.float64), device)
    # The stage marks a constant tensor (its own exact min == max test) by inv == 0 and std == 0 exactly; an
    # infinite spread also gives inv == 0 (eps=1), but not std == 0.
    constant = (inv == 0) & (std == 0)
    lo = torch.where(constant, mean, float("-inf"))
    hi = torch.where(constant, mean, float("inf"))
    return torch.stack([count, mean, std.square() * count, lo, hi], dim=1)


_kept_for_replay: list[Tensor] = []  # pinned count tables read by captured CUDA graphs


def shard_statistics(shards: Sequence[Tensor], stage: str = "torch") -> Tensor:
    """float64 [T, 5] (count, mean, M2, min, max) of local shards, on their device, without synchronization.

    ``stage="triton"``: the Triton statistics stage for every (device, dtype) group of shards of at least 2
    elements (one launch each); ``"torch"`` (and shards of fewer than 2 elements): ``local_statistics``."""
    rows: list[Tensor | None] = [None] * len(shards)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(shards):
        if stage == "triton" and x.numel() >= 2:
            groups.setdefault((x.device, x.dtype), []).append(i)
        else:
            rows[i] = local_statistics(x)
    for idx in groups.values():
        for i, row in zip(idx, _triton_rows([shards[i].detach() for i in idx]).unbind()):
            rows[i] = row
    return torch.stack(rows)


def _stage_for(backend: str, device: torch.device) -> str:
    """Which local statistics serve shards on ``device`` for ``backend``: "triton" where it resolves to the
    Triton backend, else "torch" (the native extension has no statistics-only mode). Raises as ``znorm_``
    does for an unknown backend or one that cannot serve the device."""
    return "triton" if resolve_backend(backend, device) == "triton" else "torch"


def merge_statistics(gathered: Tensor) -> Tensor:
    """Merge per-rank statistics, float64 [R, T, 5], into [T, 5] with Chan's formula, in rank order.

    Ranks with an empty shard (count 0) contribute nothing, exactly. Every rank that merges the same gathered
    tensor gets bitwise the same result (a fixed sequence of elementwise float64 operations). Each M2 is
    scaled as its row's bounds say (``float64_range.factor_of``), the merged one as the merged bounds say."""
    acc = gathered[0].clone()
    for r in range(1, gathered.shape[0]):
        b = gathered[r]
        na, nb = acc[:, _N], b[:, _N]
        n = na + nb
        safe_n = torch.where(n > 0, n, 1.0)
        lo, hi = torch.minimum(acc[:, _MIN], b[:, _MIN]), torch.maximum(acc[:, _MAX], b[:, _MAX])
        f = factor_of(lo, hi)
        fa, fb = f / factor_of(acc[:, _MIN], acc[:, _MAX]), f / factor_of(b[:, _MIN], b[:, _MAX])
        delta = b[:, _MEAN] * f - acc[:, _MEAN] * f
        mean = (acc[:, _MEAN] * f + delta * (nb / safe_n)) / f
        m2 = acc[:, _M2] * fa * fa + b[:, _M2] * fb * fb + delta.square() * (na * nb / safe_n)
        # One side empty: the other side's statistics exactly (no rounding through delta, no 0 * inf).
        mean = torch.where(na == 0, b[:, _MEAN], torch.where(nb == 0, acc[:, _MEAN], mean))
        m2 = torch.where(na == 0, b[:, _M2], torch.where(nb == 0, acc[:, _M2], m2))
        acc = torch.stack([n, mean, m2, lo, hi], dim=1)
    return acc


def mean_and_std(stats: Tensor, correction: float = 0) -> Tensor:
    """float64 [T, 2] (mean, std) from [T, 5] (count, mean, M2, min, max) rows: the figures ZNorm uses (a
    constant tensor's mean is its value and its std 0 exactly; std = sqrt(M2 / (count - correction)))."""
    from ..backends import triton_host

    return triton_host.apply_rows(stats, 0.0, correction)[:, :2]  # the one derivation (eps plays no part)


def _combine(stats: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All ranks' [T, 5] statistics of ``group``, merged in rank order (one all_gather)."""
    size = dist.get_world_size(group)
    if size == 1:
        return stats
    parts = [torch.empty_like(stats) for _ in range(size)]
    dist.all_gather(parts, stats.contiguous(), group=group)
    return merge_statistics(torch.stack(parts))


def _normalize_local_(
    local: Tensor, stats: Tensor, eps: float, correction: float, grad_scale: Tensor | None
) -> None:
    """Normalize a local shard in place with the global statistics ``stats`` (float64 [5]), as the reference
    backend's ``znorm_tensor_`` applies its own."""
    if local.numel() == 0:
        return
    x = local.detach().reshape(-1).to(torch.float64)
    n, mean, m2, lo, hi = stats.to(x.device).unbind()
    f = factor_of(lo, hi)  # M2 is scaled by f**2: so are the deviations and eps, which leaves z unchanged
    var = m2 / torch.clamp(n - correction, min=0.0)
    constant = lo == hi  # exact; NaN never compares equal
    centred = torch.where(constant, x - lo, x * f - mean * f)
    write_z_(local, centred, var.sqrt(), eps * f, grad_scale)


def znorm_dtensors_(
    tensors: Sequence[DTensor],
    eps: float = 1e-10,
    correction: float = 0,
    backend: str = "auto",
    grad_scale: Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
    stats_out: Tensor | None = None,
) -> None:
    """Normalize DTensors in place, each over its WHOLE (global) tensor.

    Every rank of each DTensor's mesh must call this with the same DTensors in the same order (as an
    optimizer step does). ``names``/``positions`` only serve error messages. ``backend`` picks the local
    statistics (the Triton statistics stage where it resolves to "triton" for the shards' device, float64
    PyTorch ops otherwise: see the module's docstring), and with it how a shard is normalized with the merged
    statistics (the Triton kernel's normalize pass, or the reference's float64 ``write_z_``).
    Raises ValueError for a Partial placement, TypeError for an unsupported dtype, and as ``znorm_`` for a
    backend that cannot serve the shards' device, before anything is modified or communicated.
    ``stats_out`` (float64 [len(tensors), 2], optional) receives each whole tensor's mean and standard
    deviation (the std ZNorm divides by: ``correction`` applied, 0 for a constant), on every rank alike; rows
    of tensors of fewer than 2 elements, and of a DTensor passed twice (its second row), are left as they are.
    """
    pos = list(positions) if positions is not None else list(range(len(tensors)))
    # Check everything first (nothing modified on bad input); the same DTensor twice is normalized once.
    plan: dict[tuple, list[DTensor]] = {}
    rows_of: dict[tuple, list[int]] = {}  # per plan entry, the rows of stats_out its tensors fill
    seen: set[int] = set()
    for k, (i, t) in enumerate(zip(pos, tensors)):
        if t.dtype not in _SUPPORTED:
            raise TypeError(
                f"znorm_: {where(i, names, 'DTensor')} has dtype {t.dtype}; supported: float32, float16, "
                "bfloat16, float64"
            )
        dims = _sharded_mesh_dims(t, i, names)
        local = t._local_tensor
        if t.numel() < 2 or id(local) in seen:  # global size < 2: left unchanged (rule 2)
            continue
        seen.add(id(local))
        mesh = t.device_mesh
        plan.setdefault((id(mesh), dims), [mesh]).append(t)
        rows_of.setdefault((id(mesh), dims), []).append(k)
    stages = {}  # per device type, resolved before anything is communicated or modified
    for _, *items in plan.values():
        for t in items:
            kind = t._local_tensor.device.type
            if kind not in stages:
                stages[kind] = _stage_for(backend, t._local_tensor.device)
    with torch.no_grad():
        for key, (mesh, *items) in plan.items():
            dims = key[1]
            locals_ = [t._local_tensor for t in items]
            stage = stages[locals_[0].device.type]
            stats = shard_statistics(locals_, stage)  # [T, 5]
            for mesh_dim in dims:  # one all_gather per sharded mesh dimension (its process group)
                stats = _combine(stats, mesh.get_group(mesh_dim))
            if stats_out is not None:
                index = _to_device(rows_of[key], stats_out.device)
                stats_out.index_copy_(0, index, mean_and_std(stats, correction).to(stats_out.device))
            if stage == "triton":
                _apply_triton_(locals_, stats, eps, correction, grad_scale)
            else:
                for x, row in zip(locals_, stats):
                    _normalize_local_(x, row, eps, correction, grad_scale)


def _apply_triton_(
    locals_: list[Tensor], stats: Tensor, eps: float, correction: float, grad_scale: Tensor | None
) -> None:
    """Normalize the non-empty local shards with their merged statistics, one Triton launch per (device,
    dtype) group (``triton_host.apply_``: the kernel's normalize pass, no statistics pass, nobody waits)."""
    from ..backends import triton_host

    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(locals_):
        if x.numel():
            groups.setdefault((x.device, x.dtype), []).append(i)
    for idx in groups.values():
        picked = stats
        if len(idx) != len(locals_):
            picked = stats.index_select(0, _to_device(idx, stats.device))
        rows = triton_host.apply_rows(picked, eps, correction, grad_scale)
        triton_host.apply_([locals_[i] for i in idx], rows)


def _to_device(values: list[int] | Tensor, device: torch.device) -> Tensor:
    """``values`` (a list of ints, or a CPU tensor) on ``device``, through pinned memory without blocking (a
    list copied to a GPU would wait for it); under CUDA-graph capture every replay reads the pinned copy
    again, so it is kept."""
    out, host = device_table(values, device)
    if host is not None:
        _kept_for_replay.append(host)
    return out

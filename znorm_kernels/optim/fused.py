"""The fused step of the ZNorm optimizers. On Triton: per (device, dtype) group of a param group, the
statistics stage (one launch: each gradient read once) and one update launch that applies the z-scores as it
loads the gradient (backends/triton_optim.py). The gradient is read twice and never written (unless
``normalize_grad``), where the hook then torch's update read it three times and write it once. On the CPU
(backend "cpu", or "auto" for CPU tensors): one call of the native op per dtype group (backends/native.py),
which computes each tensor's statistics and then updates it in one pass (in cache for small tensors), with
no scratch copy of the gradient.

``try_fused_step_`` takes a param group when its options allow (Triton serves its devices, or every parameter
is on the CPU and the backend resolves to "cpu", or every parameter is on CUDA and it resolves to "cuda"; not
``capturable``, ``differentiable`` or torch's own ``fused``; a plain float learning rate; no gradient scale)
and returns False otherwise, for the caller's general path (the hook's kernel, then torch's update). On CUDA
without Triton (backend "cuda", or "auto" resolving to it) the same native op's CUDA kernels serve the group
(znorm_'s statistics kernels, then one update kernel), with the statistics output on the device. The optimizer
state is created and kept exactly as torch's SGD and Adam keep it, so checkpoints stay interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from ..backends.triton_host import device_table
from ..dispatch import _dtensor_positions, _ptrs_equal, check_and_group, layout_guard, resolve_backend

__all__ = ["try_fused_step_"]


def _options_allow(opt, group: dict[str, Any]) -> bool:
    """Whether the group's options allow a fused step (checked every step: they may change)."""
    if group.get("differentiable") or group.get("capturable") or group.get("fused"):
        return False
    if isinstance(group["lr"], Tensor):
        return False
    if getattr(opt, "_step_supports_amp_scaling", False) and getattr(opt, "grad_scale", None) is not None:
        return False
    return opt._znorm["backend"] in ("auto", "triton", "cpu", "cuda")


def _fused_path(opt, params: list[Tensor]) -> str | None:
    """The fused step that serves these parameters: "triton", "cpu" or "cuda" (the native steps), or None."""
    if _dtensor_positions(params) is not None:  # FSDP2: the general path normalizes over whole tensors
        return None
    backend = opt._znorm["backend"]
    try:
        resolved = {resolve_backend(backend, device) for device in {p.device for p in params}}
    except (RuntimeError, ValueError):
        return None
    if resolved == {"triton"}:
        return "triton"
    from ..backends import native

    if resolved == {"cpu"} and all(p.device.type == "cpu" for p in params):
        return "cpu" if native.has_optim_kernels() else None
    if resolved == {"cuda"} and all(p.device.type == "cuda" for p in params):
        return "cuda" if native.has_optim_kernels("cuda") else None
    return None


@dataclass(eq=False)
class _Layout:
    """What a param group's fused step derives from its parameters, kept while they and their gradients'
    addresses stay the same (an optimizer's step after step; autograd keeps a gradient's shape, dtype and
    layout those of its parameter): the path, the checks' verdict, the (device, dtype) buckets."""

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


def _layout(opt, group: dict[str, Any], params: list[Tensor], names: list[str], options: tuple) -> _Layout:
    cache = opt.__dict__.setdefault("_znorm_layouts", {})
    grads = [p.grad for p in params]
    layout = cache.get(id(group))
    if (
        layout is not None
        and layout.options == options
        and len(layout.ids) == len(params)
        and list(map(id, params)) == layout.ids
        and _ptrs_equal(grads, layout.starts, list(range(len(grads))))
        # Same addresses are not enough: a .grad assigned by hand (a transposed or strided view, another
        # dtype) or a parameter's .data replaced can keep an address with another layout.
        and (layout.guard is None or layout.guard.check(*grads, *params))
    ):
        return layout
    name_of = {id(p): n for p, n in zip(group["params"], names)}
    path = _fused_path(opt, params)
    if path is None:  # not cached: the general path checks (and reports) for itself
        return _Layout([], [], options, None, name_of)
    # The contract's errors (sparse, complex, overlapping gradients), named, before any address is read.
    check_and_group(grads, [name_of[id(p)] for p in params], f"{type(opt).__name__}.step")
    layout = _Layout(list(map(id, params)), list(map(Tensor.data_ptr, grads)), options, path, name_of)
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


def _statistics(
    grads: list[Tensor], treated: list[bool], eps: float, correction: float, layout: _Layout
) -> Tensor:
    """float64 [T, 4] rows for the update kernel: the statistics stage's for treated tensors, the raw
    gradient's row elsewhere (tensors ZNorm skips or leaves alone): (0, 0, 1, 0), z = (g - 0) * 1."""
    from ..backends import triton_host

    picked = [g for g, t in zip(grads, treated) if t]
    stats = triton_host.statistics(picked, eps, correction) if picked else None
    if stats is not None and len(picked) == len(grads):
        return stats
    device = grads[0].device
    full = torch.zeros((len(grads), 4), dtype=torch.float64, device=device)
    full[:, 2] = 1.0
    if stats is not None:
        full.index_copy_(0, layout.index([i for i, t in enumerate(treated) if t], device), stats)
    return full


def try_fused_step_(opt, group: dict[str, Any], kind: str, names: list[str], stats_sink: list) -> bool:
    """The fused step of one param group, or False (nothing done) when the fused path does not serve it.
    ``kind``: "sgd", "adam" or "adamw"; ``names``: the group's parameter names. With ``track_stats``,
    appends (names, float64 [k, 2] mean/std) for the group's treated parameters to ``stats_sink`` (NaN rows
    where a parameter has no gradient or fewer than 2 elements)."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params or not _options_allow(opt, group):
        return False
    defaults = opt._znorm["defaults"]
    znorm = group.get("znorm", defaults["znorm"])
    min_ndim = group.get("min_ndim", defaults["min_ndim"])
    eps = group.get("znorm_eps", defaults["znorm_eps"])
    correction = group.get("correction", defaults["correction"])
    layout = _layout(opt, group, params, names, (znorm, min_ndim))
    path = layout.path
    if path is None:
        return False
    grads = [p.grad for p in params]
    # Phase 1, nothing modified: statistics, the update's arguments, and the kernels' own checks, which raise
    # NotImplementedError for what they do not serve (non-dense tensors, state of another layout): then the
    # general path runs instead, from scratch.
    prepare = _prepare_sgd if kind == "sgd" else _prepare_adam
    launches = []
    try:
        for idx, treated in layout.buckets:
            ps = [params[i] for i in idx]
            gs = [grads[i] for i in idx]
            if path == "triton":
                stats = _statistics(gs, treated, eps, correction, layout)
                engine = _triton_engine(stats)
            else:  # the native op computes the statistics itself, and writes them here with track_stats
                stats = None
                if opt._znorm["track_stats"]:
                    stats = torch.full((len(ps), 2), float("nan"), dtype=torch.float64, device=ps[0].device)
                engine = _native_engine(path, treated, eps, correction, stats)
            launches.append((ps, treated, stats, prepare(opt, group, ps, gs, engine, kind)))
    except NotImplementedError:
        return False
    # Phase 2: the updates.
    for _, _, _, launch in launches:
        launch()
    if opt._znorm["track_stats"] and znorm:
        selected = [p for p in group["params"] if p.dim() >= min_ndim]
        if selected:
            stats_sink.append(_stats_rows(selected, layout, launches))
    return True


def _stats_rows(selected: list[Tensor], layout: _Layout, launches: list) -> tuple[list[str], Tensor]:
    """(names, float64 [k, 2] mean and std) of the selected parameters, from the statistics rows."""
    row_of = {id(p): k for k, p in enumerate(selected)}
    device = launches[0][2].device
    values = torch.full((len(selected), 2), float("nan"), dtype=torch.float64, device=device)
    for ps, treated, stats, _ in launches:
        rows = [i for i, t in enumerate(treated) if t]
        if rows:
            src = layout.index(rows, stats.device)
            dst = layout.index([row_of[id(ps[i])] for i in rows], device)
            values.index_copy_(0, dst, stats.index_select(0, src)[:, :2].to(device))
    return [layout.name_of[id(p)] for p in selected], values


class _Engine:
    """One bucket's fused update: ``check(lists, names)`` (NotImplementedError for what it does not serve,
    nothing touched), ``sgd(params, grads, bufs, **options)`` and ``adam(params, grads, exp_avgs, exp_avg_sqs,
    max_exp_avg_sqs, **options)`` with the options of triton_optim's sgd_step_/adam_step_ (``checked=True``
    included)."""

    def __init__(self, name: str, check, sgd, adam) -> None:
        self.name, self.check, self.sgd, self.adam = name, check, sgd, adam


def _triton_engine(stats: Tensor) -> _Engine:
    from ..backends import triton_optim

    return _Engine(
        "triton",
        lambda lists, names: triton_optim.check(lists, names, stats),
        lambda *lists, **kw: triton_optim.sgd_step_(*lists, stats, **kw),
        lambda *lists, **kw: triton_optim.adam_step_(*lists, stats, **kw),
    )


def _native_engine(
    name: str, treated: list[bool], eps: float, correction: float, stats: Tensor | None
) -> _Engine:
    """The native op's step ("cpu" or "cuda": the device of the bucket's tensors)."""
    from ..backends import native

    znorm = dict(treated=treated, znorm_eps=eps, correction=correction, stats_out=stats)
    return _Engine(
        name,
        native.check_step,
        lambda *lists, **kw: native.sgd_step_(*lists, **znorm, **kw),
        lambda *lists, **kw: native.adam_step_(*lists, **znorm, **kw),
    )


def _validate(opt, lists: list[list[Tensor]], names: list[str], engine: _Engine) -> None:
    """The update kernel's checks (NotImplementedError for what it does not serve), run once per set of
    tensors: the addresses and layouts (dtype, device, sizes, strides, ...) of every list are remembered, and
    unchanged ones (an optimizer's gradients and state, step after step) are not checked again."""
    flat = [t for lst in lists for t in lst if t is not None]
    seen = opt.__dict__.setdefault("_znorm_validated", {})
    key = (engine.name, id(lists[0][0]) if lists[0] else 0, len(flat), tuple(map(len, lists)))
    entry = seen.get(key)
    if entry is not None and _ptrs_equal(flat, entry[0], list(range(len(flat)))) and entry[1].check(*flat):
        return
    engine.check(lists, names)
    if len(seen) >= 64:
        seen.clear()
    seen[key] = (list(map(Tensor.data_ptr, flat)), layout_guard(flat))


def _prepare_sgd(opt, group, params, grads, engine: _Engine, kind: str):
    """Check the SGD update of one bucket; returns the function that runs it and keeps its state."""
    momentum = group["momentum"]
    bufs, first = [], []
    for p in params:
        buf = opt.state[p].get("momentum_buffer")
        if momentum != 0 and buf is None:
            buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            first.append(True)
        else:
            first.append(False)
        bufs.append(buf)
    lists = [params, grads] + ([bufs] if momentum != 0 else [])
    _validate(opt, lists, ["params", "grads", "momentum_buffers"][: len(lists)], engine)

    def run() -> None:
        engine.sgd(
            params,
            grads,
            bufs,
            first=first,
            lr=group["lr"],
            momentum=momentum,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            write_grad=opt._znorm["normalize_grad"],
            checked=True,
        )
        if momentum != 0:  # torch keeps the buffer only with momentum
            for p, buf in zip(params, bufs):
                opt.state[p]["momentum_buffer"] = buf

    return run


def _prepare_adam(opt, group, params, grads, engine: _Engine, kind: str):
    """Check the Adam/AdamW update of one bucket; returns the function that runs it and counts the step."""
    beta1, beta2 = group["betas"]
    amsgrad = group["amsgrad"]
    exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], []
    for p in params:
        state = opt.state[p]
        if len(state) == 0:  # as torch's Adam._init_group for a group neither capturable nor fused
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device.type != "cpu":
            raise NotImplementedError("step counters on the device (a capturable or fused checkpoint)")
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        max_sqs.append(state.get("max_exp_avg_sq") if amsgrad else None)
        steps.append(state["step"])
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_sqs] if amsgrad else [])
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"][: len(lists)]
    _validate(opt, lists, names, engine)
    lr = group["lr"]
    # torch's single-tensor Adam: the step counted first, then Python-float bias corrections.
    counts = [float(s) + 1 for s in steps]  # CPU tensors: no device sync
    step_size = [lr / (1 - beta1**c) for c in counts]
    bc2_sqrt = [(1 - beta2**c) ** 0.5 for c in counts]

    def run() -> None:
        engine.adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_sqs,
            step_size=step_size,
            bias_correction2_sqrt=bc2_sqrt,
            amsgrad=amsgrad,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            decoupled=kind == "adamw",
            write_grad=opt._znorm["normalize_grad"],
            checked=True,
        )
        torch._foreach_add_(steps, 1)  # CPU tensors, as torch counts them

    return run

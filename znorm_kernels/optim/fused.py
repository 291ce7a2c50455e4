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

import itertools
import operator
from collections.abc import Callable
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


def _layout(
    opt, group: dict[str, Any], params: list[Tensor], names: Callable[[], list[str]], options: tuple
) -> _Layout:
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
    name_of = {id(p): n for p, n in zip(group["params"], names())}
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
    grads: list[Tensor], treated: list[bool], eps: float, correction: float, layout: _Layout, plan=None
) -> Tensor:
    """float64 [T, 4] rows for the update kernel: the statistics stage's for treated tensors, the raw
    gradient's row elsewhere (tensors ZNorm skips or leaves alone): (0, 0, 1, 0), z = (g - 0) * 1.
    ``plan``: triton_host's plan of the treated gradients, from a step that found them at these addresses
    with these layouts (all dense), or None (looked up)."""
    from ..backends import triton_host

    picked = grads if all(treated) else [g for g, t in zip(grads, treated) if t]
    if not picked:
        stats = None
    elif plan is not None:  # triton_host.statistics with its plan known (no look-up)
        stats = triton_host._launch(picked, eps, correction, None, False, None, plan).stats.clone()
    else:
        stats = triton_host.statistics(picked, eps, correction)
    if stats is not None and len(picked) == len(grads):
        return stats
    device = grads[0].device
    full = torch.zeros((len(grads), 4), dtype=torch.float64, device=device)
    full[:, 2] = 1.0
    if stats is not None:
        full.index_copy_(0, layout.index([i for i, t in enumerate(treated) if t], device), stats)
    return full


def try_fused_step_(
    opt, group: dict[str, Any], kind: str, names: Callable[[], list[str]], stats_sink: list
) -> bool:
    """The fused step of one param group, or False (nothing done) when the fused path does not serve it.
    ``kind``: "sgd", "adam" or "adamw"; ``names()``: the group's parameter names (called only where needed).
    With ``track_stats``, appends (names, float64 [k, 2] mean/std) for the group's treated parameters to
    ``stats_sink`` (NaN rows where a parameter has no gradient or fewer than 2 elements)."""
    if not _options_allow(opt, group):
        return False
    defaults = opt._znorm["defaults"]
    znorm = group.get("znorm", defaults["znorm"])
    min_ndim = group.get("min_ndim", defaults["min_ndim"])
    eps = group.get("znorm_eps", defaults["znorm_eps"])
    correction = group.get("correction", defaults["correction"])
    state_keys = _state_keys(group, kind)
    options = (kind, znorm, min_ndim, state_keys, opt._znorm["backend"])
    done = _remembered_step_(opt, group, options, eps, correction, stats_sink, names)
    if done is not None:
        return done
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return False
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
            stats_sink.append(_stats_rows(selected, layout, launches, group, names))
    _remember(opt, group, options, layout, params)
    return True


# --- the remembered step: what a param group's fused step derives from its tensors, kept step after step ---

_grad_of = operator.attrgetter("grad")
_ONE = torch.tensor(1.0)  # the step counters' increment, as torch's Adam adds it to CPU counters (4x faster)


def _state_keys(group: dict[str, Any], kind: str) -> tuple[str, ...]:
    """The state tensors the update reads per parameter, in the kernels' list order."""
    if kind == "sgd":
        return ("momentum_buffer",) if group["momentum"] != 0 else ()
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")


@dataclass(eq=False)
class _Remembered:
    """A param group's fused step as the last full step made it, for the next steps to reuse while the same
    parameters have gradients and every tensor the update reads (parameters, gradients, the state tensors of
    ``options``' keys, and Adam's step counters) has the same address (counters excepted) and layout:
    ``ptrs`` and ``guard`` are checked every step, in two C calls. What it keeps depends on nothing else: the
    buckets (device, dtype; treated flags from ``options``), the statistics and update plans (addresses and
    sizes), the path. Hyperparameters, ZNorm's eps and correction, and the step counters' values are read
    every step. Tensors are not kept (ids and addresses only): state replaced by load_state_dict is freed."""

    options: tuple  # (kind, znorm, min_ndim, state keys, backend)
    ids: list[int]  # ids of the group's parameters with a gradient, in group order
    all_present: bool  # every parameter of the group had a gradient
    ptrs: list[int]  # addresses of params, grads, then each state list (group order)
    indices: list[int]  # range(len(ptrs))
    guard: Any  # layout_guard of those tensors, then (Adam) the step counters
    layout: _Layout
    buckets: list[tuple]  # (positions or None for all, treated, statistics plan, update plan, device, dtype)


def _read_state(opt, params: list[Tensor], keys: tuple[str, ...], kind: str) -> list[list[Tensor]] | None:
    """The state lists of ``keys`` (and Adam's step counters last), or None where one is missing."""
    states = list(map(opt.state.__getitem__, params))
    if kind != "sgd":
        keys = (*keys, "step")
    try:
        return [list(map(operator.itemgetter(key), states)) for key in keys]
    except KeyError:
        return None


def _remember(opt, group: dict[str, Any], options: tuple, layout: _Layout, params: list[Tensor]) -> None:
    """After a full fused step of the group: remember what the next steps can reuse (see _Remembered)."""
    cache = opt.__dict__.setdefault("_znorm_remembered", {})
    cache.pop(id(group), None)
    kind, keys = options[0], options[3]
    lists = _read_state(opt, params, keys, kind)
    if lists is None or any(t is None for lst in lists for t in lst):
        return
    grads = [p.grad for p in params]
    checked = [params, grads, *(lists if kind == "sgd" else lists[:-1])]
    flat = [t for lst in checked for t in lst]
    buckets = []
    for idx, treated in layout.buckets:
        sub = [lst if len(idx) == len(params) else [lst[i] for i in idx] for lst in checked]
        device, dtype = sub[0][0].device, sub[0][0].dtype
        stats_plan = plan = None
        if layout.path == "triton":
            from ..backends import triton_host, triton_optim

            picked = [g for g, t in zip(sub[1], treated) if t]
            if picked:
                stats_plan = triton_host._plan_for(picked)
            if kind == "sgd":
                plan = triton_optim.sgd_plan(sub, [False] * len(idx), device, dtype)[0]
            else:
                plan = triton_optim.adam_plan(sub, device, dtype)
        buckets.append((None if len(idx) == len(params) else idx, treated, stats_plan, plan, device, dtype))
    if len(cache) >= 64:
        cache.clear()
    counters = [] if kind == "sgd" else lists[-1]
    cache[id(group)] = _Remembered(
        options=options,
        ids=list(map(id, params)),
        all_present=len(params) == len(group["params"]),
        ptrs=list(map(Tensor.data_ptr, flat)),
        indices=list(range(len(flat))),
        guard=layout_guard([*flat, *counters]),
        layout=layout,
        buckets=buckets,
    )


def _remembered_step_(
    opt,
    group: dict[str, Any],
    options: tuple,
    eps: float,
    correction: float,
    stats_sink: list,
    names: Callable[[], list[str]],
) -> bool | None:
    """The group's step from what ``_remember`` kept, or None (nothing done) where it does not apply."""
    mem = opt.__dict__.get("_znorm_remembered", {}).get(id(group))
    if mem is None or mem.options != options:
        return None
    params = group["params"]
    grads = list(map(_grad_of, params))
    if not any(map(operator.is_, grads, itertools.repeat(None))):
        if not mem.all_present:
            return None
    else:
        params = [p for p, g in zip(params, grads) if g is not None]
        grads = [g for g in grads if g is not None]
    if list(map(id, params)) != mem.ids:
        return None
    kind, keys = options[0], options[3]
    lists = _read_state(opt, params, keys, kind)
    if lists is None:
        return None
    counters = lists.pop() if kind != "sgd" else []
    lists = [params, grads, *lists]
    flat = list(itertools.chain.from_iterable(lists))
    if not (_ptrs_equal(flat, mem.ptrs, mem.indices) and mem.guard.check(*flat, *counters)):
        return None
    try:
        args = _update_args(opt, group, kind, counters)
    except NotImplementedError:  # hyperparameters the kernels do not take (device tensors): the full step
        return None
    track = opt._znorm["track_stats"]
    path = mem.layout.path
    launches = []
    for idx, treated, stats_plan, plan, device, dtype in mem.buckets:
        sub = lists if idx is None else [[lst[i] for i in idx] for lst in lists]
        bucket_args = args if idx is None else _bucket_args(args, idx)
        if path == "triton":
            stats = _statistics(sub[1], treated, eps, correction, mem.layout, stats_plan)
        else:
            stats = None
            if track:
                stats = torch.full((len(idx or params), 2), float("nan"), dtype=torch.float64, device=device)
        launches.append((sub[0], treated, stats, (sub, bucket_args, plan, device, dtype)))
    write_grad = opt._znorm["normalize_grad"]
    for _, treated, stats, (sub, bucket_args, plan, device, dtype) in launches:
        _launch_remembered(path, kind, sub, treated, stats, bucket_args, plan, device, dtype, eps,
                           correction, write_grad)  # fmt: skip
    if counters:
        torch._foreach_add_(counters, _ONE, alpha=1.0)  # CPU tensors, as torch counts them
    znorm, min_ndim = options[1], options[2]
    if track and znorm:
        selected = [p for p in group["params"] if p.dim() >= min_ndim]
        if selected:
            stats_sink.append(_stats_rows(selected, mem.layout, launches, group, names))
    return True


def _update_args(opt, group: dict[str, Any], kind: str, counters: list[Tensor]) -> dict[str, Any]:
    """The update's hyperparameters as Python floats (as triton_optim's steps read them), and Adam's step
    sizes: one float each where every counter holds the same value, else one per parameter."""
    from ..backends import optim_steps

    if kind == "sgd":
        lr, momentum, dampening, weight_decay = optim_steps.scalars(
            "fused step", lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=group["weight_decay"],
        )  # fmt: skip
        return dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=group["nesterov"],
                    weight_decay=weight_decay, maximize=group["maximize"])  # fmt: skip
    beta1, beta2 = group["betas"]
    beta1, beta2, lr, weight_decay, eps = optim_steps.scalars(
        "fused step", beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
        eps=group["eps"],
    )  # fmt: skip
    counts = [float(s) + 1 for s in counters]  # CPU tensors: no device sync
    if counts.count(counts[0]) == len(counts):  # one value for every tensor
        (step_size,), (bc2_sqrt,) = _bias_corrections(lr, beta1, beta2, counts[:1])
    else:
        step_size, bc2_sqrt = _bias_corrections(lr, beta1, beta2, counts)
    return dict(step_size=step_size, bias_correction2_sqrt=bc2_sqrt, amsgrad=group["amsgrad"], beta1=beta1,
                beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=group["maximize"],
                decoupled=kind == "adamw")  # fmt: skip


def _bias_corrections(lr: float, beta1: float, beta2: float, counts: list[float]) -> tuple[list, list]:
    """Adam's per-tensor step sizes and bias-correction square roots for step counts already incremented,
    as Python floats, the way torch's single-tensor Adam computes them."""
    return [lr / (1 - beta1**c) for c in counts], [(1 - beta2**c) ** 0.5 for c in counts]


def _bucket_args(args: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    if not isinstance(args.get("step_size"), list):
        return args
    step_size, bc2 = args["step_size"], args["bias_correction2_sqrt"]
    return dict(args, step_size=[step_size[i] for i in idx], bias_correction2_sqrt=[bc2[i] for i in idx])


def _launch_remembered(path, kind, lists, treated, stats, args, plan, device, dtype, eps, correction,
                       write_grad) -> None:  # fmt: skip
    """One bucket's update from the remembered step (lists validated by the full step that made it)."""
    if path == "triton":
        from ..backends import triton_optim

        if kind == "sgd":
            triton_optim.sgd_launch(plan, 0, device, dtype, stats, write_grad=write_grad, **args)
        else:
            triton_optim.adam_launch(plan, device, dtype, stats, write_grad=write_grad, **args)
        return
    from ..backends import native

    n = len(lists[0])
    znorm = dict(treated=treated, znorm_eps=eps, correction=correction, stats_out=stats)
    if kind == "sgd":
        bufs = lists[2] if len(lists) == 3 else [None] * n
        native.sgd_step_(lists[0], lists[1], bufs, first=[False] * n, write_grad=write_grad, checked=True,
                         **znorm, **args)  # fmt: skip
    else:
        args = dict(args)
        if not isinstance(args["step_size"], list):
            args["step_size"] = [args["step_size"]] * n
            args["bias_correction2_sqrt"] = [args["bias_correction2_sqrt"]] * n
        max_sqs = lists[4] if len(lists) == 5 else [None] * n
        native.adam_step_(lists[0], lists[1], lists[2], lists[3], max_sqs, write_grad=write_grad,
                          checked=True, **znorm, **args)  # fmt: skip


def _stats_rows(
    selected: list[Tensor],
    layout: _Layout,
    launches: list,
    group: dict[str, Any],
    names: Callable[[], list[str]],
) -> tuple[list[str], Tensor]:
    """(names, float64 [k, 2] mean and std) of the selected parameters, from the statistics rows. The names
    come from the layout, or afresh from the group where a parameter was added to it since (the layout's
    checks see only parameters with a gradient)."""
    row_of = {id(p): k for k, p in enumerate(selected)}
    device = launches[0][2].device
    values = torch.full((len(selected), 2), float("nan"), dtype=torch.float64, device=device)
    for ps, treated, stats, _ in launches:
        rows = [i for i, t in enumerate(treated) if t]
        if rows:
            src = layout.index(rows, stats.device)
            dst = layout.index([row_of[id(ps[i])] for i in rows], device)
            values.index_copy_(0, dst, stats.index_select(0, src)[:, :2].to(device))
    name_of = layout.name_of
    if not all(id(p) in name_of for p in selected):
        name_of = {id(p): n for p, n in zip(group["params"], names())}
    return [name_of[id(p)] for p in selected], values


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
    counts = [float(s) + 1 for s in steps]  # CPU tensors: no device sync
    step_size, bc2_sqrt = _bias_corrections(lr, beta1, beta2, counts)

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
        torch._foreach_add_(steps, _ONE, alpha=1.0)  # CPU tensors, as torch counts them

    return run

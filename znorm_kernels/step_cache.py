"""``GradientGroups``: ``znorm_`` for an optimizer's gradients, step after step, without re-validating
unchanged lists (the hook's and the ZNorm optimizers' per-step cache)."""

from __future__ import annotations

import itertools
import operator

import torch
from torch import Tensor

from .dispatch import plan_groups, run_znorm_
from .dtensors import dtensor_positions, dtensors_possible
from .grad_watch import MOVED, SAME, new_watch, swapping
from .guards import layout_guard, same_addresses_or_raise
from .options import check_options
from .overlap import disjoint, span
from .registry import GroupFn
from .stats import StatsBuffer

__all__ = ["GradientGroups"]

_data_ptr, _numel = Tensor.data_ptr, Tensor.numel


def _pick(present: list[Tensor], idx: list[int] | None) -> list[Tensor]:
    """A group's gradients among the present ones (``idx`` None: all of them)."""
    return present if idx is None else list(map(present.__getitem__, idx))


class GradientGroups:
    """A step's gradients are usually new tensor objects (``zero_grad(set_to_none=True)``), at the same
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

    Given the parameters whose gradients these are (the hook does), the same decisions are taken in one native
    call (``steady``, a ``grad_watch`` GradWatch) where every group can run so: the native op's groups, and
    groups whose bound function can launch without being handed its tensors (``launch_only``).
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
        self.starts: list[int] = []  # data_ptr of every present gradient, in order (or an int64 array)
        self.indices: list[int] = []  # range(len(self.starts)), for the one-call address check
        # Rule 11 for gradients that moved: per device, the positions (among the present gradients) of the
        # normalized ones, and every present gradient's span in bytes; None where the last check dropped a
        # duplicate (a move then takes the full path).
        self.by_device: list[list[int]] | None = None
        self.spans: list[int] = []
        # (group function, the function bound to the present gradients' addresses, positions among the
        # present gradients; None: all of them, in order)
        self.plan: list[tuple[GroupFn, GroupFn, list[int] | None]] = []
        # The native steady path: the watch over ``watched`` (the parameters list object it was made for),
        # and the bound launches of the groups it does not run itself.
        self.watch = None
        self.watched: list[Tensor] | None = None
        self.launches: list = []
        self.watch_runs = False  # whether the watch runs groups of its own (else all groups are launches)
        self.addresses = None  # the watch's addresses() as an int64 array (rewritten by the watch on moves)

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
            if not isinstance(self.starts, list):  # the watch's addresses, kept as its last move left them
                self.starts = self.starts.tolist()
            if same_addresses_or_raise(present, self.starts, self.indices):
                return present
            starts = list(map(_data_ptr, present))
        except (TypeError, RuntimeError):  # not a tensor, or no storage: the full path says what is wrong
            return None
        try:
            return present if self._moved(present, starts) else None
        except BaseException:
            # Groups may be left moved in part (a bound group moves its own plan in place): never reuse them
            # (the next call takes the full path).
            self.length = -1
            self.watch = self.watched = None
            raise

    def _moved(self, present: list[Tensor], starts: list[int]) -> bool:
        """The same layouts at new addresses: whether rule 11 still holds (then the groups are bound to the
        new addresses and True returned), else False."""
        if self.by_device is None:
            return False
        ends = list(map(operator.add, starts, self.spans))
        for idx in self.by_device:
            if not disjoint(list(map(starts.__getitem__, idx)), list(map(ends.__getitem__, idx))):
                return False
        self._rebind(present, starts)
        return True

    def _rebind(self, present: list[Tensor], starts: list[int]) -> None:
        """Bind the groups to the present gradients at their new addresses ``starts`` (rule 11 checked)."""
        plan = []
        for fn, bound, idx in self.plan:
            rebind = getattr(bound, "rebind", None)
            if rebind is not None:
                if idx is None:
                    bound = rebind(present, tuple(starts))
                else:
                    bound = rebind(_pick(present, idx), tuple(map(starts.__getitem__, idx)))
            plan.append((fn, bound, idx))
        self.plan, self.starts = plan, starts
        if self.watch is not None:
            self.launches = [bound.launch_only for fn, bound, _ in plan if not hasattr(fn, "native_op")]

    def _rebase(self, starts) -> None:
        """Move the groups, every one bound with a launch (``launch_only``), to the present gradients' new
        addresses ``starts`` (an int64 array, in order; rule 11 checked), which is all such a move needs."""
        plan = []
        for fn, bound, idx in self.plan:
            bound = bound.rebind(None, starts if idx is None else starts[idx])
            plan.append((fn, bound, idx))
        # (``starts`` stays an array: the Python path makes it a list only where it compares addresses)
        self.plan, self.starts = plan, starts
        self.launches = [bound.launch_only for _, bound, _ in plan]

    def _check(
        self, grads: list[Tensor | None], names: list[str], params: list[Tensor] | None = None
    ) -> list[Tensor]:
        """The full path: check and group (raising for bad gradients), bind the groups, cache the key; with
        ``params`` (whose gradients ``grads`` are), a native watch where every group allows one."""
        self.length = -1
        self.watch = self.watched = None
        _, plan = plan_groups(grads, self.backend, names)
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
        self.spans = [span(g) if _numel(g) >= 2 else 0 for g in present]
        self.guard = layout_guard(present)
        self.starts = list(map(_data_ptr, present))
        self.indices = list(range(len(present)))
        self.length = len(grads)
        if params is not None and self.stats is None:
            self._watch(params)
        return present

    def _watch(self, params: list[Tensor]) -> None:
        """A native watch of ``params``' gradients, recorded as the last check left them, where every group
        of the plan is the native op's or can launch without its tensors."""
        self.watch = self.watched = None
        native, launches = [], []
        for fn, bound, idx in self.plan:
            if hasattr(fn, "native_op"):
                native.append(self.indices if idx is None else idx)
            elif hasattr(bound, "launch_only"):
                launches.append(bound.launch_only)
            else:
                return
        watch = new_watch(params)
        moves = self.by_device is not None
        if watch is not None and watch.record(native, self.by_device or [], moves, not launches):
            self.watch, self.watched, self.launches, self.watch_runs = watch, params, launches, bool(native)
            # A view of the watch's own buffer of the gradients' addresses, which each move rewrites.
            self.addresses = watch.addresses().numpy()

    def steady(self, params: list[Tensor], grad_scale: Tensor | None) -> bool:
        """The step in one native call where the watch made for ``params`` finds their gradients as recorded
        (or moved, still disjoint): True when done; False where the caller must read the gradients and call
        ``znorm_`` (no watch, or something changed)."""
        watch = self.watch
        if watch is None or params is not self.watched:
            return False
        if swapping():  # torch may swap the parameters, which it refuses while the watch holds them
            self.watch = self.watched = None
            return False
        status = watch.step(self.eps, self.correction, grad_scale)
        if status == SAME:  # the watch ran the native groups (those it could run alone, also after a move)
            for launch in self.launches:
                launch(self.eps, self.correction, grad_scale)
            return True
        if status == MOVED and not self.watch_runs:  # every group a launch: moved by address alone
            try:
                self._rebase(self.addresses)
            except BaseException:
                self.watch = self.watched = None  # as below
                self.length = -1
                raise
            for launch in self.launches:
                launch(self.eps, self.correction, grad_scale)
            return True
        if status == MOVED:  # the watch ran nothing: the groups bound again, then run
            present = watch.take()
            try:
                self._rebind(present, list(map(_data_ptr, present)))
            except BaseException:
                # The watch has recorded the new addresses, the groups may be bound to the old ones or moved
                # in part: never reuse either (the next step takes the full path).
                self.watch = self.watched = None
                self.length = -1
                raise
            for _, bound, idx in self.plan:  # bound just now: Triton's launch without its tensors
                launch = getattr(bound, "launch_only", None)
                if launch is None:
                    bound(_pick(present, idx), self.eps, self.correction, grad_scale)
                else:
                    launch(self.eps, self.correction, grad_scale)
            return True
        return False

    def znorm_(
        self,
        grads: list[Tensor | None],
        names: list[str],
        grad_scale: Tensor | None,
        params: list[Tensor] | None = None,
    ) -> None:
        """Normalize ``grads`` (None entries skipped; ``names`` for error messages) in place; ``params``, the
        parameters whose gradients they are, for a native watch of the next steps (``steady``)."""
        present = self._present(grads)
        if present is None:
            if dtensors_possible() and dtensor_positions(grads):
                # DTensor gradients (FSDP2): uncached, through run_znorm_ (their statistics cross ranks).
                self.length = -1  # the cached plan (if any) is not this list's
                self.watch = self.watched = None
                run_znorm_(grads, self.eps, self.correction, self.backend, grad_scale, names, self.stats)
                if self.stats is not None:
                    self.stats.unscale(grad_scale)
                return
            present = self._check(grads, names, params)
        elif self.watch is not None and params is not None:
            # The watch was not asked, or said otherwise: it records these gradients as they are now.
            self._watch(params)
        self._run(present, grad_scale)

    def _run(self, present: list[Tensor], grad_scale: Tensor | None) -> None:
        if self.stats is None:
            for _, fn, idx in self.plan:
                fn(_pick(present, idx), self.eps, self.correction, grad_scale)
            return
        for (_, fn, idx), out in zip(self.plan, self.stats_out):
            fn(_pick(present, idx), self.eps, self.correction, grad_scale, stats=out)
        self.stats.unscale(grad_scale)

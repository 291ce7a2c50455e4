"""The training step: forward, loss, backward, the optimizer's pre-hooks (the gradient treatment) and its
step, with the epoch's loss sum and correct count kept on the device. ``EagerStep`` runs it as written;
``GraphedStep`` captures it once in a CUDA graph and replays it (issue #26: a ResNet-56 step of batch 256 is
bound by launching its kernels, not by the GPU).

Graphed: the first ``WARMUP`` steps of a batch shape run eagerly on a side stream (they are real steps and
count; they also give the optimizer its state and the hook its plans, outside the graph), then the step is
captured (capturing runs nothing) and every later step of that shape copies its batch into the static
inputs and replays. The step's kernels hold the learning rate as a constant, so a step whose rates differ
from the captured ones (the scheduler's, once per epoch) captures again. A batch of another shape (a kept
last partial batch) runs eagerly. Everything the graph reads stays where it was: the parameters, the
optimizer state, the static inputs; the gradients the capture made stay in the graph's memory pool.

``capture`` is the one thing that needs CUDA: it takes the step's body and returns what replays it. Tests on
the CPU hand ``GraphedStep`` a stand-in that replays by running the body again, which checks everything else
(warm-up, static inputs, captures again, eager batches, the sums) against ``EagerStep``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EagerStep", "GraphedStep", "cuda_capture", "graph_blocker"]


class EagerStep:
    """One training step as written (``optimizer.zero_grad(set_to_none=True)``, backward, step; a GradScaler
    where given). Calling it returns the batch's loss (a 0-d tensor); ``take()`` returns and resets the sums
    since the last take: (loss sum over examples, correct predictions)."""

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.forward, self.optimizer, self.scaler = forward, optimizer, scaler
        self.device, self.amp_dtype = device, amp_dtype
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self._step(x, y, cache=True)

    def _step(self, x: Tensor, y: Tensor, cache: bool) -> Tensor:
        # (Autocast's cast cache must be off inside a graph capture; the casts are the same either way.)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None, cache_enabled=cache
        ):
            logits = self.forward(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        loss = loss.detach()
        self.loss_sum += loss.double() * y.shape[0]
        self.correct += (logits.detach().argmax(1) == y).sum()
        return loss

    def take(self) -> tuple[float, int]:
        out = self.loss_sum.item(), int(self.correct.item())
        self.loss_sum.zero_()
        self.correct.zero_()
        return out


Replay = Callable[[], Tensor]


def cuda_capture(body: Callable[[], Tensor], pool) -> Replay:
    """``body`` captured in a CUDA graph (in memory ``pool``, shared by a run's captures); its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = body()

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay


class GraphedStep(EagerStep):
    """The step captured in a CUDA graph and replayed (see the module docstring). ``capture(body, pool)``
    returns a replay of ``body`` (``cuda_capture``; tests pass a stand-in); ``side_stream``: the warm-up's
    context (a side stream on CUDA)."""

    WARMUP = 3

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        *,
        capture: Callable[[Callable[[], Tensor], object], Replay] = cuda_capture,
        side_stream: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        super().__init__(forward, optimizer, device, amp_dtype)
        self.capture = capture
        cuda = device.type == "cuda"
        if side_stream is None:
            side_stream = _SideStream(device) if cuda else contextlib.nullcontext
        self.side_stream = side_stream
        # Warm-up, capture and replays run under the step's device (its streams are that device's).
        self.on_device = (lambda: torch.cuda.device(device)) if cuda else contextlib.nullcontext
        self.pool = torch.cuda.graph_pool_handle() if cuda else None
        self.shape: tuple | None = None  # the batch shape captured (x's, y's)
        self.rates: tuple[float, ...] | None = None  # the learning rates captured
        self.replay: Replay | None = None
        self.warm = 0  # eager steps of self.shape so far
        self.static_x: Tensor | None = None
        self.static_y: Tensor | None = None
        self.captures = 0  # how many times the step was captured (a diagnostic)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """The step on this batch; returns its loss (from a replay: the graph's output, overwritten by the
        next replay)."""
        shape = (tuple(x.shape), tuple(y.shape))
        if self.shape is None:
            self.shape = shape
        if shape != self.shape:  # another shape (a kept partial batch): eagerly
            return super().__call__(x, y)
        with self.on_device():
            rates = tuple(g["lr"] for g in self.optimizer.param_groups)
            if self.replay is None or rates != self.rates:
                if self.warm < self.WARMUP:
                    self.warm += 1
                    with self.side_stream():
                        return super().__call__(x, y)
                self._capture(x, y, rates)
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            return self.replay()

    def _capture(self, x: Tensor, y: Tensor, rates: tuple[float, ...]) -> None:
        if self.static_x is None:
            self.static_x, self.static_y = torch.empty_like(x), torch.empty_like(y)
        self.optimizer.zero_grad(set_to_none=True)  # the capture makes the gradients, in the graph's pool
        # The last graph (if any) is let go only after the new one is captured: the pool lives as long as a
        # graph uses it (torch's allocator refuses a capture into a pool no graph holds).
        self.replay = self.capture(lambda: self._step(self.static_x, self.static_y, cache=False), self.pool)
        self.rates = rates
        self.captures += 1


class _SideStream:
    """Runs a block on one side stream of ``device``, ordered after and before the current one (warm-up
    before capture, as torch.cuda.graphs asks)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def __call__(self):
        if self.side is None:
            self.side = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            yield
        current.wait_stream(self.side)


def graph_blocker(amp: str, compile_model: bool, device: torch.device) -> str | None:
    """Why a run's step cannot be captured (``amp``: the run's --amp), or None."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if amp == "fp16":
        return "--amp fp16's GradScaler is not captured (use --amp bf16)"
    if compile_model:
        return "--compile is not combined with the graph (torch.compile has its own, mode='reduce-overhead')"
    return None

"""The training step, eager or graphed (znorm_kernels.cifar.steps): on the CPU ``GraphedStep`` runs with a
stand-in for CUDA-graph capture that replays by running the captured body again, with the learning rates it
was captured with (as a CUDA graph holds them), so everything but the capture itself is checked against the
eager step bit for bit: warm-up, static inputs, captures again when a rate changes, batches of another
shape, the sums. On a GPU the real capture is checked against the eager step, and ``train`` with and without
``--graph``."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

import znorm_kernels
from znorm_kernels.cifar.config import Config, UsageError
from znorm_kernels.cifar.steps import EagerStep, GraphedStep, graph_blocker
from znorm_kernels.cifar.train import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class StandInCapture:
    """Stands in for ``cuda_capture``: nothing runs at capture; a replay runs the body with the learning
    rates of the capture (the constants a CUDA graph's kernels hold)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.captures = 0
        self.step: GraphedStep | None = None  # set by the test: its last replay must live through a capture
        self.kept_last = []

    def __call__(self, body, pool):
        rates = [g["lr"] for g in self.optimizer.param_groups]
        if self.captures and self.step is not None:
            self.kept_last.append(self.step.replay is not None)
        self.captures += 1

        def replay():
            now = [g["lr"] for g in self.optimizer.param_groups]
            for g, lr in zip(self.optimizer.param_groups, rates):
                g["lr"] = lr
            try:
                return body()
            finally:
                for g, lr in zip(self.optimizer.param_groups, now):
                    g["lr"] = lr

        return replay


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # (No bias in front of BatchNorm: its gradient is rounding noise, which ZNorm scales to unit variance.)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


def _batches(count: int, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 5, (size,), generator=g))
        for _ in range(count)
    ]


def _run(graphed: bool, method: str, opt_name: str, schedule: list[tuple[int, float]], batches):
    model = _model()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgdm"
           else torch.optim.Adam(model.parameters(), lr=1e-2))  # fmt: skip
    if method == "znorm":
        znorm_kernels.register(opt, backend="reference")
    elif method == "gc":
        znorm_kernels.register_gc(opt)
    elif method == "clip":
        znorm_kernels.register_clip(opt, max_norm=0.1)
    device = torch.device("cpu")
    capture = StandInCapture(opt)
    step = (GraphedStep(model, opt, device, capture=capture, side_stream=contextlib.nullcontext) if graphed
            else EagerStep(model, opt, device))  # fmt: skip
    capture.step = step if graphed else None
    losses, sums, window = [], [], []
    for i, (x, y) in enumerate(batches):
        for at, lr in schedule:
            if i == at:
                for group in opt.param_groups:
                    group["lr"] = lr
        losses.append(step(x, y).clone())
        window.append(losses[-1].double() * y.shape[0])
        if i % 4 == 3:
            sums.append(step.take())
            assert sums[-1][0] == sum(window).item(), "the loss summed over the examples since the last take"
            window = []
    assert all(capture.kept_last), "the last graph kept until the next is captured (its pool stays held)"
    return model, losses, sums, capture.captures


@pytest.mark.parametrize("method", ["baseline", "znorm", "gc", "clip"])
@pytest.mark.parametrize("opt_name", ["sgdm", "adam"])
def test_a_graphed_step_trains_as_the_eager_one(method, opt_name):
    # 12 batches of 8 and, after the 7th, one of 5 (another shape: eager) then more of 8; the rate
    # changes at steps 5 and 9 (the scheduler's), so the step is captured three times.
    batches = _batches(12)
    batches.insert(7, _batches(1, size=5, seed=1)[0])
    schedule = [(5, 0.05), (9, 0.01)]
    eager, eager_losses, eager_sums, _ = _run(False, method, opt_name, schedule, batches)
    graphed, losses, sums, captures = _run(True, method, opt_name, schedule, batches)
    assert captures == 3, "captured after the warm-up, then at each new rate"
    for a, b in zip(eager.state_dict().values(), graphed.state_dict().values()):
        assert torch.equal(a, b)
    assert all(map(torch.equal, eager_losses, losses))
    assert eager_sums == sums


def test_a_graphed_step_warms_up_eagerly_then_replays_on_its_static_inputs():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    capture = StandInCapture(opt)
    warm = []

    @contextlib.contextmanager
    def side():
        warm.append(1)
        yield

    step = GraphedStep(model, opt, torch.device("cpu"), capture=capture, side_stream=side)
    batches = _batches(GraphedStep.WARMUP + 3)
    for i, (x, y) in enumerate(batches):
        step(x, y)
        assert len(warm) == min(i + 1, GraphedStep.WARMUP), "the first steps on the side stream"
        assert capture.captures == (i >= GraphedStep.WARMUP)
    x, y = batches[-1]
    assert torch.equal(step.static_x, x) and torch.equal(step.static_y, y)
    assert step.static_x is not x, "the batch is copied into the captured inputs"


@pytest.mark.parametrize("saved, now", [(True, False), (False, True)])
def test_a_resumed_adam_takes_this_runs_capturable_setting(saved, now):
    # graph is a runtime setting: a checkpoint of a graphed run (capturable Adam, step counters on the
    # device) resumes eagerly and the other way round. (On the CPU a capturable step refuses to run.)
    from znorm_kernels.cifar.build import match_capturable

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _batches(1)[0]
    EagerStep(model, opt, torch.device("cpu"))(x, y)
    state = opt.state_dict()
    for group in state["param_groups"]:
        group["capturable"] = saved
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=now)
    fresh.load_state_dict(state)
    assert all(g["capturable"] is saved for g in fresh.param_groups), "torch keeps the saved flag"
    match_capturable(fresh, now)
    assert all(g["capturable"] is now for g in fresh.param_groups)
    steps = [s["step"] for s in fresh.state.values()]
    assert steps and all(s.device == torch.device("cpu") for s in steps)
    if not now:
        EagerStep(model, fresh, torch.device("cpu"))(x, y)  # runs: the saved capturable flag is gone
        assert all(float(s["step"]) == 2 for s in fresh.state.values())


def test_a_graphed_runs_adam_checkpoint_resumes_eagerly(tmp_path):
    # (A checkpoint as a graphed GPU run writes it: capturable Adam. On the CPU its step would refuse.)
    cfg = Config(model="resnet8", dataset="fake", fake_train=64, fake_test=32, fake_size=8, batch_size=32,
                 epochs=2, optimizer="adam", device="cpu")  # fmt: skip
    quiet = lambda *_: None
    train(cfg, tmp_path, progress=False, log=quiet, stop_after=1)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    for group in ckpt["optimizer"]["param_groups"]:
        group["capturable"] = True
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    metrics = train(cfg, tmp_path, progress=False, log=quiet, resume=True)
    assert len(metrics) == 2


def test_graph_blockers_and_the_runs_flag(tmp_path):
    cpu = torch.device("cpu")
    assert "CUDA" in graph_blocker("off", False, cpu)
    cuda = torch.device("cuda")
    assert graph_blocker("bf16", False, cuda) is None and graph_blocker("off", False, cuda) is None
    assert "fp16" in graph_blocker("fp16", False, cuda)
    assert "compile" in graph_blocker("bf16", True, cuda)
    tiny = Config(model="resnet8", dataset="fake", fake_train=64, fake_test=32, fake_size=8, batch_size=32,
                  epochs=1, device="cpu")  # fmt: skip
    with pytest.raises(UsageError, match="--graph on: CUDA graphs need a CUDA device"):
        train(replace(tiny, graph="on"), tmp_path / "on", progress=False, log=lambda *_: None)
    metrics = train(tiny, tmp_path / "auto", progress=False, log=lambda *_: None)
    assert metrics[0]["treatment_seconds"] is not None, "eager: the treatment timed"
    resolved = json.loads((tmp_path / "auto" / "config.json").read_text())["_resolved"]
    assert resolved["graphed"].startswith("no: CUDA graphs need")
    with pytest.raises(UsageError, match="unknown graph"):
        train(replace(tiny, graph="sometimes"), tmp_path / "bad", progress=False, log=lambda *_: None)


# --- on a GPU ---


@needs_cuda
@pytest.mark.parametrize("opt_name", ["sgdm", "adam"])
def test_on_cuda_a_captured_step_with_the_hook_agrees_with_the_eager_one(opt_name):
    """The real capture: forward, backward, the ZNorm hook (Triton where available) and the optimizer step,
    bf16 autocast, replayed; the same parameters as eager steps within rounding, over steps that include a
    new rate."""
    backend = "triton" if "triton" in znorm_kernels.available_backends() else "cuda"

    def run(graphed: bool):
        model = _model().cuda().to(memory_format=torch.channels_last)
        kw = dict(capturable=True) if opt_name == "adam" else {}
        opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgdm"
               else torch.optim.Adam(model.parameters(), lr=1e-2, **kw))  # fmt: skip
        znorm_kernels.register(opt, backend=backend)
        step = (GraphedStep(model, opt, torch.device("cuda"), torch.bfloat16) if graphed
                else EagerStep(model, opt, torch.device("cuda"), torch.bfloat16))  # fmt: skip
        for i, (x, y) in enumerate(_batches(10)):
            if i == 6:
                for group in opt.param_groups:
                    group["lr"] *= 0.5
            step(x.cuda(), y.cuda())
        torch.cuda.synchronize()
        return model, step

    eager, _ = run(False)
    graphed, step = run(True)
    assert step.captures == 2
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@needs_cuda
def test_on_cuda_train_graphed_and_eager_record_the_same_epoch(tmp_path):
    cfg = Config(model="resnet8", dataset="fake", fake_train=256, fake_test=64, fake_size=16, batch_size=64,
                 epochs=2, method="znorm", amp="bf16", lr_schedule="step", device="cuda")  # fmt: skip
    eager = train(replace(cfg, graph="off"), tmp_path / "eager", progress=False, log=lambda *_: None)
    graphed = train(replace(cfg, graph="on"), tmp_path / "graphed", progress=False, log=lambda *_: None)
    for e, g in zip(eager, graphed):
        assert g["treatment_seconds"] is None and e["treatment_seconds"] > 0
        # The same steps up to rounding (cuDNN may pick other kernels): a few examples' predictions apart.
        for key in ("train_loss", "test_loss"):
            assert abs(e[key] - g[key]) <= 0.02 * abs(e[key]) + 1e-3, key
        for key in ("train_acc", "test_acc"):
            assert abs(e[key] - g[key]) <= 4 / 64, key

"""Integrations: the Lightning and Hugging Face callbacks run ZNorm once per optimizer step, on the
gradients ``register`` would see (unscaled, after accumulation), and train to the same weights; DeepSpeed ZeRO
is refused. Tiny models on the CPU; Lightning and transformers tests skip where those packages are absent."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import znorm_kernels
from znorm_kernels.integrations import applier
from znorm_kernels.integrations.deepspeed import check_not_deepspeed_zero, deepspeed_zero_reason

N, D_IN, D_OUT, STEPS, LR = 8, 4, 2, 3, 0.1


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 3), nn.Tanh(), nn.Linear(3, D_OUT))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, D_OUT, generator=g)


def reference_run(accumulate: int, steps: int = STEPS):
    """A plain loop with ``register``: the gradients its hook sees at each step, and the final weights. Each
    step uses the whole data set, split into ``accumulate`` equal micro-batches (so the summed gradient does
    not depend on the order in which a framework's sampler visits them)."""
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.clone() for p in net.parameters()]))
    znorm_kernels.register(opt)
    x, y = data()
    for _ in range(steps):
        opt.zero_grad()
        for xb, yb in zip(x.chunk(accumulate), y.chunk(accumulate)):
            (nn.functional.mse_loss(net(xb), yb) / accumulate).backward()
        opt.step()
    return seen, [p.detach().clone() for p in net.parameters()]


@pytest.fixture
def spy(monkeypatch):
    """Counts the callbacks' ZNorm calls and keeps a copy of the gradients each call was given."""
    calls = []
    real = applier.znorm_

    def znorm_spy(grads, **kw):
        calls.append(([g.clone() for g in grads], kw.get("grad_scale"), kw.get("names")))
        return real(grads, **kw)

    monkeypatch.setattr(applier, "znorm_", znorm_spy)
    return calls


def assert_close_lists(got, want, **tol):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def assert_once_per_step_as_register(spy, weights, accumulate: int):
    """A callback's run (``spy``'s calls, the final ``weights``) against ``reference_run``: ZNorm once per
    optimizer step, unscaled, on the gradients ``register`` sees, and the same weights."""
    seen, want = reference_run(accumulate)
    assert len(spy) == STEPS  # once per optimizer step, not per micro-batch
    for (grads, scale, _), ref in zip(spy, seen):
        assert scale is None
        assert_close_lists(grads, ref, rtol=1e-5, atol=1e-7)
    assert_close_lists(weights, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- Lightning


def lightning_run(callback, accumulate: int, fused: bool | None = None, **trainer_kw):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_net()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9, fused=fused)

    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=N // accumulate)
    module = Module()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=STEPS,
            accumulate_grad_batches=accumulate,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            **trainer_kw,
        )
        trainer.fit(module, loader)
    return [p.detach().clone() for p in module.net.parameters()]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_callback_once_per_step_equals_register(spy, accumulate):
    pytest.importorskip("lightning.pytorch")  # before importing the callback, which needs it
    from znorm_kernels.integrations.lightning import ZNormCallback

    weights = lightning_run(ZNormCallback(), accumulate)
    assert_once_per_step_as_register(spy, weights, accumulate)


def test_lightning_callback_runs_before_clipping(spy):
    """Lightning clips after the callback: ZNorm sees the unclipped gradients, and the clipping then acts on
    the z-scores (the weights differ from an unclipped run)."""
    pytest.importorskip("lightning.pytorch")  # before importing the callback, which needs it
    from znorm_kernels.integrations.lightning import ZNormCallback

    weights = lightning_run(ZNormCallback(), 1, gradient_clip_val=1e-3)
    seen, unclipped = reference_run(1)
    assert len(spy) == STEPS
    assert_close_lists(spy[0][0], seen[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(weights[0], unclipped[0])


@pytest.mark.parametrize("fused", [None, True])
def test_lightning_callback_under_fp16_amp(spy, fused):
    """16-mixed with a GradScaler (on the CPU through a MixedPrecision plugin given one). Lightning unscales
    before the callback, so ZNorm gets the unscaled gradients; with a fused optimizer it does not, and the
    callback keeps them scaled for the fused step. Either way the weights match register() under the same
    scaler."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins.precision import MixedPrecision

    from znorm_kernels.integrations.lightning import ZNormCallback

    # Only the set-up may be missing (a Lightning or torch without fp16 on the CPU): the run itself, which is
    # where the callback's scaler handling shows, must pass or fail, never skip.
    try:
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except Exception as e:  # pragma: no cover - depends on the Lightning / torch versions
        pytest.skip(f"fp16 AMP on the CPU not available here: {e}")
    weights = lightning_run(ZNormCallback(), 1, fused=fused, plugins=[plugin])
    assert pl is not None and len(spy) == STEPS
    assert all((call[1] is None) == (not fused) for call in spy)
    # fp16 autocast changes the gradients themselves: compare with register() under the same autocast.
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, fused=fused)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.clone() for p in net.parameters()]))
    znorm_kernels.register(opt)
    scaler = torch.amp.GradScaler("cpu")
    x, y = data()
    for _ in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    for (grads, *_), ref in zip(spy, seen):
        assert_close_lists(grads, ref, rtol=1e-4, atol=1e-6)
    assert_close_lists(weights, [p.detach() for p in net.parameters()], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- Hugging Face


class _Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = data()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _HFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, x, labels=None):
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


def hf_run(callback, accumulate: int, tmp_path, max_grad_norm: float = 0.0):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = _HFNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=N // accumulate,
        gradient_accumulation_steps=accumulate,
        max_steps=STEPS,
        max_grad_norm=max_grad_norm,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_Pairs(), optimizers=(opt, sched), callbacks=[callback]
        )
        trainer.train()
    return [p.detach().clone() for p in model.net.parameters()]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hf_callback_once_per_step_equals_register(spy, accumulate, tmp_path):
    pytest.importorskip("transformers")
    from znorm_kernels.integrations.hf import ZNormTrainerCallback

    weights = hf_run(ZNormTrainerCallback(), accumulate, tmp_path)
    assert_once_per_step_as_register(spy, weights, accumulate)


def test_hf_callback_runs_after_clipping_and_undoes_it(spy, tmp_path):
    """The Trainer clips before on_pre_optimizer_step: ZNorm sees clipped gradients, and since every tensor
    here has 2 or more elements, the z-scores (hence the weights) are those of an unclipped run, up to eps
    (1e-10 against standard deviations that clipping shrank to ~1e-5: a few 1e-6 on the weights)."""
    pytest.importorskip("transformers")
    from znorm_kernels.integrations.hf import ZNormTrainerCallback

    weights = hf_run(ZNormTrainerCallback(), 1, tmp_path, max_grad_norm=1e-3)
    seen, want = reference_run(1)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in spy[0][0]]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)  # clipped before ZNorm
    assert not torch.allclose(spy[0][0][0], seen[0][0])
    assert_close_lists(weights, want, rtol=1e-4, atol=1e-5)


class _ScalerWrapper:
    """What accelerate's AcceleratedOptimizer exposes under fp16: the optimizer and its GradScaler."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler


@pytest.mark.parametrize("fused", [False, True])
def test_hf_callback_unscales_loss_scaled_gradients(spy, fused):
    """fp16 without clipping can leave the gradients loss-scaled at on_pre_optimizer_step (real fp16 Trainer
    runs need CUDA; here a CPU GradScaler plays the accelerator's). The callback unscales through the scaler
    (ordinary optimizer) or keeps s * z-scores for the fused step (fused=True); either way the weights match
    register() under the same scaler, and a non-finite step is still skipped."""
    pytest.importorskip("transformers")
    from znorm_kernels.integrations.hf import ZNormTrainerCallback

    if fused:
        try:
            torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1, fused=True)
        except (RuntimeError, ValueError) as e:
            pytest.skip(f"fused SGD unavailable on the CPU: {e}")

    def run(use_callback: bool):
        net = tiny_net()
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, fused=fused or None)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        callback = ZNormTrainerCallback()
        if not use_callback:
            znorm_kernels.register(opt)
        x, y = data()
        for step in range(STEPS + 1):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y) * (float("inf") if step == 1 else 1.0)
            scaler.scale(loss).backward()
            if use_callback:
                callback.on_pre_optimizer_step(
                    None, None, None, optimizer=_ScalerWrapper(opt, scaler), model=net
                )
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in net.parameters()], scaler.get_scale()

    got, got_scale = run(True)
    want, want_scale = run(False)
    assert len(spy) == STEPS + 1 and got_scale == want_scale == 1024.0 / 2  # the inf step was skipped
    if fused:
        assert all(call[1] is not None for call in spy)  # kept scaled for the fused step's own unscaling
    else:
        assert all(call[1] is None for call in spy)
        seen, _ = reference_run(1, steps=1)
        assert_close_lists(spy[0][0], seen[0], rtol=1e-5, atol=1e-7)  # unscaled gradients
    assert_close_lists(got, want, rtol=1e-5, atol=1e-6)


def test_hf_callback_refuses_deepspeed():
    pytest.importorskip("transformers")
    from znorm_kernels.integrations.hf import ZNormTrainerCallback

    wrapper = type("DeepSpeedOptimizerWrapper", (), {})()
    wrapper.optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        ZNormTrainerCallback().on_pre_optimizer_step(None, None, None, optimizer=wrapper, model=None)


# --------------------------------------------------------------------------------------------- DeepSpeed


def fake_deepspeed(name: str, module: str = "deepspeed.runtime.zero.stage_1_and_2", base=object):
    """A stand-in for a DeepSpeed class: same name and module, none of its code."""
    return type(name, (base,), {"__module__": module})


@pytest.mark.parametrize(
    "name",
    ["DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "ZeROOptimizer", "BF16_Optimizer"],
)
def test_register_refuses_deepspeed_zero_optimizers(name):
    zero = fake_deepspeed(name)()
    zero.optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(10))], lr=0.1)  # the flat partition
    with pytest.raises(RuntimeError, match=r"DeepSpeed .*DDP.*znorm_kernels.register"):
        znorm_kernels.register(zero)
    sub = type("Mine", (type(zero),), {"__module__": "mine"})()  # subclasses are caught through the MRO
    with pytest.raises(RuntimeError, match="flattens each param group"):
        check_not_deepspeed_zero(sub)


def test_register_refuses_zero3_tensors_in_a_torch_optimizer():
    flat = nn.Parameter(torch.zeros(10))
    flat.ds_id = "0_3"  # what ZeRO-3 sets on its flat fp32 partitions
    opt = torch.optim.SGD([flat], lr=0.1)
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        znorm_kernels.register(opt)


def test_engines_and_wrappers_are_looked_through():
    engine_cls = fake_deepspeed("DeepSpeedEngine", "deepspeed.runtime.engine")
    plain = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    engine = engine_cls()
    engine.optimizer = plain
    engine.zero_optimization_stage = lambda: 2
    assert "ZeRO stage 2" in deepspeed_zero_reason(engine)
    engine.zero_optimization_stage = lambda: 0
    assert deepspeed_zero_reason(engine) is None  # stage 0 around a plain optimizer keeps per-tensor grads
    lightning_like = type("LightningOptimizer", (), {})()
    lightning_like._optimizer = fake_deepspeed(
        "DeepSpeedZeroOptimizer_Stage3", "deepspeed.runtime.zero.stage3"
    )()
    with pytest.raises(RuntimeError, match="Stage3"):
        check_not_deepspeed_zero(lightning_like)


def test_lookalikes_and_plain_optimizers_pass():
    check_not_deepspeed_zero(fake_deepspeed("DeepSpeedZeroOptimizer", "mylib.optim")())  # not deepspeed's
    check_not_deepspeed_zero(fake_deepspeed("FusedAdam", "deepspeed.ops.adam.fused_adam")())  # per-tensor
    net = nn.Linear(3, 2)
    znorm_kernels.register(torch.optim.SGD(net.parameters(), lr=0.1)).remove()


def test_lightning_callback_refuses_deepspeed_zero():
    pytest.importorskip("lightning.pytorch")
    from znorm_kernels.integrations.lightning import ZNormCallback

    zero = fake_deepspeed("DeepSpeedZeroOptimizer")()
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        ZNormCallback().on_before_optimizer_step(None, nn.Linear(2, 2), zero)


def test_integrations_package_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, znorm_kernels, znorm_kernels.integrations, znorm_kernels.integrations.deepspeed;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'deepspeed')"
        " if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_callbacks_match_the_hook_on_names_and_copies(spy):
    """The callbacks pass the model's parameter names (for error messages), honour min_ndim, and survive the
    deepcopy that frameworks may apply to callbacks."""
    pytest.importorskip("transformers")
    from znorm_kernels.integrations.hf import ZNormTrainerCallback

    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(2, D_IN)).sum().backward()
    cb = copy.deepcopy(ZNormTrainerCallback(min_ndim=2))
    cb.on_pre_optimizer_step(None, None, None, optimizer=opt, model=net)
    assert len(spy) == 1 and len(spy[0][0]) == 2  # min_ndim=2: the two weight matrices only
    assert spy[0][2] == ["0.weight", "2.weight"]


# ------------------------------------------------------------------ ZNormApplier (what both callbacks share)


def test_unwrap_optimizer():
    """Wrappers are looked through down to the first torch optimizer, which is the one that steps (even if
    it holds another, as Lookahead-style optimizers do); an object that wraps nothing is returned as it is;
    a wrapper that points back at itself ends the search instead of looping."""
    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    outer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    outer.optimizer = sgd
    lightning_like = type("LightningOptimizer", (), {})()
    lightning_like._optimizer = outer
    accelerate_like = _ScalerWrapper(lightning_like, None)
    assert applier.unwrap_optimizer(accelerate_like) is outer
    assert applier.unwrap_optimizer(sgd) is sgd
    bare = type("Bare", (), {})()
    assert applier.unwrap_optimizer(bare) is bare

    class SelfWrapping:
        reads = 0

        @property
        def optimizer(self):
            type(self).reads += 1
            assert self.reads < 50, "unwrap_optimizer loops"
            return self

    looping = SelfWrapping()
    assert applier.unwrap_optimizer(looping) is looping


def _net_with_grads():
    net = tiny_net()
    x, y = data()
    nn.functional.mse_loss(net(x), y).backward()
    return net


def test_applier_caches_selection_and_names_per_optimizer(spy):
    """The model's names are looked up once per optimizer and selection (two optimizers taking turns, as
    in Lightning's manual optimization, keep their own), and again when a param group is added."""
    net = _net_with_grads()
    first, second = list(net.parameters())[:2], list(net.parameters())[2:]
    opt1, opt2 = torch.optim.SGD(first, lr=0.1), torch.optim.SGD(second, lr=0.1)
    lookups = []
    named = net.named_parameters
    net.named_parameters = lambda *a, **k: (lookups.append(1), named(*a, **k))[1]
    apply = applier.ZNormApplier(1e-10, 0, "auto", 1)
    for _ in range(3):
        apply(opt1, net)
        apply(opt2, net)
    assert len(lookups) == 2
    assert [call[2] for call in spy] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]] * 3
    extra = nn.Parameter(torch.zeros(4))
    extra.grad = torch.randn(4, generator=torch.Generator().manual_seed(2))
    opt2.add_param_group({"params": [extra]})
    apply(opt2, net)
    assert len(lookups) == 3 and spy[-1][2] == ["2.weight", "2.bias", ""]  # extra is not in the model
    apply(opt2, net)
    assert len(lookups) == 3 and spy[-1][2] == ["2.weight", "2.bias", ""]


def test_applier_without_a_model(spy):
    """model=None: the optimizer's own names where it has them (built from named_parameters), else none."""
    net = _net_with_grads()
    for opt, names in (
        (torch.optim.SGD(net.parameters(), lr=0.1), ["", "", "", ""]),
        (torch.optim.SGD(net.named_parameters(), lr=0.1), ["0.weight", "0.bias", "2.weight", "2.bias"]),
    ):
        applier.ZNormApplier(1e-10, 0, "auto", 1)(opt, None)
        assert spy[-1][2] == names


def test_applier_errors_name_the_models_parameters():
    """An entry znorm_ refuses is named by the model's parameter name, or by its position alone where the
    model has no such parameter (never by a made-up name)."""
    net = nn.Linear(2, 3)
    net.register_parameter("phase", nn.Parameter(torch.zeros(3, dtype=torch.complex64)))
    extra = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    opt = torch.optim.SGD([*net.parameters(), extra], lr=0.1)
    net.weight.grad = torch.randn(3, 2)
    net.phase.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"^znorm_: tensor at position 2 \(parameter 'phase'\) is complex"):
        applier.ZNormApplier(1e-10, 0, "auto", 1)(opt, net)
    net.phase.grad, extra.grad = None, torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"^znorm_: tensor at position 3 is complex"):
        applier.ZNormApplier(1e-10, 0, "auto", 1)(opt, net)


def test_applier_passes_its_backend_on():
    net = _net_with_grads()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown ZNorm backend 'nope'"):
        applier.ZNormApplier(1e-10, 0, "nope", 1)(opt, net)


def test_applier_refuses_a_zero_engine_around_a_plain_optimizer():
    """The wrapper is checked, not only the optimizer inside: a ZeRO engine holds a plain torch optimizer
    whose param groups it has flattened."""
    net = _net_with_grads()
    engine = fake_deepspeed("DeepSpeedEngine", "deepspeed.runtime.engine")()
    engine.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    engine.zero_optimization_stage = lambda: 2
    before = [p.grad.clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="ZeRO stage 2"):
        applier.ZNormApplier(1e-10, 0, "auto", 1)(engine, net)
    assert_close_lists([p.grad for p in net.parameters()], before, rtol=0, atol=0)


class _FakeScaler:
    """A framework's own scaler-like object: only the attributes given exist."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)
        self.unscaled = []

    def unscale_(self, optimizer):
        self.unscaled.append(optimizer)


@pytest.mark.parametrize(
    ("attrs", "unscales"),
    [
        ({"_scale": torch.tensor(8.0)}, False),  # no is_enabled: not a GradScaler that is on
        ({"is_enabled": lambda: False, "_scale": torch.tensor(8.0)}, False),
        ({"is_enabled": lambda: True}, False),  # no _scale: nothing scaled yet
        ({"is_enabled": lambda: True, "_scale": None}, False),
        ({"is_enabled": lambda: True, "_scale": torch.tensor(8.0)}, True),  # no per-optimizer states
    ],
    ids=["no-is_enabled", "disabled", "no-_scale", "_scale-None", "no-states"],
)
def test_applier_reads_scaler_likes_defensively(spy, attrs, unscales):
    net = _net_with_grads()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = _FakeScaler(**attrs)
    applier.ZNormApplier(1e-10, 0, "auto", 1)(opt, net, scaler)
    assert scaler.unscaled == ([opt] if unscales else []) and spy[-1][1] is None


@pytest.mark.parametrize("case", ["no scaler", "disabled", "scaled", "ready state", "already unscaled"])
def test_applier_unscales_exactly_when_the_gradients_are_scaled(spy, case):
    """A GradScaler holds this optimizer's gradients scaled after scale(loss).backward() until unscale_
    (an entry of its per-optimizer states still at READY has not been unscaled either): the callback
    unscales them then, and only then, so that ZNorm sees the true gradients and scaler.step does not
    unscale twice."""
    from torch.amp.grad_scaler import OptState

    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = None if case == "no scaler" else torch.amp.GradScaler("cpu", 1024.0, enabled=case != "disabled")
    x, y = data()
    loss = nn.functional.mse_loss(net(x), y)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if case == "ready state":
        scaler._per_optimizer_states[id(opt)]  # a fresh entry (a defaultdict), as GradScaler makes it
    if case == "already unscaled":
        scaler.unscale_(opt)
    given = [p.grad.clone() for p in net.parameters()]
    applier.ZNormApplier(1.0, 0, "auto", 1)(opt, net, scaler)  # eps=1: z-scores of s*g and g differ
    scaled = case in ("scaled", "ready state")
    assert_close_lists(spy[-1][0], [g / 1024 for g in given] if scaled else given, rtol=0, atol=0)
    assert spy[-1][1] is None
    if scaled:
        assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED

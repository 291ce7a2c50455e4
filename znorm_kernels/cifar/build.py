"""What a training run is made of: the device, the model, the optimizer and its scheduler, and the gradient
treatment (``method``): none (baseline), ``register_gc``, ``register_clip(max_norm=clip_norm)`` or ZNorm
(the hook ``register(backend=znorm_backend)``, or a ZNorm optimizer); its time is measured by two more
pre-hooks around it (``HookTimer``: CUDA events on the GPU, summed once per epoch, no per-step sync)."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..baselines import register_clip, register_gc
from ..hook import register
from ..optim import ZNormAdam, ZNormSGD
from .config import Config, UsageError, model_depth
from .data import DeviceData, derived_seed
from .models import cifar_resnet

__all__ = [
    "HookTimer",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "grad_stats_row",
    "install_treatment",
    "match_capturable",
    "resolve_device",
    "treatment_name",
    "uses_znorm_optimizer",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"bad --device {name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return device


def build_model(cfg: Config, data: DeviceData, device: torch.device, channels_last: bool) -> nn.Module:
    """The model, initialized from the CPU RNG seeded by ("init", seed): the same weights on any device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed("init", cfg.seed))
        model = cifar_resnet(model_depth(cfg.model), data.num_classes, data.in_channels)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def uses_znorm_optimizer(cfg: Config) -> bool:
    return cfg.method == "znorm" and cfg.znorm_optimizer


def build_optimizer(cfg: Config, model: nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    """torch's SGD (momentum) or Adam; with ``znorm_optimizer`` (method znorm), the library's ZNormSGD or
    ZNormAdam with the same arguments (ZNorm inside the step; gradient statistics kept). ``capturable``:
    Adam's step counters on the device, as a step captured in a CUDA graph needs (SGD has none)."""
    fused = True if cfg.fused else None
    params = list(model.named_parameters())
    adam = dict(capturable=True) if capturable else {}
    if uses_znorm_optimizer(cfg):
        opts = dict(fused=fused, backend=cfg.znorm_backend, track_stats=True)
        if cfg.optimizer == "sgdm":
            return ZNormSGD(
                params, lr=cfg.resolved_lr(), momentum=cfg.momentum, weight_decay=cfg.weight_decay, **opts
            )
        return ZNormAdam(params, lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay, **opts, **adam)
    if cfg.optimizer == "sgdm":
        return torch.optim.SGD(
            params, lr=cfg.resolved_lr(), momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
        )
    return torch.optim.Adam(params, lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay, fused=fused, **adam)


def match_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """After ``load_state_dict``: the loaded groups' ``capturable`` (Adam's) set to this run's, and each
    step counter where that setting wants it (on its parameter's device where capturable or fused, else on
    the CPU). A checkpoint of a graphed run resumes eagerly, and the other way round (``graph`` is a runtime
    setting), where the loaded flag would make the step refuse capture or its devices."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        group["capturable"] = capturable
        on_device = capturable or bool(group.get("fused"))
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu")


def treatment_name(cfg: Config) -> str:
    """What ran, in words (recorded in config.json)."""
    torch_name = {"sgdm": "torch.optim.SGD", "adam": "torch.optim.Adam"}[cfg.optimizer]
    if uses_znorm_optimizer(cfg):
        return {"sgdm": "znorm_kernels.optim.ZNormSGD", "adam": "znorm_kernels.optim.ZNormAdam"}[
            cfg.optimizer
        ]
    hook = {"baseline": None, "gc": "register_gc", "clip": "register_clip", "znorm": "register"}[cfg.method]
    return torch_name if hook is None else f"{hook}({torch_name})"


def grad_stats_row(source) -> dict:
    """Summary of the last step's per-parameter gradient statistics (ZNorm's by-product; no extra pass):
    the smallest, median and largest gradient std over the parameters, and the largest |mean|."""
    stats = source.grad_stats() if source is not None else None
    if stats is None:
        return {}
    std, mean = stats.std, stats.mean
    keep = ~std.isnan()
    if not bool(keep.any()):
        return {}
    std, mean = std[keep], mean[keep]
    return {
        "grad_std_min": std.min().item(),
        "grad_std_median": std.median().item(),
        "grad_std_max": std.max().item(),
        "grad_mean_absmax": mean.abs().max().item(),
    }


def build_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per epoch: cosine to 0 over the run, or x0.1 at 50% and 75% of the epochs."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.lr_schedule == "step":
        milestones = sorted({max(1, cfg.epochs // 2), max(1, cfg.epochs * 3 // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return None


class HookTimer:
    """Times the gradient treatment: a pre-hook registered before it starts the clock, one after it stops.
    On CUDA it records events and sums them in ``collect()`` (once per epoch), never syncing per step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: float | torch.cuda.Event = 0.0

    def start(self, *_: object) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self, *_: object) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._start

    def collect(self) -> float:
        """Seconds spent in the treatment since the last call."""
        total = self.seconds
        if self.events:
            self.events[-1][1].synchronize()
            total += sum(a.elapsed_time(b) for a, b in self.events) / 1000
        self.seconds, self.events = 0.0, []
        return total


def install_treatment(cfg: Config, optimizer: torch.optim.Optimizer, timer: HookTimer | None) -> list:
    """Register the method's pre-hook between the timer's two hooks (none without a timer: a graphed step's
    replays run no hook); returns the handles. (Nothing with a ZNorm optimizer: ZNorm runs inside its step
    and is not timed apart.)"""
    if cfg.method == "baseline" or uses_znorm_optimizer(cfg):
        return []
    handles = [optimizer.register_step_pre_hook(timer.start)] if timer is not None else []
    if cfg.method == "gc":
        handles.append(register_gc(optimizer))
    elif cfg.method == "clip":
        handles.append(register_clip(optimizer, max_norm=cfg.clip_norm))
    else:
        # The backend is checked by then; the statistics feed the metrics.
        handles.append(register(optimizer, backend=cfg.znorm_backend, track_stats=True))
    if timer is not None:
        handles.append(optimizer.register_step_pre_hook(timer.stop))
    return handles

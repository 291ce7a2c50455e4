"""One training run: the configuration, the model/optimizer/treatment set-up, the loop, and checkpointing.

``Config`` holds every setting of a run (``config.json`` is its dict). ``train(config, out_dir)`` trains and
writes, after every epoch: a line of ``metrics.jsonl``, ``checkpoint.pt`` (temp file + ``os.replace``, so an
interrupted run loses at most the epoch in progress) and ``curves.png``.

Determinism: the initial weights come from the CPU RNG forked and seeded by ("init", seed), the data order and
augmentation from generators seeded by (seed, epoch) (see ``data.py``), so every method and optimizer starts
from the same weights and sees the same batches for a given seed. The checkpoint holds model, optimizer,
scheduler, GradScaler and every global RNG state; the data generators need no state because they are
re-seeded each epoch. ``train(..., resume=True)`` therefore continues bit for bit (on the CPU) as if it had
never stopped; on resume the saved config must match the requested one (``RESULT_FIELDS``).

The gradient treatment (``method``) is the package's optimizer pre-hook: none (baseline), ``register_gc``,
``register_clip(max_norm=clip_norm)`` or ``register(backend=znorm_backend)``. Its time is measured by two
more pre-hooks around it (CUDA events on the GPU, summed once per epoch: no per-step synchronization).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import register, register_clip, register_gc
from ..dispatch import resolve_backend
from ..optim import ZNormAdam, ZNormSGD
from .data import (
    DATASETS,
    DataError,
    DeviceData,
    derived_seed,
    epoch_batches,
    load_data,
    normalize,
    steps_per_epoch,
)
from .models import DEPTHS, cifar_resnet, is_cifar_depth
from .report import plot_curves

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "Config",
    "UsageError",
    "load_checkpoint",
    "model_depth",
    "train",
]

OPTIMIZERS = ("sgdm", "adam")
METHODS = ("baseline", "gc", "clip", "znorm")
SCHEDULES = ("none", "cosine", "step")
AMP = ("off", "bf16", "fp16")
DEFAULT_LR = {"sgdm": 0.1, "adam": 1e-3}
CHECKPOINT = "checkpoint.pt"


class UsageError(Exception):
    """Bad input (unknown model, missing data, mismatched checkpoint...): the message says what to do."""


@dataclass
class Config:
    """Every setting of one run. Defaults follow the ZNorm papers: 100 epochs, batch 256, no augmentation."""

    model: str = "resnet56"
    dataset: str = "cifar10"
    optimizer: str = "sgdm"
    method: str = "baseline"
    lr: float | None = None  # None: 0.1 for sgdm, 1e-3 for adam
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 100
    batch_size: int = 256
    last_batch: str = "drop"  # "drop": the last partial batch of each epoch is skipped; "keep": trained on
    augment: bool = False
    lr_schedule: str = "none"
    seed: int = 0
    amp: str = "off"
    clip_norm: float = 0.1
    znorm_backend: str = "auto"
    znorm_optimizer: bool = False  # method znorm: ZNormSGD/ZNormAdam instead of register(torch optimizer)
    fused: bool = False
    val_split: float = 0  # examples (>= 1) or fraction of the TRAIN set held out for choosing hyperparameters
    train_subset: int = 0  # 0: all (remaining) training examples; else a seeded subset of that many
    test_subset: int = 0  # 0: the whole test set; else a seeded subset (quick CPU runs only)
    fake_train: int = 2048
    fake_test: int = 512
    fake_size: int = 32
    # Settings that do not change what is computed (not compared on --resume):
    data: str | None = None
    device: str = "auto"
    compile: bool = False
    channels_last: str = "auto"  # "auto": on CUDA only
    eval_batch_size: int = 1024
    threads: int = 0  # CPU threads for torch (0: torch's default); 1 is fastest on a busy shared machine

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


RUNTIME_FIELDS = ("data", "device", "compile", "channels_last", "eval_batch_size", "threads")
RESULT_FIELDS = tuple(f.name for f in fields(Config) if f.name not in RUNTIME_FIELDS)


def model_depth(name: str) -> int:
    """Depth of a model name: one of ``DEPTHS``, or ``resnetD`` for any D = 6n+2 (e.g. resnet8 for tests)."""
    m = re.fullmatch(r"resnet(\d+)", name)
    if m and is_cifar_depth(int(m.group(1))):
        return int(m.group(1))
    raise UsageError(
        f"unknown model {name!r}: choose one of {', '.join(DEPTHS)} (resnet152 is the papers' n=25 CIFAR "
        "variant), or resnetD for another depth D = 6n+2"
    )


def check_config(cfg: Config) -> None:
    """Raise UsageError for any setting out of range, before anything is loaded."""
    model_depth(cfg.model)
    choices = {
        "dataset": DATASETS,
        "optimizer": OPTIMIZERS,
        "method": METHODS,
        "lr_schedule": SCHEDULES,
        "amp": AMP,
        "last_batch": ("drop", "keep"),
        "channels_last": ("auto", "on", "off"),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(
                f"unknown {name.replace('_', '-')} {getattr(cfg, name)!r}; choose one of {', '.join(allowed)}"
            )
    positive = (
        "epochs",
        "batch_size",
        "eval_batch_size",
        "clip_norm",
        "fake_train",
        "fake_test",
        "fake_size",
    )
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if not cfg.resolved_lr() > 0 or not math.isfinite(cfg.resolved_lr()):
        raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if cfg.method == "znorm":
        from ..dispatch import BACKENDS

        if cfg.znorm_backend != "auto" and cfg.znorm_backend not in BACKENDS:
            raise UsageError(
                f"unknown --znorm-backend {cfg.znorm_backend!r}; choose auto or one of {', '.join(BACKENDS)}"
            )


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


# ------------------------------------------------------------------------------------------------ set-up
def build_model(cfg: Config, data: DeviceData, device: torch.device, channels_last: bool) -> nn.Module:
    """The model, initialized from the CPU RNG seeded by ("init", seed): the same weights on any device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed("init", cfg.seed))
        model = cifar_resnet(model_depth(cfg.model), data.num_classes, data.in_channels)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def uses_znorm_optimizer(cfg: Config) -> bool:
    return cfg.method == "znorm" and cfg.znorm_optimizer


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """torch's SGD (momentum) or Adam; with ``znorm_optimizer`` (method znorm), the library's ZNormSGD or
    ZNormAdam with the same arguments (ZNorm inside the step; gradient statistics kept)."""
    fused = True if cfg.fused else None
    params = list(model.named_parameters())
    if uses_znorm_optimizer(cfg):
        opts = dict(fused=fused, backend=cfg.znorm_backend, track_stats=True)
        if cfg.optimizer == "sgdm":
            return ZNormSGD(
                params, lr=cfg.resolved_lr(), momentum=cfg.momentum, weight_decay=cfg.weight_decay, **opts
            )
        return ZNormAdam(params, lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay, **opts)
    if cfg.optimizer == "sgdm":
        return torch.optim.SGD(
            params, lr=cfg.resolved_lr(), momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
        )
    return torch.optim.Adam(params, lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay, fused=fused)


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


def install_treatment(cfg: Config, optimizer: torch.optim.Optimizer, timer: HookTimer) -> list:
    """Register the method's pre-hook between the timer's two hooks; returns the handles. (Nothing with a
    ZNorm optimizer: ZNorm runs inside its step and is not timed apart.)"""
    if cfg.method == "baseline" or uses_znorm_optimizer(cfg):
        return []
    handles = [optimizer.register_step_pre_hook(timer.start)]
    if cfg.method == "gc":
        handles.append(register_gc(optimizer))
    elif cfg.method == "clip":
        handles.append(register_clip(optimizer, max_norm=cfg.clip_norm))
    else:
        # The backend is checked by then; the statistics feed the metrics.
        handles.append(register(optimizer, backend=cfg.znorm_backend, track_stats=True))
    handles.append(optimizer.register_step_pre_hook(timer.stop))
    return handles


# ---------------------------------------------------------------------------------------------- checkpoint
def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace (no half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by ``train`` (our own file: it holds Python RNG state, so not weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UsageError(f"cannot read checkpoint {path}: {err}") from err


def config_differences(saved: dict, cfg: Config) -> list[str]:
    now = asdict(cfg)
    return [
        f"{k}: checkpoint {saved.get(k)!r}, requested {now[k]!r}"
        for k in RESULT_FIELDS
        if saved.get(k) != now[k]
    ]


# ------------------------------------------------------------------------------------------------- loop
def last_batch_note(n: int, batch_size: int, drop_last: bool) -> str:
    """What happens to the last, partial batch of an epoch (recorded in config.json)."""
    rest = n % batch_size
    if not rest:
        return f"no partial batch ({n} examples = {n // batch_size} batches of {batch_size})"
    if drop_last:
        return (
            f"dropped: the last {rest} of the {n} examples in each epoch's permutation are not trained on "
            "(different ones each epoch)"
        )
    return f"kept: each epoch ends with a batch of {rest} examples"


@torch.no_grad()
def evaluate(model: nn.Module, split, data: DeviceData, cfg: Config, amp_dtype, channels_last: bool):
    """(mean loss, accuracy) over a whole split, in eval mode (BN running statistics)."""
    model.eval()
    device = split.labels.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(split), cfg.eval_batch_size):
        x = normalize(split.images[i : i + cfg.eval_batch_size], data.mean, data.std, channels_last)
        y = split.labels[i : i + cfg.eval_batch_size]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
    model.train()
    return loss_sum.item() / len(split), correct.item() / len(split)


def train(
    cfg: Config,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    download: bool = False,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """Train one run into ``out_dir``; returns the per-epoch metrics (all of them, resumed ones included).

    ``resume``: continue from ``out_dir/checkpoint.pt`` (its config must match); without it an existing
    checkpoint is an error. ``stop_after``: return after that many epochs of this call (the run stays
    resumable), e.g. to slice a long run into jobs.
    """
    check_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    znorm_backend = None
    if cfg.method == "znorm":
        try:
            znorm_backend = resolve_backend(cfg.znorm_backend, device)
        except (ValueError, RuntimeError) as err:
            raise UsageError(f"--znorm-backend {cfg.znorm_backend}: {err}") from err
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    ckpt = None
    if ckpt_path.exists():
        if not resume:
            raise UsageError(
                f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it, or "
                "choose another --out"
            )
        ckpt = load_checkpoint(ckpt_path)
        diff = config_differences(ckpt["config"], cfg)
        if diff:
            raise UsageError(
                f"the checkpoint in {out} is from another configuration; differences:\n  " + "\n  ".join(diff)
            )
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        log(f"{out}: already complete ({ckpt['epoch']} epochs)")
        return ckpt["metrics"]

    try:
        data = load_data(
            cfg.dataset,
            cfg.data,
            device,
            seed=cfg.seed,
            val_split=cfg.val_split,
            train_subset=cfg.train_subset,
            test_subset=cfg.test_subset,
            download=download,
            fake_sizes=(cfg.fake_train, cfg.fake_test, cfg.fake_size),
        )
    except DataError as err:
        raise UsageError(str(err)) from err
    drop_last = cfg.last_batch == "drop"
    if len(data.train) < cfg.batch_size and drop_last:
        raise UsageError(f"{len(data.train)} training examples are fewer than one batch of {cfg.batch_size}")
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]

    model = build_model(cfg, data, device, channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    timer = HookTimer(device)
    handles = install_treatment(cfg, optimizer, timer)
    stats_source = (
        optimizer
        if uses_znorm_optimizer(cfg)
        else next((h for h in handles if hasattr(h, "grad_stats")), None)
    )
    torch.manual_seed(derived_seed("global", cfg.seed))
    random.seed(derived_seed("python", cfg.seed))
    np.random.seed(derived_seed("numpy", cfg.seed) % 2**32)
    forward = torch.compile(model) if cfg.compile else model

    metrics: list[dict] = []
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(ckpt["rng"])
        start, metrics = ckpt["epoch"], list(ckpt["metrics"])
        log(f"resuming {out} after epoch {start}")

    steps = steps_per_epoch(len(data.train), cfg.batch_size, drop_last)
    meta = {
        "lr": cfg.resolved_lr(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "znorm_backend": znorm_backend,
        "treatment": treatment_name(cfg),
        "data": data.info,
        "steps_per_epoch": steps,
        "last_batch": last_batch_note(len(data.train), cfg.batch_size, drop_last),
        "train_metrics": "running mean over the epoch's steps (model changing), train mode",
        "channels_last": channels_last,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "_resolved": meta}, indent=2) + "\n")
    with open(out / "metrics.jsonl", "w") as f:  # rewritten from the checkpoint: it is the authority
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    if ckpt is None:
        log(
            f"{out}: {cfg.model} {cfg.optimizer} {cfg.method} lr {cfg.resolved_lr():g} on {meta['device']}, "
            f"{cfg.dataset} train {len(data.train)}, val {meta['data']['val']}, test {len(data.test)}; "
            f"{meta['last_batch']}"
        )

    from tqdm.auto import tqdm

    for done_here, epoch in enumerate(range(start, cfg.epochs), 1):
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        t0 = time.perf_counter()
        if device.type == "cuda":
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
        bar = tqdm(
            epoch_batches(
                data.train, cfg.batch_size, cfg.seed, epoch, drop_last=drop_last, do_augment=cfg.augment
            ),
            total=steps,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not progress,
        )
        for step, (xb, yb) in enumerate(bar):
            x = normalize(xb, data.mean, data.std, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = forward(x)
                loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            loss_sum += loss.detach().double() * yb.shape[0]
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += yb.shape[0]
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        if device.type == "cuda":
            ev1.record()
            ev1.synchronize()
            seconds = ev0.elapsed_time(ev1) / 1000
        else:
            seconds = time.perf_counter() - t0
        if scheduler is not None:
            scheduler.step()
        t1 = time.perf_counter()
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen}
        if data.val is not None:
            row["val_loss"], row["val_acc"] = evaluate(forward, data.val, data, cfg, amp_dtype, channels_last)
        row["test_loss"], row["test_acc"] = evaluate(forward, data.test, data, cfg, amp_dtype, channels_last)
        row.update(
            lr=lr, seconds=seconds, treatment_seconds=timer.collect(), eval_seconds=time.perf_counter() - t1
        )
        row.update(grad_stats_row(stats_source))
        metrics.append(row)
        save_atomic(
            {
                "format": 1,
                "config": asdict(cfg),
                "epoch": epoch + 1,
                "metrics": metrics,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states(),
                "data_order": "per-epoch generators seeded from (seed, epoch): no state needed",
            },
            ckpt_path,
        )
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        plot_curves(metrics, out / "curves.png", title=f"{cfg.model} {cfg.optimizer} {cfg.method}")
        val = f"  val {row['val_loss']:.4f}/{row['val_acc']:.4f}" if "val_acc" in row else ""
        log(
            f"epoch {epoch + 1}/{cfg.epochs}  train {row['train_loss']:.4f}/{row['train_acc']:.4f}{val}  "
            f"test {row['test_loss']:.4f}/{row['test_acc']:.4f}  lr {lr:.3g}  {seconds:.1f} s "
            f"(treatment {row['treatment_seconds']:.2f} s, eval {row['eval_seconds']:.1f} s)"
        )
        if stop_after is not None and done_here >= stop_after and epoch + 1 < cfg.epochs:
            log(f"stopping after {done_here} epoch(s) as asked; --resume continues")
            break
    return metrics

"""The configuration of a training run: ``Config`` holds every setting (``config.json`` is its dict),
``check_config`` refuses what cannot run with a ``UsageError``, and ``RESULT_FIELDS`` are the settings a
resumed run must share with its checkpoint."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from .data import (
    DATASETS,
)
from .models import DEPTHS, is_cifar_depth

__all__ = [
    "AMP",
    "CHECKPOINT",
    "DEFAULT_LR",
    "METHODS",
    "OPTIMIZERS",
    "RESULT_FIELDS",
    "SCHEDULES",
    "Config",
    "UsageError",
    "check_config",
    "config_differences",
    "last_batch_note",
    "model_depth",
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
    graph: str = "auto"  # the step captured in a CUDA graph: "auto" (where it can be), "on", "off"
    channels_last: str = "auto"  # "auto": on CUDA only
    eval_batch_size: int = 1024
    threads: int = 0  # CPU threads for torch (0: torch's default); 1 is fastest on a busy shared machine

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


RUNTIME_FIELDS = ("data", "device", "compile", "graph", "channels_last", "eval_batch_size", "threads")


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
        "graph": ("auto", "on", "off"),
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
        from ..registry import BACKENDS

        if cfg.znorm_backend != "auto" and cfg.znorm_backend not in BACKENDS:
            raise UsageError(
                f"unknown --znorm-backend {cfg.znorm_backend!r}; choose auto or one of {', '.join(BACKENDS)}"
            )


def config_differences(saved: dict, cfg: Config) -> list[str]:
    now = asdict(cfg)
    return [
        f"{k}: checkpoint {saved.get(k)!r}, requested {now[k]!r}"
        for k in RESULT_FIELDS
        if saved.get(k) != now[k]
    ]


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

"""The grid runner: models x optimizers x methods x seeds, one readable subfolder per run.

A finished run (its checkpoint holds all the epochs) is skipped, an unfinished one resumed, a new one started,
so rerunning the same command after an interruption completes the grid. Learning rates may differ per
optimizer and method (``parse_lr``: "0.1", "sgdm=0.1,adam=1e-3", "sgdm/znorm=0.01,...").
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .checkpoint import load_checkpoint
from .config import CHECKPOINT, METHODS, OPTIMIZERS, Config, UsageError, check_config
from .train import train

__all__ = ["LrSpec", "parse_lr", "run_grid", "run_name"]


class LrSpec:
    """Learning rates by (optimizer, method): the most specific entry wins ("opt/method", "method", "opt",
    then a plain number), None where nothing applies (the optimizer's default)."""

    def __init__(self, entries: dict[str, float]) -> None:
        self.entries = entries

    def lookup(self, optimizer: str, method: str) -> float | None:
        for key in (f"{optimizer}/{method}", method, optimizer, ""):
            if key in self.entries:
                return self.entries[key]
        return None

    def __repr__(self) -> str:
        return ",".join(f"{k}={v:g}" if k else f"{v:g}" for k, v in self.entries.items())


def parse_lr(text: str | None) -> LrSpec:
    entries: dict[str, float] = {}
    if text:
        for part in text.split(","):
            key, _, value = part.strip().rpartition("=")
            key = key.strip()
            names = key.split("/") if key else []
            if (
                len(names) > 2
                or any(n not in OPTIMIZERS + METHODS for n in names)
                or (len(names) == 2 and (names[0] not in OPTIMIZERS or names[1] not in METHODS))
            ):
                raise UsageError(
                    f"bad --lr entry {part!r}: use a number, or KEY=number with KEY an optimizer "
                    f"({', '.join(OPTIMIZERS)}), a method ({', '.join(METHODS)}) or optimizer/method"
                )
            try:
                entries[key] = float(value)
            except ValueError as err:
                raise UsageError(f"bad --lr entry {part!r}: {value!r} is not a number") from err
    return LrSpec(entries)


def run_name(cfg: Config) -> str:
    """e.g. ``resnet56-sgdm-znorm-seed0``."""
    return f"{cfg.model}-{cfg.optimizer}-{cfg.method}-seed{cfg.seed}"


def run_state(path: Path, epochs: int) -> str:
    """ "done", "partial" or "new"."""
    if not (path / CHECKPOINT).exists():
        return "new"
    return "done" if load_checkpoint(path / CHECKPOINT)["epoch"] >= epochs else "partial"


def run_grid(
    base: Config,
    out: str | os.PathLike,
    *,
    models: list[str],
    optimizers: list[str],
    methods: list[str],
    seeds: list[int],
    lr: LrSpec,
    download: bool = False,
    progress: bool = True,
    log=print,
) -> list[Path]:
    """Run (or skip, or resume) every combination into ``out/<run_name>``; returns the run folders."""
    configs = [
        replace(base, model=m, optimizer=o, method=me, seed=s, lr=lr.lookup(o, me))
        for m in models
        for o in optimizers
        for me in methods
        for s in seeds
    ]
    for cfg in configs:  # every bad setting is reported before anything runs
        check_config(cfg)
    paths = []
    for i, cfg in enumerate(configs, 1):
        path = Path(out) / run_name(cfg)
        paths.append(path)
        state = run_state(path, cfg.epochs)
        if state == "done":
            log(f"[{i}/{len(configs)}] {path.name}: finished, skipped")
            continue
        log(f"[{i}/{len(configs)}] {path.name}: {'resuming' if state == 'partial' else 'starting'}")
        train(cfg, path, resume=state == "partial", download=download, progress=progress, log=log)
    return paths

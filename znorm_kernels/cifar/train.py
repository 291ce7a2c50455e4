"""One training run: the loop (``train``) and the evaluation; the configuration is ``config.py``, the
set-up ``build.py``, the checkpoint's pieces ``checkpoint.py``.

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
more pre-hooks around it (CUDA events on the GPU, summed once per epoch: no per-step synchronization),
except where the step is captured in a CUDA graph (``--graph``, ``steps.py``): replays run no Python, and
the treatment is not timed apart (``treatment_seconds`` is null).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..registry import resolve_backend
from .build import (
    HookTimer,
    build_model,
    build_optimizer,
    build_scheduler,
    grad_stats_row,
    install_treatment,
    match_capturable,
    resolve_device,
    treatment_name,
    uses_znorm_optimizer,
)
from .checkpoint import load_checkpoint, rng_states, save_atomic, set_rng_states
from .config import CHECKPOINT, Config, UsageError, check_config, config_differences, last_batch_note
from .data import (
    DataError,
    DeviceData,
    derived_seed,
    epoch_batches,
    load_data,
    normalize,
    steps_per_epoch,
)
from .report import plot_curves
from .steps import EagerStep, GraphedStep, graph_blocker

__all__ = ["evaluate", "train"]


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

    blocker = graph_blocker(cfg.amp, cfg.compile, device)
    if cfg.graph == "on" and blocker is not None:
        raise UsageError(f"--graph on: {blocker}")
    graphed = cfg.graph != "off" and blocker is None

    model = build_model(cfg, data, device, channels_last)
    optimizer = build_optimizer(cfg, model, capturable=graphed)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    timer = None if graphed else HookTimer(device)
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
    if graphed:
        step_fn: EagerStep = GraphedStep(forward, optimizer, device, amp_dtype)
    else:
        step_fn = EagerStep(forward, optimizer, device, amp_dtype, scaler)

    metrics: list[dict] = []
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        match_capturable(optimizer, graphed)
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
        "graphed": graphed if graphed or cfg.graph == "off" else f"no: {blocker}",
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
        step_fn.take()  # (zero: an epoch's sums start here)
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
            loss = step_fn(normalize(xb, data.mean, data.std, channels_last), yb)
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
        loss_sum, correct = step_fn.take()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen}
        if data.val is not None:
            row["val_loss"], row["val_acc"] = evaluate(forward, data.val, data, cfg, amp_dtype, channels_last)
        row["test_loss"], row["test_acc"] = evaluate(forward, data.test, data, cfg, amp_dtype, channels_last)
        row.update(
            lr=lr,
            seconds=seconds,
            treatment_seconds=timer.collect() if timer is not None else None,
            eval_seconds=time.perf_counter() - t1,
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
        treated = row["treatment_seconds"]
        treated = "graphed" if treated is None else f"{treated:.2f} s"
        log(
            f"epoch {epoch + 1}/{cfg.epochs}  train {row['train_loss']:.4f}/{row['train_acc']:.4f}{val}  "
            f"test {row['test_loss']:.4f}/{row['test_acc']:.4f}  lr {lr:.3g}  {seconds:.1f} s "
            f"(treatment {treated}, eval {row['eval_seconds']:.1f} s)"
        )
        if stop_after is not None and done_here >= stop_after and epoch + 1 < cfg.epochs:
            log(f"stopping after {done_here} epoch(s) as asked; --resume continues")
            break
    return metrics

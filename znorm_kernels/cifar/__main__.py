"""``python -m znorm_kernels.cifar``: train one run, a grid of runs (``--grid``), or summarize (``--report``).

    python -m znorm_kernels.cifar --model resnet56 --optimizer sgdm --method znorm --out runs/r56-znorm
    python -m znorm_kernels.cifar --grid --models resnet56,resnet110 --optimizers sgdm,adam \\
        --methods baseline,gc,clip,znorm --seeds 0,1 --out runs/
    python -m znorm_kernels.cifar.report runs/        (or: python -m znorm_kernels.cifar --report runs/)

Defaults follow the ZNorm papers: CIFAR-10, 100 epochs, batch 256, no augmentation, momentum 0.9, clipping
threshold 0.1. Each run folder gets config.json, metrics.jsonl, checkpoint.pt (every epoch) and curves.png.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .config import AMP, METHODS, OPTIMIZERS, SCHEDULES, Config, UsageError
from .data import DATASETS, DEFAULT_DATA_DIRS
from .grid import parse_lr, run_grid, run_name
from .train import train


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in _list(text)]
    except ValueError as err:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from err


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m znorm_kernels.cifar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = p.add_argument_group("what to train")
    run.add_argument(
        "--model",
        default=d.model,
        help="resnet20/32/44/56/110/152 (152: the papers' n=25 CIFAR "
        "variant) or resnetD for D=6n+2 (default %(default)s)",
    )
    run.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    run.add_argument("--method", default=d.method, choices=METHODS, help="gradient treatment")
    run.add_argument(
        "--lr",
        help="learning rate (default 0.1 for sgdm, 1e-3 for adam); for --grid also "
        "'sgdm=0.1,adam=1e-3' or 'sgdm/znorm=0.01,...' (most specific entry wins)",
    )
    run.add_argument("--momentum", type=float, default=d.momentum)
    run.add_argument("--weight-decay", type=float, default=d.weight_decay)
    run.add_argument("--epochs", type=int, default=d.epochs)
    run.add_argument("--batch-size", type=int, default=d.batch_size)
    run.add_argument(
        "--last-batch",
        choices=("drop", "keep"),
        default=d.last_batch,
        help="the last partial batch of each epoch (default: drop; recorded in config.json)",
    )
    run.add_argument(
        "--augment",
        action="store_true",
        help="random crop (4-pixel padding) and horizontal "
        "flip, on the device (off by default, as in the papers)",
    )
    run.add_argument(
        "--lr-schedule",
        choices=SCHEDULES,
        default=d.lr_schedule,
        help="per epoch: none, cosine to 0, or step (x0.1 at 50%% and 75%%)",
    )
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--amp", choices=AMP, default=d.amp, help="autocast precision (weights stay float32)")
    run.add_argument(
        "--clip-norm", type=float, default=d.clip_norm, help="clipping threshold for --method clip"
    )
    run.add_argument("--znorm-backend", default=d.znorm_backend, help="ZNorm backend (default auto: fastest)")
    run.add_argument(
        "--znorm-optimizer",
        action="store_true",
        help="with --method znorm: the fused ZNormSGD/ZNormAdam instead of the hook on torch's optimizer",
    )
    run.add_argument("--fused", action="store_true", help="fused=True for torch's SGD/Adam")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    data.add_argument(
        "--data",
        help="data folder (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_DATA_DIRS.items() if v)
        + ")",
    )
    data.add_argument("--download", action="store_true", help="fetch CIFAR through torchvision if missing")
    data.add_argument(
        "--val-split",
        type=_number,
        default=0,
        help="hold out N examples (or a fraction) of the "
        "TRAIN set, fixed by the seed, as validation for choosing hyperparameters",
    )
    data.add_argument("--train-subset", type=int, default=0, help="train on a seeded subset of N examples")
    data.add_argument(
        "--test-subset",
        type=int,
        default=0,
        help="evaluate on a seeded subset of N test examples (quick CPU runs only)",
    )
    data.add_argument("--fake-train", type=int, default=d.fake_train, help="--dataset fake: train examples")
    data.add_argument("--fake-test", type=int, default=d.fake_test, help="--dataset fake: test examples")
    data.add_argument("--fake-size", type=int, default=d.fake_size, help="--dataset fake: image side")
    ex = p.add_argument_group("execution")
    ex.add_argument("--device", default=d.device, help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    ex.add_argument("--compile", action="store_true", help="torch.compile the model (takes minutes)")
    ex.add_argument(
        "--graph",
        choices=("auto", "on", "off"),
        default=d.graph,
        help="capture the training step in a CUDA graph and replay it (auto: on CUDA, without --amp fp16 "
        "or --compile; off: the eager step, the reference)",
    )
    ex.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default=d.channels_last,
        help="memory format (auto: on for CUDA)",
    )
    ex.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    ex.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="CPU threads for torch (default: torch's "
        "choice; 1 is much faster on a CPU shared with other jobs)",
    )
    ex.add_argument(
        "--out",
        help="run folder (default runs/<model>-<optimizer>-<method>-seed<seed>); with "
        "--grid the folder of run folders (default runs/)",
    )
    ex.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    ex.add_argument("--stop-after", type=int, help="stop after N epochs of this call (resumable)")
    ex.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    grid = p.add_argument_group("grid (--grid): every combination, skipping finished runs, resuming others")
    grid.add_argument("--grid", action="store_true")
    grid.add_argument("--models", help="comma-separated, e.g. resnet56,resnet110")
    grid.add_argument("--optimizers", help="comma-separated, e.g. sgdm,adam")
    grid.add_argument("--methods", help="comma-separated, e.g. baseline,gc,clip,znorm")
    grid.add_argument("--seeds", help="comma-separated, e.g. 0,1")
    p.add_argument(
        "--report",
        nargs="+",
        metavar="RUN_DIR",
        help="only summarize these runs (see python -m znorm_kernels.cifar.report)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    values = {
        f.name: getattr(args, f.name) for f in fields(Config) if f.name != "lr" and hasattr(args, f.name)
    }
    return Config(**values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        from .report import main as report_main

        return report_main(args.report + (["--out", args.out] if args.out else []))
    progress = not args.no_progress
    try:
        lr = parse_lr(args.lr)
        cfg = config_from_args(args)
        if args.grid:
            run_grid(
                cfg,
                args.out or "runs",
                models=_list(args.models or cfg.model),
                optimizers=_list(args.optimizers or cfg.optimizer),
                methods=_list(args.methods or cfg.method),
                seeds=_seeds(args.seeds or str(cfg.seed)),
                lr=lr,
                download=args.download,
                progress=progress,
            )
        else:
            cfg.lr = lr.lookup(cfg.optimizer, cfg.method)
            out = args.out or f"runs/{run_name(cfg)}"
            train(
                cfg,
                out,
                resume=args.resume,
                stop_after=args.stop_after,
                download=args.download,
                progress=progress,
            )
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the last finished epoch is saved; rerun with --resume (or the same --grid "
            "command) to continue",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench` (`make bench`): ZNorm throughput against the PyTorch alternatives, on the best device.

First every backend of ours that can serve the device is checked against the float64 formula on every list
to be timed (rule 10; the run stops with exit code 1 if one is off). Then, per parameter list and dtype,
every alternative (bench/alternatives.py) and every backend of ours is timed on the same gradients, the
copy bandwidth of the same bytes is measured, and one ResNet-56 training step is timed with and without
ZNorm. On CUDA each method's device time is taken twice: by triton.testing.do_bench, and with the GPU kept
busy ahead of each call (bench.timing.device_time_gpu_bound, --busy-seconds), which the device-time targets
are judged on. With a time budget (--budget-s) the compiled alternatives run last, so the budget drops them
first.

Output: the markdown tables on stdout, and results.md, results.json and chart.png in --out (default
bench/results/<date>-<device>/), rewritten after each case so an interrupted run keeps what it measured.

Defaults: on the CPU, ResNet-56 and the LLM-shaped list scaled to d=512, float32 and bfloat16, torch.compile
for ResNet-56 only (a couple of minutes on a 2-core machine); on CUDA, ResNet-56 and the full LLM list.
--full: every list (ResNet-56/110/152, ResNet-50, ViT-B/16, LLM, one 100 M-element tensor), on the CPU all
compiled (expect 10-20 minutes there: each compilation takes most of a minute).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import znorm_kernels
from bench import adversarial
from bench.alternatives import our_backends
from bench.param_lists import LIST_NAMES, get_list
from bench.report import derive, markdown, plot, targets_markdown, train_markdown, write_json
from bench.suite import CaseOptions, run_case
from znorm_kernels.accuracy import AccuracyError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--full", action="store_true", help="every list; on the CPU every list compiled too")
    p.add_argument(
        "--lists",
        help="comma-separated list names: resnet56, resnet110, resnet152, resnet50, llm, llm-d512, "
        "plain100m, ... (default: resnet56 and the LLM list, d=512 on the CPU)",
    )
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    p.add_argument(
        "--compile-lists",
        default="auto",
        help="lists that also get torch.compile alternatives: comma-separated names, 'all', 'none' or 'auto' "
        "(CPU: resnet56 by default, all with --full; CUDA: resnet56 and llm)",
    )
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph alternatives")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (default CPU 20, CUDA 100)")
    p.add_argument("--max-seconds", type=float, default=1.0, help="time cap per CPU measurement (default 1)")
    p.add_argument(
        "--busy-seconds",
        type=float,
        default=0.25,
        help="CUDA: about this many seconds of GPU time per method for the second device time, with the GPU "
        "kept busy ahead of each call (default 0.25; 0 skips it)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        help="time compiled alternatives after all else, and skip those not started within this many seconds",
    )
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check (not for recorded runs)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step view")
    p.add_argument("--train-batch", type=int, help="training-step batch (default CUDA 256, CPU 32)")
    p.add_argument("--train-steps", type=int, help="timed steps per variant (default CUDA 30, CPU 9)")
    p.add_argument(
        "--threads",
        default="auto",
        help="CPU threads for torch (an int, or 'auto': all cores, but 1 when the machine is already busy, "
        "load average >= 1, where OpenMP regions waiting on a descheduled thread make timings meaningless)",
    )
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<device>)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def plan(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str]]:
    """(lists to time, lists that also get compiled alternatives)."""
    cuda = device.type == "cuda"
    llm = "llm" if cuda else "llm-d512"
    if args.lists:
        lists = _split(args.lists)
    elif args.full:
        lists = [llm if name == "llm" else name for name in LIST_NAMES]
    else:
        lists = ["resnet56", llm]
    if args.compile_lists == "all":
        compiled = list(lists)
    elif args.compile_lists == "none":
        compiled = []
    elif args.compile_lists == "auto":
        if cuda:
            compiled = [n for n in lists if n == "resnet56" or n.startswith("llm")]
        else:
            compiled = list(lists) if args.full else [n for n in lists if n == "resnet56"]
    else:
        compiled = [n for n in _split(args.compile_lists) if n in lists]
    return lists, compiled


def environment(device: torch.device) -> dict:
    """Machine, versions, date and command, for the report header."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": ("python -m bench " + shlex.join(sys.argv[1:])).strip(),
        "device": device.type,
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "available_backends": znorm_kernels.available_backends(),
    }
    try:
        git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            [
                *git,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "znorm_kernels",
                "csrc",
                "setup.py",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        env["commit"] = head.stdout.strip() + (
            " + uncommitted library changes" if dirty.stdout.strip() else ""
        )
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    return env


def header(env: dict) -> str:
    machine = env.get("gpu") or env["cpu"]
    lines = [
        f"Machine: {machine}"
        + (f" (driver {env.get('driver')}, CUDA {env.get('cuda')})" if "gpu" in env else ""),
        f"Python {env['python']}, torch {env['torch']} ({env['torch_threads']} CPU threads; load average "
        f"{env['load_average_at_start']} at start), triton {env['triton']}; device {env['device']}; "
        f"available backends: {', '.join(env['available_backends'])}",
        f"Date: {env['date']}. Command: `{env['command']}`. Commit: {env['commit'] or 'unknown'}",
    ]
    return "\n".join(f"{line}  " for line in lines) + "\n"


class Progress:
    """A tqdm bar over the cases, its postfix the current step (plain lines without tqdm)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but no CUDA device is present", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if args.threads == "auto":
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= 1.0
        if busy and not cuda:
            torch.set_num_threads(1)
    else:
        torch.set_num_threads(int(args.threads))
    lists, compiled = plan(args, device)
    dtypes = [DTYPES[d] for d in _split(args.dtypes)]
    reps = args.repeats or (100 if cuda else 20)
    out = args.out or Path("bench/results") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{device.type}"
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    deadline = start + args.budget_s if args.budget_s is not None else None
    # With a time budget the compiled alternatives (minutes of compilation) run last, so the budget drops
    # them first; otherwise they are timed side by side with the rest (round-robin on the CPU).
    late = deadline is not None

    whynot = our_backends(device)
    backends = [b for b, why in whynot.items() if not why]
    alternatives = ["eager"] + ([] if not cuda or args.no_graphs else ["eager+graph"])
    compiled_alts = ["compiled"] + ([] if not cuda or args.no_graphs else ["compiled+graph"])
    plists = {}
    for n in lists:
        try:
            plists[n] = get_list(n)
        except ImportError as err:  # e.g. torchvision missing for resnet50: measure the others
            print(f"warning: list {n} skipped: {err}", file=sys.stderr)
    lists = [n for n in lists if n in plists]
    compiled = [n for n in compiled if n in plists]
    cases = [(plists[n], d) for n in lists for d in dtypes]
    print(
        f"ZNorm benchmark on {device.type}: lists {', '.join(lists)}; dtypes {args.dtypes}; "
        f"ours: {', '.join(backends)}; compiled on: {', '.join(compiled) or 'none'}",
        file=sys.stderr,
    )
    for b, why in whynot.items():
        if why:
            print(f"  backend {b}: {why}", file=sys.stderr)

    total = len(cases) * (1 if args.no_check else 2) + (len(compiled) * len(dtypes) if late else 0)
    progress = Progress(total, not args.no_progress)
    opts = CaseOptions(
        reps=reps,
        max_s=args.max_seconds,
        check=not args.no_check,
        progress=progress.step,
        deadline=deadline,
        count_launches=not cuda,
        busy_max_s=args.busy_seconds,
    )
    rows: list[dict] = []
    copies: dict[str, dict] = {}
    payload = {
        "environment": env,
        "lists": lists,
        "compiled_lists": compiled,
        "backends": whynot,
        "cases": copies,
        "rows": rows,
        "train_step": None,
        "adversarial": None,
        "status": "running",
        "timeline": [],
    }

    def save(label: str, final: bool = False) -> None:
        payload["timeline"].append([label, round(time.monotonic() - start, 1)])
        derive(rows, copies)
        text = "# ZNorm benchmark\n\n" + header(env) + "\n" + markdown(rows, copies, device.type)
        if payload["adversarial"]:
            text += "\n## Accuracy on adversarial inputs (rules 3, 10)\n\n" + adversarial.markdown(
                payload["adversarial"]
            )
        if payload["train_step"]:
            text += "\n" + train_markdown(payload["train_step"])
        targets = targets_markdown(rows, payload["train_step"], device.type)
        if targets:
            text += "\n" + targets
        if payload["status"] != "ok":
            text += f"\nStatus: {payload['status']}\n"
        payload["elapsed_s"] = round(time.monotonic() - start, 1)
        (out / "results.md").write_text(text)
        write_json(out / "results.json", payload)
        try:
            plot(rows, copies, out / "chart.png", f"ZNorm, {env.get('gpu') or env['cpu']}, {env['date']}")
        except Exception as err:  # the chart is a convenience; the tables are the record
            print(f"warning: chart failed: {err}", file=sys.stderr)
        if final:
            print(text)

    def on_term(signum, frame) -> None:
        raise KeyboardInterrupt  # e.g. `timeout`: save what was measured on the way out

    signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        if opts.check:
            progress.step("adversarial inputs")
            payload["adversarial"] = adversarial.table(adversarial.methods_for(backends), device)
            bad = adversarial.breaches(payload["adversarial"])
            if bad:
                raise AccuracyError(
                    f"backend {bad[0]['method']} breaks rule 10 on {bad[0]['case']}: {bad[0]}"
                )
            for plist, dtype in cases:
                run_case(plist, dtype, device, [], backends, opts, check_only=True)
                progress.advance()
            payload["timeline"].append(["accuracy check", round(time.monotonic() - start, 1)])
        # The training step first: a budget-limited run (gpu_check.sh) that is stopped in the later lists
        # still has this headline figure.
        if not args.no_train:
            progress.step("training step")
            from bench.train_step import time_training_step

            try:
                payload["train_step"] = time_training_step(
                    device, args.train_batch or (256 if cuda else 32), args.train_steps or (30 if cuda else 9)
                )
            except Exception as err:  # report it, keep the kernel figures
                payload["train_step_error"] = f"{type(err).__name__}: {err}"
                print(f"warning: training step failed: {err}", file=sys.stderr)
            save("training step")
        for plist, dtype in cases:
            copy = copies[f"{plist.name}/{str(dtype)[6:]}"] = {}
            alts = alternatives + (compiled_alts if plist.name in compiled and not late else [])
            rows += run_case(plist, dtype, device, alts, backends, opts, copy_into=copy)
            save(f"{plist.name}/{str(dtype)[6:]}")
            progress.advance()
        for plist, dtype in cases:
            if plist.name not in compiled or not late:
                continue
            new = run_case(plist, dtype, device, compiled_alts, [], opts)
            # Keep each case's rows together: insert before the case's first row of ours.
            key = (new[0]["list"], new[0]["dtype"])
            mine = [i for i, r in enumerate(rows) if (r["list"], r["dtype"]) == key and r["ours"]]
            at = mine[0] if mine else len(rows)
            rows[at:at] = new
            save(f"{plist.name}/{str(dtype)[6:]} compiled")
            progress.advance()
        if not opts.count_launches:  # last: the profiler slows every later CUDA launch (CaseOptions)
            for plist, dtype in cases:
                if deadline is not None and time.monotonic() > deadline:
                    break
                mine = [r for r in rows if (r["list"], r["dtype"]) == (plist.name, str(dtype)[6:])]
                alts = [r["method"] for r in mine if not r["ours"] and not r["error"]]
                new = run_case(plist, dtype, device, alts, backends, opts, count_only=True)
                counted = {r["method"]: r for r in new}
                for r in mine:
                    if r["method"] in counted:
                        r["launches"] = counted[r["method"]]["launches"]
                        r["launches_what"] = counted[r["method"]]["launches_what"]
            save("launch counts")
        payload["status"] = "ok"
    except AccuracyError as err:
        payload["status"] = f"FAILED accuracy check: {err}"
        status = 1
    except KeyboardInterrupt:
        payload["status"] = "interrupted"
        status = 130
    finally:
        progress.close()
        save("end", final=True)
        print(f"results in {out}/ (results.md, results.json, chart.png)", file=sys.stderr)
    if status == 1:
        print(f"error: {payload['status']}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The papers' comparison (SGDM and Adam x baseline, GC, clipping, ZNorm) on a short-lived lent GPU machine, in
# one call with a hard wall-clock budget, leaving at most 3 files in OUT for the trip back.
#
#   bash bench/training/run_gpu.sh OUT      # from anywhere (it runs from the repo root); OUT is created
#
# What it does: Fashion-MNIST (the idx .gz files in DATA), ResNet-56, batch 256 (the papers'), seed 0, bf16
# autocast. Phase 1 chooses a learning rate per optimizer x method on a held-out split of the TRAIN set
# (--val-split 5000; the test set is never used to choose): 1 epoch on the other 55,000 training images for
# each candidate rate, the candidates being run_cpu.sh's (two per optimizer x method, and a third for SGDM
# with clipping and with ZNorm, where the CPU sweep's best sat at the edge of its range) and 1e-5 for SGDM
# with ZNorm (every GPU run so far used 1e-4, then the smallest candidate), 19 runs. The rate
# with the highest validation accuracy wins (bench/training/sweep_summary.py); where no candidate finished an
# epoch in time, the CPU sweep's rate (bench/training/RESULTS.md) is used and the report says so. Phase 2
# trains the 8 final runs (all 60,000 training images, the whole test set, EPOCHS epochs) with those rates.
# Phase 3 writes the report and packs the run folders.
#
# How it was chosen: one eager ResNet-56 process leaves an H100 mostly idle (a step is hundreds of small
# kernel launches, so the CPU side is the bottleneck), so every run is its own process and a phase's runs all
# start at once (19 sweep runs, then 8 final runs), each with one CPU thread (16 cores), to overlap their
# launch overhead; the GPU time-slices between the processes (no MPS). The machine is lent for minutes, so
# each phase has a deadline (the sweep: SWEEP_FRACTION of BUDGET_S; the finals: what is left minus
# REPORT_RESERVE_S) at which the runs still going are stopped (SIGTERM, SIGKILL 3 s later) and keep the epochs
# they finished: the training script writes metrics.jsonl and an atomic checkpoint after every epoch (the
# checkpoint, its authority, is read back here to repair a metrics.jsonl that the kill cut short). Same seed,
# same initial weights and data: the training script draws the initial weights from the CPU RNG forked and
# seeded by ("init", seed) (build.build_model), and the validation split and each epoch's batch order from CPU
# generators seeded by (seed) and (seed, epoch) (data.py), never from the global RNG, so every optimizer x
# method starts from the same weights and sees the same batches (bit for bit only up to cuDNN's
# non-deterministic kernels).
#
# OUT gets: training.tgz (every run folder: config.json, metrics.jsonl, curves.png, no checkpoints; each
# process's log; the commands; the report's table and figure), training_report.md (sweep table, chosen rates,
# final table, epochs finished and exit code of every run, timings, versions, the exact commands) and
# test_accuracy.png. Nothing outlives the script: every run is under `timeout` in its own process group, and
# the groups left are killed on exit or on a signal (which still writes the report).
#
# Sizes: on the first H100 run (2026-11-27, with a 4-worker test suite sharing the machine) the 18 sweep runs
# on 20000 images took 43 s together, and the 8 finals 26-32 s per epoch each, running at once (about twice
# the throughput of one process at a time): 2-3 of 5 epochs fitted in 215 s. The defaults follow from that.
#
# Environment (defaults for the GPU):
#   PYTHON (python3)  BUDGET_S (230)  SWEEP_FRACTION (0.4)  REPORT_RESERVE_S (20)  DATA (.fmnist)
#   MODEL (resnet56)  AMP (bf16)  DEVICE (cuda)  EPOCHS (5)  SWEEP_EPOCHS (1)  BATCH_SIZE (256)  SEED (0)
#   VAL_SPLIT (5000)  SWEEP_SUBSET (20000)  SWEEP_TEST_SUBSET (1000: the training script evaluates the
#   test set every epoch; the sweep never looks at it)  FINAL_SUBSET (all 60000)  TEST_SUBSET (all 10000)
#   THREADS (1 per run)  MAX_PAR (0: all runs of a phase at once)  EXTRA_ARGS (more options for every run)
#   KEEP_WORK (0; 1 keeps the scratch folder, checkpoints included, and prints where)
# Rehearsal on a CPU (tiny; about 2 minutes on 2 cores):
#   DEVICE=cpu MODEL=resnet20 AMP=off BUDGET_S=150 EPOCHS=1 SWEEP_SUBSET=500 VAL_SPLIT=500 \
#     SWEEP_TEST_SUBSET=200 FINAL_SUBSET=1000 TEST_SUBSET=500 MAX_PAR=2 PYTHON=.venv/bin/python \
#     bash bench/training/run_gpu.sh /tmp/trout
# Exit code: 0 when the report was written (read it for runs cut short), 2 on bad usage or no usable device,
# 130 on a signal.

set -u

OUT="${1:-}"
if [[ -z "$OUT" || "$OUT" == -* ]]; then
    echo "usage: bash bench/training/run_gpu.sh OUT" >&2
    exit 2
fi
START=$(date +%s)
cd "$(dirname "$0")/../.."
REPO="$(pwd)"
# The package from this checkout, installed or not (sweep_summary.py is run as a script, so its folder, not
# the repo, would be first on sys.path: on the first GPU run it could not import znorm_kernels).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2

PY="${PYTHON:-python3}"
BUDGET="${BUDGET_S:-230}"
SWEEP_FRACTION="${SWEEP_FRACTION:-0.4}"
RESERVE="${REPORT_RESERVE_S:-20}"
DATA="${DATA:-.fmnist}"
MODEL="${MODEL:-resnet56}"
AMP="${AMP:-bf16}"
DEVICE="${DEVICE:-cuda}"
EPOCHS="${EPOCHS:-5}"
SWEEP_EPOCHS="${SWEEP_EPOCHS:-1}"
BATCH="${BATCH_SIZE:-256}"
SEED="${SEED:-0}"
VAL_SPLIT="${VAL_SPLIT:-5000}"
SWEEP_SUBSET="${SWEEP_SUBSET:-20000}"
SWEEP_TEST_SUBSET="${SWEEP_TEST_SUBSET:-1000}"
FINAL_SUBSET="${FINAL_SUBSET:-}"
TEST_SUBSET="${TEST_SUBSET:-}"
THREADS="${THREADS:-1}"
MAX_PAR="${MAX_PAR:-0}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
KEEP_WORK="${KEEP_WORK:-0}"
[[ "$DATA" == /* ]] || DATA="$REPO/$DATA"
read -r -a PYCMD <<<"$PY"
KNOBS="PYTHON|BUDGET_S|SWEEP_FRACTION|REPORT_RESERVE_S|DATA|MODEL|AMP|DEVICE|EPOCHS|SWEEP_EPOCHS|BATCH_SIZE|SEED"
KNOBS+="|VAL_SPLIT|SWEEP_SUBSET|SWEEP_TEST_SUBSET|FINAL_SUBSET|TEST_SUBSET|THREADS|MAX_PAR|EXTRA_ARGS|KEEP_WORK"
read -r -a EXTRA <<<"$EXTRA_ARGS"

# Candidate rates (run_cpu.sh's sweep a, b and c; 1e-5 for SGDM + ZNorm, below the GPU runs' 1e-4) and
# the CPU sweep's choices (RESULTS.md), the fallback.
CANDIDATES=(
    "sgdm baseline 0.1 0.02" "sgdm gc 0.1 0.02" "sgdm clip 2.5 0.5 0.1" "sgdm znorm 0.01 1e-3 1e-4 1e-5"
    "adam baseline 3e-3 1e-3" "adam gc 3e-3 1e-3" "adam clip 3e-3 1e-3" "adam znorm 3e-3 1e-3"
)
declare -A CPU_LR=(
    [sgdm/baseline]=0.02 [sgdm/gc]=0.02 [sgdm/clip]=0.5 [sgdm/znorm]=1e-4
    [adam/baseline]=1e-3 [adam/gc]=1e-3 [adam/clip]=1e-3 [adam/znorm]=1e-3
)
PAIRS=(sgdm/baseline sgdm/gc sgdm/clip sgdm/znorm adam/baseline adam/gc adam/clip adam/znorm)

NPROC="$(nproc)"  # before OMP_NUM_THREADS is set: nproc obeys it
WORK="$(mktemp -d "${TMPDIR:-/tmp}/znorm-train.XXXXXX")"
mkdir -p "$WORK/sweep" "$WORK/final" "$WORK/logs" "$WORK/report"
REPORT="$OUT/training_report.md"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
unset TRITON_INTERPRET

now() { date +%s; }
elapsed() { echo $(($(now) - START)); }
log() { echo "[$(elapsed)s] $*"; }

# ------------------------------------------------------------------------------------------ process control
declare -A RUNNING=()   # pid (= the process group of its `timeout`) -> job index
JOB_NAME=() JOB_ARGS=() JOB_DIR=() JOB_LR=() JOB_SRC=()
STATUS_FILE=""

kill_all() {
    local pid i
    ((${#RUNNING[@]})) || return 0
    for pid in "${!RUNNING[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null
        i=${RUNNING[$pid]}
        [[ -n "$STATUS_FILE" ]] && printf '%s\tsignal\t-\t-\t%s\t%s\n' "${JOB_NAME[i]}" "${JOB_LR[i]}" \
            "${JOB_SRC[i]}" >>"$STATUS_FILE"
    done
    sleep 2
    for pid in "${!RUNNING[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
    RUNNING=()
}

# run_jobs PHASE DEADLINE: runs JOB_* (at most MAX_PAR at a time), each under `timeout` until DEADLINE (epoch
# seconds); appends "name rc wall_s limit_s lr source" lines to $STATUS_FILE ("-" rc: not started in time).
run_jobs() {
    local phase="$1" deadline="$2" n=${#JOB_NAME[@]} next=0 i pid rc left
    local -A t0=() limit=()
    local -a argv
    while ((next < n || ${#RUNNING[@]})); do
        while ((next < n)) && { ((MAX_PAR <= 0)) || ((${#RUNNING[@]} < MAX_PAR)); }; do
            i=$next
            next=$((next + 1))
            left=$((deadline - $(now)))
            if ((left < 5)); then
                printf '%s\t-\t0\t0\t%s\t%s\n' "${JOB_NAME[i]}" "${JOB_LR[i]}" "${JOB_SRC[i]}" >>"$STATUS_FILE"
                log "$phase ${JOB_NAME[i]}: not started (phase deadline reached)"
                continue
            fi
            read -r -a argv <<<"${JOB_ARGS[i]}"
            printf '%s -m znorm_kernels.cifar %s\n' "$PY" "${JOB_ARGS[i]}" >>"$WORK/commands.txt"
            timeout --signal=TERM --kill-after=3 "$left" "${PYCMD[@]}" -m znorm_kernels.cifar "${argv[@]}" \
                >"$WORK/logs/$phase-${JOB_NAME[i]}.log" 2>&1 </dev/null &
            pid=$!
            RUNNING[$pid]=$i
            t0[$pid]=$(now)
            limit[$pid]=$left
        done
        sleep 1
        for pid in "${!RUNNING[@]}"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid"
                rc=$?
                i=${RUNNING[$pid]}
                unset "RUNNING[$pid]"
                printf '%s\t%s\t%s\t%s\t%s\t%s\n' "${JOB_NAME[i]}" "$rc" $(($(now) - t0[$pid])) "${limit[$pid]}" \
                    "${JOB_LR[i]}" "${JOB_SRC[i]}" >>"$STATUS_FILE"
                log "$phase ${JOB_NAME[i]}: rc $rc after $(($(now) - t0[$pid])) s"
            elif (($(now) > deadline + 10)); then  # `timeout` should have done this already
                kill -KILL -- "-$pid" 2>/dev/null
            fi
        done
    done
}

# --------------------------------------------------------------------------------------- report helpers
# status_table PHASE DIR STATUS_FILE EPOCHS: a markdown table of the phase's runs (epochs finished, exit code,
# timings, backend, last accuracy). Repairs metrics.jsonl from checkpoint.pt (the authority) where a kill cut
# the last line short or off. For the final phase, also test accuracy at the last epoch every run reached.
status_table() {
    "${PYCMD[@]}" - "$@" <<'EOF'
import json
import os
import sys
from pathlib import Path

phase, root, status_file, epochs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
entries = [line.split("\t") for line in Path(status_file).read_text().splitlines() if line.strip()]
RC = {
    "0": "finished",
    "124": "stopped at the deadline",
    "137": "killed at the deadline",
    "-": "not started",
    "signal": "stopped: the script got a signal",
}
ORDER = ["sgdm", "adam", "baseline", "gc", "clip", "znorm"]


def order(entry):  # optimizer, method, learning rate (names: opt-method-lrX or model-opt-method-seedS)
    tokens = entry[0].split("-")
    opt = next((ORDER.index(t) for t in tokens if t in ORDER[:2]), 9)
    method = next((ORDER.index(t) for t in tokens if t in ORDER[2:]), 9)
    return opt, method, float(entry[4])


entries.sort(key=order)
out, runs, failures = [], {}, []
for name, rc, wall, _limit, lr, source in entries:
    d = root / name
    metrics, bad = [], 0
    mf = d / "metrics.jsonl"
    if mf.exists():
        for line in mf.read_text().splitlines():
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    note = ""
    ck = d / "checkpoint.pt"
    if ck.exists():
        try:
            import torch

            saved = torch.load(ck, map_location="cpu", weights_only=False)["metrics"]
            if len(saved) > len(metrics) or bad:
                metrics = saved
                tmp = mf.with_name("metrics.jsonl.tmp")
                tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
                os.replace(tmp, mf)
                note = "metrics.jsonl repaired from checkpoint"
        except Exception as err:  # a checkpoint cut short cannot be: it is written atomically
            note = f"checkpoint unreadable: {err}"
    config = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
    res = config.get("_resolved", {})
    runs[name] = metrics
    secs = [m["seconds"] for m in metrics]
    acc_key = "val_acc" if phase == "sweep" else "test_acc"
    cells = [
        name,
        lr + (" (CPU sweep's)" if source == "cpu" else ""),
        f"{len(metrics)}/{epochs}",
        f"{rc} ({RC.get(rc, 'FAILED')})",
        wall,
        f"{sum(secs) / len(secs):.1f}" if secs else "",
        f"{sum(m['eval_seconds'] for m in metrics) / len(metrics):.1f}" if metrics else "",
        (
            "graphed"
            if any(m.get("treatment_seconds") is None for m in metrics)
            else f"{sum(m['treatment_seconds'] for m in metrics):.2f}"
        )
        if metrics
        else "",
        str(res.get("znorm_backend") or "-"),
        f"{100 * metrics[-1][acc_key]:.2f}" if metrics else "",
        note,
    ]
    out.append("| " + " | ".join(cells) + " |")
    if rc not in RC:
        log = d.parent.parent / "logs" / f"{phase}-{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else ["(no log)"]
        failures.append(f"{name} (rc {rc}), logs/{phase}-{name}.log ends:\n\n    " + "\n    ".join(tail))
acc = "last val acc %" if phase == "sweep" else "last test acc %"
print(
    f"| run | lr | epochs | exit code | wall s | train s/epoch | eval s/epoch | treatment s (all epochs) "
    f"| ZNorm backend | {acc} | note |"
)
print("|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(out))
if failures:
    print("\nFailed runs:\n\n" + "\n\n".join(failures))
done = {n: m for n, m in runs.items() if m}
if phase == "final" and done:
    k = min(len(m) for m in done.values())
    if len({len(m) for m in done.values()}) > 1:
        print(
            f"\nThe runs finished different numbers of epochs; for a like-for-like comparison, test "
            f"accuracy % after epoch {k}, the last every run with an epoch reached:\n"
        )
        print(f"| run | test acc % after epoch {k} | train loss in epoch {k} |\n|---|---|---|")
        for n, m in done.items():
            print(f"| {n} | {100 * m[k - 1]['test_acc']:.2f} | {m[k - 1]['train_loss']:.4f} |")
    else:
        print(f"\nEvery run with an epoch finished the same number of epochs ({k}).")
EOF
}

versions() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(hostname); $NPROC CPU cores"
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo 'unknown (no git)')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    else
        echo "nvidia-smi: not available"
    fi
    "${PYCMD[@]}" - "$DEVICE" <<'EOF'
import platform
import sys

import torch

v = torch.version
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {v.cuda} | cuDNN", end=" ")
print(torch.backends.cudnn.version(), "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for mod in ("triton", "torchvision", "numpy", "tqdm", "matplotlib"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as err:
        print(mod, "MISSING:", err)
try:
    import matplotlib.pyplot  # noqa: F401  (builds the font cache once, not in 26 runs at the same time)
except Exception as err:
    print("matplotlib.pyplot: cannot import:", err)
try:
    from znorm_kernels.registry import resolve_backend

    print("ZNorm backend auto on", sys.argv[1], "->", resolve_backend("auto", sys.argv[1]))
except Exception as err:
    print("ZNorm backend auto on", sys.argv[1], "-> error:", err)
EOF
}

# --------------------------------------------------------------------------------------- finalize (report)
FINALIZED=0
INTERRUPTED=""
GPU_NAME="$DEVICE"
PHASE_TIMES=()
CHOSEN_LINES=()
SWEEP_MD="(the sweep did not run)"
SWEEP_TABLE=""
PREFLIGHT=""

finalize() {
    ((FINALIZED)) && return 0
    FINALIZED=1
    local t0 final_md results_md
    t0=$(now)
    log "report"
    final_md="(the final runs did not run)"
    if [[ -z "$SWEEP_TABLE" && -s "$WORK/sweep.status" ]]; then
        SWEEP_TABLE="$(status_table sweep "$WORK/sweep" "$WORK/sweep.status" "$SWEEP_EPOCHS" 2>&1)"
        SWEEP_MD="$("${PYCMD[@]}" bench/training/sweep_summary.py "$WORK/sweep" 2>&1)"
    fi
    if [[ -s "$WORK/final.status" ]]; then
        final_md="$(status_table final "$WORK/final" "$WORK/final.status" "$EPOCHS" 2>&1)"
    fi
    "${PYCMD[@]}" -m znorm_kernels.cifar.report "$WORK/final" --out "$WORK/report" >"$WORK/logs/report.log" 2>&1
    if [[ -s "$WORK/report/results.md" ]]; then
        results_md="$(cat "$WORK/report/results.md")"
    else
        results_md="(no report table: $(tail -n 3 "$WORK/logs/report.log" | tr '\n' ' '))"
    fi
    PHASE_TIMES+=("| report (status, table, figure) | $(($(now) - t0)) |")
    {
        echo "# ZNorm training comparison on $GPU_NAME: Fashion-MNIST, $MODEL, seed $SEED"
        echo
        echo -n "Made by \`bench/training/run_gpu.sh\` in $(elapsed) s (budget ${BUDGET} s)"
        echo "${INTERRUPTED:+; INTERRUPTED by a signal}."
        echo "Settings: device $DEVICE, AMP $AMP, batch $BATCH, final epochs $EPOCHS, sweep epochs $SWEEP_EPOCHS,"
        echo "val split $VAL_SPLIT (of the TRAIN set), sweep train subset ${SWEEP_SUBSET:-all the rest},"
        echo -n "final train subset ${FINAL_SUBSET:-all}, test subset ${TEST_SUBSET:-all}"
        echo " (sweep: $SWEEP_TEST_SUBSET, not used),"
        echo -n "$THREADS CPU thread(s) per run, ${MAX_PAR/#0/all} run(s) at a time,"
        echo " extra options: ${EXTRA_ARGS:-none}."
        echo
        echo "## 1. Learning-rate sweep (held-out TRAIN split, validation accuracy; the test set is not used)"
        echo
        echo "$SWEEP_MD"
        echo
        echo "Chosen rates (highest validation accuracy after the last finished sweep epoch):"
        echo
        printf '%s\n' "${CHOSEN_LINES[@]}"
        echo
        echo "Sweep runs:"
        echo
        echo "$SWEEP_TABLE"
        echo
        echo "## 2. Final runs"
        echo
        echo "\`python -m znorm_kernels.cifar.report\`:"
        echo
        echo "$results_md"
        echo
        if [[ -s "$WORK/report/test_accuracy.png" ]]; then
            echo "![test accuracy against epoch](test_accuracy.png)"
            echo
        fi
        echo "Final runs (epochs finished of $EPOCHS; train s/epoch by CUDA events on the GPU, eval s includes"
        echo "the validation/test passes; treatment = the gradient treatment's time, summed over the epochs):"
        echo
        echo "$final_md"
        echo
        echo "## 3. Timings"
        echo
        echo "| phase | wall s |"
        echo "|---|---|"
        printf '%s\n' "${PHASE_TIMES[@]}"
        echo "| whole script | $(elapsed) |"
        echo
        echo "## 4. Versions"
        echo
        echo '```'
        echo "$PREFLIGHT"
        echo '```'
        echo
        echo "## 5. Commands (run from the repo root, each under \`timeout\` to its phase's deadline)"
        echo
        echo '```'
        echo "bash bench/training/run_gpu.sh OUT   # environment: $(env | grep -E "^($KNOBS)=" | sort | tr '\n' ' ')"
        [[ -s "$WORK/commands.txt" ]] && sed "s|$WORK/||g" "$WORK/commands.txt"
        echo "${PY} bench/training/sweep_summary.py sweep"
        echo "${PY} -m znorm_kernels.cifar.report final --out report"
        echo '```'
        echo
        echo "training.tgz holds sweep/ and final/ (the run folders, without checkpoints), logs/ (each process's"
        echo "output), report/, commands.txt and a copy of this file."
    } >"$REPORT"
    [[ -s "$WORK/report/test_accuracy.png" ]] && cp "$WORK/report/test_accuracy.png" "$OUT/test_accuracy.png"
    cp "$REPORT" "$WORK/training_report.md"
    tar -czf "$OUT/training.tgz" -C "$WORK" --exclude=checkpoint.pt --exclude='*.tmp' --exclude='*.tmp.png' \
        sweep final logs report training_report.md $([[ -e "$WORK/commands.txt" ]] && echo commands.txt)
    log "wrote $REPORT, $OUT/training.tgz ($(du -h "$OUT/training.tgz" | cut -f1))"
}

on_signal() {
    INTERRUPTED=1
    log "signal: stopping the runs and writing what there is"
    kill_all
    finalize
    exit 130
}
on_exit() {
    kill_all
    if [[ "$KEEP_WORK" == 1 ]]; then echo "scratch folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap on_signal INT TERM
trap on_exit EXIT

# ------------------------------------------------------------------------------------------------- preflight
log "budget ${BUDGET} s; scratch $WORK; out $OUT"
PREFLIGHT="$(versions 2>&1)"
echo "$PREFLIGHT"
GPU_NAME="$(sed -n 's/^device: \(.*\) capability.*/\1/p' <<<"$PREFLIGHT")"
GPU_NAME="${GPU_NAME:-$DEVICE}"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [[ ! -e "$DATA/$f.gz" && ! -e "$DATA/$f" ]]; then
        echo "no Fashion-MNIST file $f[.gz] in $DATA (set DATA)" >&2
        PREFLIGHT+=$'\n'"ERROR: no Fashion-MNIST file $f[.gz] in $DATA"
        finalize
        exit 2
    fi
done
if [[ "$DEVICE" == cuda* ]] && ! grep -q "cuda available True" <<<"$PREFLIGHT"; then
    echo "DEVICE=$DEVICE but torch sees no CUDA device" >&2
    PREFLIGHT+=$'\n'"ERROR: DEVICE=$DEVICE but torch sees no CUDA device"
    finalize
    exit 2
fi
PHASE_TIMES+=("| preflight (versions, font cache) | $(elapsed) |")

COMMON="--dataset fashion-mnist --data $DATA --model $MODEL --seed $SEED --batch-size $BATCH --amp $AMP"
COMMON+=" --device $DEVICE --threads $THREADS --no-progress"
((${#EXTRA[@]})) && COMMON+=" ${EXTRA[*]}"

# ---------------------------------------------------------------------------------------- phase 1: sweep
SWEEP_END=$((START + $(awk -v b="$BUDGET" -v f="$SWEEP_FRACTION" 'BEGIN { printf "%d", b * f }')))
JOB_NAME=() JOB_ARGS=() JOB_LR=() JOB_SRC=()
for c in "${CANDIDATES[@]}"; do
    read -r opt method lrs <<<"$c"
    for lr in $lrs; do
        name="$opt-$method-lr$lr"
        args="$COMMON --optimizer $opt --method $method --lr $lr --epochs $SWEEP_EPOCHS --val-split $VAL_SPLIT"
        args+=" --test-subset $SWEEP_TEST_SUBSET --out $WORK/sweep/$name"
        [[ -n "$SWEEP_SUBSET" ]] && args+=" --train-subset $SWEEP_SUBSET"
        JOB_NAME+=("$name") JOB_ARGS+=("$args") JOB_LR+=("$lr") JOB_SRC+=("sweep")
    done
done
t0=$(now)
log "phase 1: ${#JOB_NAME[@]} sweep runs until +$((SWEEP_END - START)) s"
STATUS_FILE="$WORK/sweep.status"
: >"$STATUS_FILE"
run_jobs sweep "$SWEEP_END"
PHASE_TIMES+=("| 1. sweep (${#JOB_NAME[@]} runs) | $(($(now) - t0)) |")

t0=$(now)
SWEEP_TABLE="$(status_table sweep "$WORK/sweep" "$WORK/sweep.status" "$SWEEP_EPOCHS" 2>&1)"
SWEEP_MD="$("${PYCMD[@]}" bench/training/sweep_summary.py "$WORK/sweep" 2>&1)"
CHOSEN="$(sed -n 's/^chosen: --lr //p' <<<"$SWEEP_MD")"
if [[ -z "$CHOSEN" ]]; then
    SWEEP_MD="No rate chosen: either no sweep run finished an epoch in time or sweep_summary.py failed; it printed:"$'\n\n'"$SWEEP_MD"
fi
echo "$SWEEP_MD"
declare -A LR=() SRC=()
IFS=',' read -r -a entries <<<"$CHOSEN"
for e in "${entries[@]}"; do
    [[ "$e" == */*=* ]] && LR[${e%%=*}]="${e#*=}" && SRC[${e%%=*}]=sweep
done
CHOSEN_LINES=("| optimizer/method | lr | from |" "|---|---|---|")
for p in "${PAIRS[@]}"; do
    if [[ -z "${LR[$p]:-}" ]]; then
        LR[$p]="${CPU_LR[$p]}"
        SRC[$p]=cpu
        CHOSEN_LINES+=("| $p | ${LR[$p]} | FALLBACK: no sweep run finished an epoch: the CPU sweep's (RESULTS.md) |")
    else
        CHOSEN_LINES+=("| $p | ${LR[$p]} | this sweep |")
    fi
done
printf '%s\n' "${CHOSEN_LINES[@]}"
PHASE_TIMES+=("| sweep summary | $(($(now) - t0)) |")

# ---------------------------------------------------------------------------------------- phase 2: finals
FINAL_END=$((START + BUDGET - RESERVE))
JOB_NAME=() JOB_ARGS=() JOB_LR=() JOB_SRC=()
for p in "${PAIRS[@]}"; do
    opt="${p%/*}" method="${p#*/}"
    name="$MODEL-$opt-$method-seed$SEED"
    args="$COMMON --optimizer $opt --method $method --lr ${LR[$p]} --epochs $EPOCHS --out $WORK/final/$name"
    [[ -n "$FINAL_SUBSET" ]] && args+=" --train-subset $FINAL_SUBSET"
    [[ -n "$TEST_SUBSET" ]] && args+=" --test-subset $TEST_SUBSET"
    JOB_NAME+=("$name") JOB_ARGS+=("$args") JOB_LR+=("${LR[$p]}") JOB_SRC+=("${SRC[$p]}")
done
t0=$(now)
log "phase 2: ${#JOB_NAME[@]} final runs until +$((FINAL_END - START)) s"
STATUS_FILE="$WORK/final.status"
: >"$STATUS_FILE"
run_jobs final "$FINAL_END"
PHASE_TIMES+=("| 2. final (${#JOB_NAME[@]} runs) | $(($(now) - t0)) |")

# ---------------------------------------------------------------------------------------- phase 3: report
finalize
cat "$REPORT"
exit 0

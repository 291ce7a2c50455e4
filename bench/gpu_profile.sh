#!/usr/bin/env bash
# Nsight Compute on the Triton kernel and the CUDA backend's three kernels, for a lent GPU machine:
#
#   bash bench/gpu_profile.sh OUT              # about 2 minutes on an H100 (PROFILE_BUDGET_S, default 120)
#   bash bench/gpu_profile.sh OUT --dry-run    # print the ncu commands, run nothing (no GPU, no ncu needed)
#
# Targets (driver: python -m bench.gpu_probe --ncu-target LIST DTYPE BACKEND, which makes the list's
# gradients, calls the backend as shipped NCU_WARMUP times, then NCU_CALLS times):
#   resnet56 float32 triton  (znorm_queue_kernel; skip the warm-up launches, profile 1)
#   resnet56 float32 cuda    (stats_kernel, finalize_kernel, normalize_kernel: skip 3 per warm-up call,
#                             profile the 3 launches of one call)
#   llm bfloat16 triton, llm bfloat16 cuda (the same)
# The CUDA backend needs the extension built on that machine (make setup-system, or bench/gpu_check.sh's
# build step); without it those two targets fail and say so, the Triton ones still run.
# ncu: --clock-control none (the card's clocks are left alone), kernel replay with its default cache control
# (caches flushed before each pass), sections SpeedOfLight, MemoryWorkloadAnalysis(+_Tables), Occupancy,
# LaunchStats, WarpStateStats, SchedulerStats. Each run is exported to a scratch folder and printed with
# `ncu --import REP --page details --print-summary none`.
#
# Output, at most 4 files in OUT:
#   ncu_resnet56_float32.txt  the details pages of both backends on ResNet-56 float32 (each headed by its command)
#   ncu_llm_bfloat16.txt      the same on the LLM list in bfloat16
#   ncu_log.txt               every command, its exit code and wall time, and the last lines of its output
#   ncu_reports.tgz           the .ncu-rep files, only when they total under NCU_REP_MAX_MB (default 16)
# Every ncu call runs under `timeout` (NCU_TIMEOUT_S, default 45, and no more than what is left of the budget).
# Environment: PYTHON (default python3), NCU (default ncu), PROFILE_BUDGET_S, NCU_TIMEOUT_S, NCU_WARMUP (3),
# NCU_CALLS (2), NCU_REP_MAX_MB, NCU_TARGETS (default "resnet56:float32:triton resnet56:float32:cuda
# llm:bfloat16:triton llm:bfloat16:cuda").
# Exit code: 0 when every target produced a report, 1 when one did not, 2 when there is no ncu (not dry-run).

set -u

OUT="${1:-}"
if [[ -z "$OUT" || "$OUT" == --* ]]; then
    echo "usage: bash bench/gpu_profile.sh OUT [--dry-run]" >&2
    exit 64
fi
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
PY="${PYTHON:-python3}"
NCU="${NCU:-ncu}"
BUDGET="${PROFILE_BUDGET_S:-120}"
PER_CALL="${NCU_TIMEOUT_S:-45}"
WARMUP="${NCU_WARMUP:-3}"
CALLS="${NCU_CALLS:-2}"
REP_MAX_MB="${NCU_REP_MAX_MB:-16}"
TARGETS="${NCU_TARGETS:-resnet56:float32:triton resnet56:float32:cuda llm:bfloat16:triton llm:bfloat16:cuda}"
SECTIONS=(SpeedOfLight MemoryWorkloadAnalysis MemoryWorkloadAnalysis_Tables Occupancy LaunchStats
    WarpStateStats SchedulerStats)

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
unset TRITON_INTERPRET
START=$(date +%s)
LOG="$OUT/ncu_log.txt"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_profile.XXXXXX")"
FAILED=0

if ((!DRY)) && ! command -v "$NCU" >/dev/null; then
    echo "no $NCU on PATH: nothing profiled" | tee "$LOG"
    exit 2
fi

section_args=()
for s in "${SECTIONS[@]}"; do section_args+=(--section "$s"); done

{
    echo "# bench/gpu_profile.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET}s, per call ${PER_CALL}s"
    ((DRY)) || "$NCU" --version 2>&1 | tail -n 1
    ((DRY)) || nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
} >"$LOG"

for target in $TARGETS; do
    IFS=: read -r list dtype backend <<<"$target"
    case "$backend" in
        triton) regex="znorm_queue_kernel" ; per_call=1 ;;
        cuda) regex="(stats|finalize|normalize)_kernel" ; per_call=3 ;;
        *) echo "unknown backend in NCU_TARGETS: $target" >>"$LOG" ; FAILED=1 ; continue ;;
    esac
    name="${list}_${dtype}_${backend}"
    text="$OUT/ncu_${list}_${dtype}.txt"
    cmd=("$NCU" --clock-control none --kernel-name "regex:$regex" --launch-skip $((WARMUP * per_call))
        --launch-count "$per_call" "${section_args[@]}" --export "$SCRATCH/$name" --force-overwrite
        "$PY" -m bench.gpu_probe --ncu-target "$list" "$dtype" "$backend" --ncu-warmup "$WARMUP"
        --ncu-calls "$CALLS")
    if ((DRY)); then
        printf '%q ' "${cmd[@]}"
        echo
        echo "  then: $NCU --import $SCRATCH/$name.ncu-rep --page details --print-summary none >> $text"
        continue
    fi
    left=$((BUDGET - ($(date +%s) - START) - 5))
    limit=$((PER_CALL < left ? PER_CALL : left))
    if ((limit < 10)); then
        echo "== $name: skipped, budget spent" | tee -a "$LOG"
        FAILED=1
        continue
    fi
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s%N)
    timeout --signal=INT --kill-after=10 "$limit" "${cmd[@]}" >"$SCRATCH/$name.out" 2>&1
    rc=$?
    ((rc == 0)) || FAILED=1
    ms=$((($(date +%s%N) - t0) / 1000000))
    {
        echo
        echo "== $name: rc=$rc, $((ms / 1000)).$(((ms % 1000) / 100)) s"
        printf '%q ' "${cmd[@]}"
        echo
        tail -n 25 "$SCRATCH/$name.out"
    } >>"$LOG"
    {
        echo "################################################################################"
        echo "# $name: rc=$rc, $((ms / 1000)) s"
        printf '# %s\n' "$(printf '%q ' "${cmd[@]}")"
        echo "################################################################################"
    } >>"$text"
    if [[ -f "$SCRATCH/$name.ncu-rep" ]]; then
        timeout 30 "$NCU" --import "$SCRATCH/$name.ncu-rep" --page details --print-summary none >>"$text" 2>&1 ||
            { echo "(ncu --import failed: rc=$?)" >>"$text"; FAILED=1; }
    else
        echo "(no report: the run's output follows)" >>"$text"
        tail -n 60 "$SCRATCH/$name.out" >>"$text"
        FAILED=1
    fi
    echo "   rc=$rc, $((ms / 1000)) s; details in $text"
done

if ((DRY)); then
    rmdir "$SCRATCH"
else
    reps=("$SCRATCH"/*.ncu-rep)
    if [[ -e "${reps[0]}" ]]; then
        kb=$(du -ck "${reps[@]}" | tail -n 1 | cut -f1)
        if ((kb < REP_MAX_MB * 1024)); then
            (cd "$SCRATCH" && tar czf "$OUT/ncu_reports.tgz" ./*.ncu-rep)
            echo "reports: ncu_reports.tgz (${kb} KB before compression)" >>"$LOG"
            rm -rf "$SCRATCH"
        else
            echo "reports not kept: ${kb} KB over ${REP_MAX_MB} MB (they stay in $SCRATCH)" >>"$LOG"
        fi
    fi
    echo "total $(($(date +%s) - START)) s" | tee -a "$LOG"
    ls -la "$OUT"
fi
exit $FAILED

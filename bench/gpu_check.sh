#!/usr/bin/env bash
# The prepared check for a lent GPU machine (torch and triton installed, no package registry reachable):
# build the extension, run the test suite on CUDA, run the full benchmark, and leave everything under OUT.
#
#   bash bench/gpu_check.sh OUT            # or: make gpu-check OUT=/path
#   bash bench/gpu_check.sh OUT --smoke    # no GPU needed: exercises this script's logic on the CPU with
#                                          # tiny settings (build dry-run, one test file, a 20-layer list)
#
# Budget: about 6 minutes in all on an H100 (GPU_CHECK_BUDGET_S, default 345 s). Every step runs under
# `timeout`, gets what is left of the budget (up to its own cap), has its exit code and wall time recorded,
# and later steps run whatever an earlier one did. OUT/summary.md lists the steps; OUT/logs/ has each step's
# output; OUT/bench/ the benchmark's results.md, results.json and chart.png. Exit code: 0 when every step
# passed, 1 when one failed or timed out, 2 when there is no GPU (without --smoke).
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, BENCH_ARGS (extra arguments for python -m bench),
# ZNORM_PREBUILT_SO (a carried extension built against the same torch: no build there), GPU_CHECK_COMMIT (the
# commit sent, when the copied .git is stale), GPU_CHECK_TEST_WORKERS (pytest-xdist workers, default 8),
# GPU_CHECK_TESTS (the test paths, in the order wanted), GPU_CHECK_TEST_CAP_S (the test step's cap, 150 s).
# Through the device tool, which brings back at most 8 files: OUT elsewhere, then pack it, e.g.
#   bash bench/gpu_check.sh /tmp/gc; tar czf $OUT/gc.tgz -C /tmp gc; cp /tmp/gc/summary.md $OUT/

set -u

OUT="${1:-}"
MODE="${2:-}"
if [[ -z "$OUT" || "$OUT" == --* ]]; then
    echo "usage: bash bench/gpu_check.sh OUT [--smoke]" >&2
    exit 64
fi
SMOKE=0
[[ "$MODE" == "--smoke" ]] && SMOKE=1
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-345}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
unset TRITON_INTERPRET
# No registry is reachable there: let pip fail at once instead of retrying (setup-system tries to install
# only what is missing, and builds the package in place without the network).
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
START=$(date +%s)
SUMMARY="$OUT/summary.md"
STEPS=()
FAILED=0

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# run_step NAME CAP_SECONDS COMMAND...: run under timeout min(CAP, what is left of the budget - 5 s).
run_step() {
    local name="$1" cap="$2"
    shift 2
    local left limit t0 rc ms wall status
    left=$(($(remaining) - 5))
    limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        STEPS+=("| $name | - | 0 | skipped: budget spent |")
        echo "== $name: skipped (budget spent)"
        return 0
    fi
    echo "== $name (limit ${limit}s): $*"
    t0=$(date +%s%N)
    # bash -c, so that a shell function (exported) can be a step too
    # SIGINT first: pytest then still prints its summary of failures, and Python programs unwind.
    # In a process group of its own (setsid; timeout signals its group), killed whole when the step ends:
    # on the 2026-11-27 run pytest-xdist workers outlived a timed-out test step and loaded the CPU under
    # the benchmark's host timings (load average 19 on 16 cores).
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)" >"$OUT/logs/$name.log"
    setsid timeout --signal=INT --kill-after=15 "$limit" bash -c '"$@"' step "$@" >>"$OUT/logs/$name.log" 2>&1 &
    local pid=$!
    wait "$pid"
    rc=$?
    kill -KILL -- "-$pid" 2>/dev/null && echo "   killed what was left of the step's processes"
    ms=$((($(date +%s%N) - t0) / 1000000))
    wall="$((ms / 1000)).$(((ms % 1000) / 100))"
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMED OUT after ${limit}s" ; FAILED=1 ;;
        *) status="FAILED" ; FAILED=1 ;;
    esac
    STEPS+=("| $name | $rc | $wall | $status |")
    echo "   rc=$rc, ${wall}s, $status; last lines of logs/$name.log:"
    tail -n 5 "$OUT/logs/$name.log" | sed 's/^/   | /'
}

skip_step() {
    STEPS+=("| $1 | - | 0 | skipped: $2 |")
    echo "== $1: skipped ($2)"
}

versions() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(hostname); $(nproc) CPU cores"
    # The device tool copies the working tree; its .git can be older than the tree (seen on the first GPU
    # run), so the caller can say which commit it sent.
    local head
    head="$(git rev-parse HEAD 2>/dev/null || echo unknown) (read from the copied .git)"
    echo "commit: ${GPU_CHECK_COMMIT:-$head}"
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    echo "CUDA_HOME=${CUDA_HOME:-unset}"
    "$PY" - <<'EOF'
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
for mod in ("numpy", "pytest", "pytest_benchmark", "tqdm", "matplotlib", "torchvision", "ninja"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except ImportError:
        print(mod, "MISSING")
EOF
}

export PY
export -f versions
run_step versions 30 versions

HAVE_GPU=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && HAVE_GPU=1

build() {
    # A carried prebuilt extension (built elsewhere against this very torch version, e.g. to save the device
    # machine's time): used as it is when it loads, else the normal build.
    if [[ -n "${ZNORM_PREBUILT_SO:-}" ]]; then
        cp "$ZNORM_PREBUILT_SO" znorm_kernels/_C.abi3.so &&
            "$PY" -c "import torch; from znorm_kernels.backends import native; native.load(); print('prebuilt extension loads:', native.has_cuda_kernel())" &&
            return 0
        echo "the prebuilt extension $ZNORM_PREBUILT_SO does not load: building"
    fi
    if command -v make >/dev/null; then
        make setup-system PYTHON="$PY"
    else
        echo "no make: building with pip / setup.py directly"
        "$PY" -m pip install --no-build-isolation --no-deps -e . || "$PY" setup.py build_ext --inplace
    fi
}
export -f build

if ((HAVE_GPU)); then
    # Compile the CUDA kernel for this card only (setup.py's default is two archs), with every core.
    if [[ -z "${ZNORM_CUDA_ARCHS:-}" ]]; then
        ZNORM_CUDA_ARCHS="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
        export ZNORM_CUDA_ARCHS
    fi
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    echo "building for ZNORM_CUDA_ARCHS=$ZNORM_CUDA_ARCHS with MAX_JOBS=$MAX_JOBS"
    run_step build 130 build
    # The GPU-only checks first (rule 12: streams, graph capture; the backends' own paths), so that they run
    # even if the whole suite outlasts its share of the budget (pytest drops the repeated paths).
    # test_triton_optim.py compiles a kernel variant per option combination: left to the general run.
    # Parallel workers where pytest-xdist is installed (compiling Triton variants dominates: serially the
    # first GPU run got through 140 tests in 120 s), one line per test (-v) so that a run cut short still
    # says what passed and failed, and a per-test limit where pytest-timeout is installed.
    PYTEST_PAR=()
    # worksteal: an idle worker takes tests queued on a busy one (on the third GPU run the default "load"
    # left test_compile.py queued behind the gloo tests of one worker until the cap).
    "$PY" -c "import xdist" 2>/dev/null && PYTEST_PAR+=(-n "${GPU_CHECK_TEST_WORKERS:-8}" --dist worksteal)
    "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_PAR+=(--timeout 120)
    # GPU_CHECK_TESTS narrows the run (e.g. to the GPU files alone, when CI has run the rest on the CPU).
    DEFAULT_TESTS="tests/test_rule12.py tests/test_grad_watch.py tests/test_triton_rebase.py
        tests/test_cifar_steps.py tests/test_native.py tests/test_triton.py tests/test_optim.py tests/test_native_optim.py tests/test_triton_optim.py tests/test_distributed.py tests/test_compile.py tests"
    read -r -d '' -a TEST_PATHS <<<"${GPU_CHECK_TESTS:-$DEFAULT_TESTS}"
    run_step tests "${GPU_CHECK_TEST_CAP_S:-150}" "$PY" -m pytest "${TEST_PATHS[@]}" "${PYTEST_PAR[@]}" \
        -v -rfEs --tb=short -p no:cacheprovider --durations=15
    # The ZNorm optimizers (issue #12): their fused step against torch's fused Adam alone and the hook on it,
    # on ResNet-56 and the 707 M LLM-shaped list (SGD: bench.optim_step --optimizers sgd-momentum).
    run_step optim-bench 100 "$PY" -m bench.optim_step --device cuda --lists resnet56,llm \
        --optimizers adam,sgd-momentum --fused --reps 10 --max-seconds 2
    # The queue kernel's timeline variant on ResNet-50 in bfloat16 (#23 item 5): one picture of programs
    # against time, measured, and the schedule model's beside it (timeline-*-model.png).
    run_step timeline 60 "$PY" -m bench.timeline resnet50 bfloat16 --measured \
        --out "$OUT/timeline-resnet50-bfloat16.png"
    # Every list (--full), the two of PERF.md's headline first; compiled alternatives last, not started
    # within 50 s of the step's limit; results saved after each case, so a timeout still leaves them.
    left=$(($(remaining) - 5))
    run_step bench 600 "$PY" -m bench --lists resnet56,llm,resnet110,resnet152,resnet50,vitb16,plain100m \
        --no-progress --out "$OUT/bench" --budget-s $((left - 50)) ${BENCH_ARGS:-}
    run_step pytest-benchmark 60 "$PY" -m pytest bench -q -p no:cacheprovider \
        --benchmark-json "$OUT/pytest-benchmark.json"
elif ((SMOKE)); then
    echo "no CUDA device: --smoke, so each step runs in a tiny CPU form to exercise this script"
    run_step build 60 make -n setup-system PYTHON="$PY"
    run_step tests 120 "$PY" -m pytest tests/test_dispatch.py -q -p no:cacheprovider
    run_step bench 240 "$PY" -m bench --device cpu --lists resnet20 --dtypes float32 --compile-lists none \
        --repeats 3 --max-seconds 0.2 --train-batch 4 --train-steps 2 --no-progress --out "$OUT/bench" \
        ${BENCH_ARGS:-}
    run_step pytest-benchmark 120 "$PY" -m pytest bench -q -p no:cacheprovider -k "10k and float32" \
        --benchmark-json "$OUT/pytest-benchmark.json"
else
    echo "NO GPU: torch.cuda.is_available() is False with $PY; nothing to measure (use --smoke to test the script)"
    for s in build tests bench pytest-benchmark; do skip_step "$s" "no CUDA device"; done
fi

TOTAL=$(($(date +%s) - START))
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Interpreter: $PY; GPU present: $([[ $HAVE_GPU == 1 ]] && echo yes || echo NO)$([[ $SMOKE == 1 ]] && echo ' (smoke mode)'); total ${TOTAL}s of a ${BUDGET}s budget."
    echo
    echo "| step | exit code | wall s | status |"
    echo "|---|---|---|---|"
    printf '%s\n' "${STEPS[@]}"
    echo
    echo "Versions (logs/versions.log):"
    echo
    echo '```'
    grep -E '^(date|commit|python|device|triton|host)' "$OUT/logs/versions.log" 2>/dev/null
    grep -iE 'driver' "$OUT/logs/versions.log" 2>/dev/null | head -n 2
    echo '```'
    if [[ -f "$OUT/bench/results.md" ]]; then
        echo
        cat "$OUT/bench/results.md"
    fi
} >"$SUMMARY"
cat "$SUMMARY"
echo
echo "everything is under $OUT (summary.md, logs/, bench/)"
if ((!HAVE_GPU && !SMOKE)); then
    exit 2
fi
exit $FAILED

#!/usr/bin/env bash
# The GPU check for a bare CUDA machine (H100) with torch and triton preinstalled; run from the repo
# root:   bash bench/gpu_check.sh
# 1. installs nanofast (editable, no build isolation, no dependency downloads: the box may be offline),
# 2. runs the CUDA tests: tests/test_triton_kernels.py and the ops tests,
# 3. probes the CPU GEMM policy on this host's CPU (bench/probes/cpu_gemm_probe.py),
# 4. runs nanofast-compare cpu vs cuda on a small model (same weights, batches and dropout masks),
# 5. runs the GPU micro-benchmark (bench/gpu_bench.py),
# 6. profiles the kernels and the ops' host overhead, and sweeps attention's tiles while time is left
#    (bench/gpu_profile.py).
# Writes ${OUT:-bench/results}/gpu_last.md (machine, versions, command, step summary, benchmark
# tables), gpu_profile.md and the full log gpu_check.log beside it. Copy gpu_last.md over
# bench/gpu_last.md: the repository keeps the last run's tables only.
# On a fresh machine the Triton tests compile every kernel variant, the longest step. Every step has a
# timeout and the whole run stays within GPU_CHECK_BUDGET_S (default 520 s); a failed step is
# recorded and the script goes on, exiting non-zero at the end if anything failed.
set -uo pipefail

OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
TABLE="$OUT_DIR/gpu_last.md"
BENCH_MD="$OUT_DIR/gpu_bench.md"
: >"$LOG"
BUDGET_S=${GPU_CHECK_BUDGET_S:-520}  # whole-script deadline, under the 10-minute limit per call
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the CUDA images have python3 only
unset TRITON_INTERPRET  # the interpreter would run everything on the CPU
export PYTHONUNBUFFERED=1

declare -a SUMMARY=()
FAILED=0

log() { echo "[gpu_check $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# step NAME MAX_SECONDS RESERVE_SECONDS CMD...: run CMD with a timeout of MAX_SECONDS, shortened so
# that RESERVE_SECONDS of the budget stay for the steps after it. With SOFT=1 in the environment a
# failure is logged but does not fail the script (the caller has a fallback).
step() {
    local name=$1 max=$2 reserve=$3
    shift 3
    local left=$((BUDGET_S - SECONDS - reserve))
    local limit=$((max < left ? max : left))
    if ((limit < 10)); then
        log "SKIP $name: out of time budget"
        SUMMARY+=("| $name | skipped (time budget) | 0 |")
        FAILED=1
        return 1
    fi
    log "START $name (timeout ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local dt=$((SECONDS - t0))
    if ((rc == 0)); then
        log "OK $name (${dt}s)"
        SUMMARY+=("| $name | ok | $dt |")
    else
        [[ $rc == 124 || $rc == 137 ]] && log "TIMEOUT $name after ${dt}s" || log "FAIL $name rc=$rc (${dt}s)"
        SUMMARY+=("| $name | FAILED rc=$rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (timeout)') | $dt |")
        [[ "${SOFT:-0}" == 1 ]] || FAILED=1
    fi
    return $rc
}

log "repo $(pwd), output in $OUT_DIR"
timeout 30 nvidia-smi >>"$LOG" 2>&1 || log "nvidia-smi unavailable"
step "environment" 60 400 "$PY" -c "
import torch, triton, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
assert torch.cuda.is_available(), 'no CUDA device visible to torch'
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
"

# Install: editable first, then a plain install; --no-deps because the box may have no network
# (torch, triton and numpy are there; the build needs scikit-build-core, pybind11, cmake, ninja).
if ! SOFT=1 step "pip install -e ." 150 330 "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    step "pip install ." 120 330 "$PY" -m pip install --no-build-isolation --no-deps . ||
        log "install failed: the tests and benchmarks below need the installed package and will fail"
fi
step "import nanofast" 60 320 "$PY" -c "import nanofast, nanofast.kernels as k; print(nanofast.__file__, k.__file__, 'HAS_TRITON', k.HAS_TRITON)"

# The CUDA tests. The first run of each kernel variant compiles it.
step "pytest tests/test_triton_kernels.py" 300 200 \
    "$PY" -m pytest tests/test_triton_kernels.py -q -rs --maxfail=10 -p no:cacheprovider --durations=10
OPS_TESTS=$(ls tests/test_ops*.py 2>/dev/null | tr '\n' ' ')
if [[ -n "$OPS_TESTS" ]]; then
    # shellcheck disable=SC2086
    step "pytest ops tests" 120 150 "$PY" -m pytest $OPS_TESTS -q -rs -p no:cacheprovider
else
    log "no tests/test_ops*.py found"
fi

# nanofast's CPU GEMM against MKL on this host's CPU (the GEMM policy: csrc/dispatch.cpp)
SOFT=1 step "cpu_gemm_probe.py" 40 200 "$PY" bench/probes/cpu_gemm_probe.py

# The same training on both devices: same weights, batches and dropout masks (nanofast's masks are
# identical on CPU and GPU), so per-step losses should agree within rounding noise.
step "nanofast-compare cpu cuda" 90 200 "$PY" -m nanofast.compare cpu cuda --iters=30 --n_layer=2 --n_head=4 \
    --n_embd=128 --block_size=64 --batch_size=12 --dropout=0.1 --dtype=float32 --dataset=readme \
    --data_path=README.md --data_dir=/tmp/nanofast-data --out_dir="$OUT_DIR/compare"

step "gpu_bench.py" 240 70 "$PY" bench/gpu_bench.py --out "$BENCH_MD"
# The tile sweep stops itself 30 seconds before the time left (or after 170 s).
PROFILE_LEFT=$((BUDGET_S - SECONDS - 5))
step "gpu_profile.py" 200 5 "$PY" bench/gpu_profile.py --out "$OUT_DIR/gpu_profile.md" \
    --budget $((PROFILE_LEFT > 200 ? 170 : PROFILE_LEFT - 30))

VERSIONS=$(timeout 30 "$PY" -c "
import sys, torch, triton
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__)
" 2>/dev/null || echo "unavailable (see gpu_check.log)")
{
    echo "# Last GPU check"
    echo
    echo "The output of bench/gpu_check.sh (written to \$OUT/gpu_last.md, default bench/results/; the copy in"
    echo "bench/gpu_last.md is the last run's). Profile and tile sweep: gpu_profile.md beside it."
    echo
    echo "- command: \`GPU_CHECK_BUDGET_S=$BUDGET_S bash bench/gpu_check.sh\`"
    echo "- finished: $(date -u '+%Y-%m-%d %H:%M UTC'), total ${SECONDS}s"
    echo "- GPU, driver: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
    echo "- versions: $VERSIONS"
    echo
    echo "## Steps"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    # pytest's one-line results, so the table says how many passed without opening the log
    grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed)' "$LOG" | sed 's/^/    /' | tail -n 20
    echo
    echo "## Benchmarks (bench/gpu_bench.py)"
    echo
    if [[ -s "$BENCH_MD" ]]; then cat "$BENCH_MD"; else echo "(no benchmark table: see gpu_check.log)"; fi
} >"$TABLE"
log "wrote $TABLE and $LOG"
cat "$TABLE"
exit $FAILED

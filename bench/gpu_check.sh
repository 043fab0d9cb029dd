#!/usr/bin/env bash
# The GPU check for a bare CUDA machine (H100/H200) with torch and triton preinstalled; run from the
# repo root:   bash bench/gpu_check.sh
# 1. installs nanofast (editable, no build isolation, no dependency downloads: the box may be offline),
# 2. tests the compiler-visible CUDA ops and CUDA training steps (tests/test_triton_ops.py,
#    tests/test_train_cuda.py, tests/test_compile.py),
# 3. times whole training steps in every mode (bench/gpu_train_bench.py),
# 4. trains on the CPU and on CUDA side by side (nanofast-compare, two configs) and resumes a CPU run
#    on CUDA (bench/resume_check.py); tiny shakespeare from $SHAKESPEARE (default .gpu_data/input.txt)
#    where present, else the README as a corpus,
# 5. tests nanofast.patch on CUDA with Hugging Face models of each family (tests/test_patch_transformers.py,
#    tests/test_triton_layers.py): transformers is installed from .gpu_wheels/ where the caller brought
#    its wheels (the box may be offline; `pip download` them for the box's Python), else skipped,
# 6. times sampling with and without the key/value cache (bench/gpu_sample.py),
# 7. runs the ops tests and the kernel micro-benchmark (bench/gpu_bench.py), then the Triton kernels'
#    tests with the time left.
# GPU_CHECK_ONLY="tests train families sample compare ops kernels" runs only the named groups (default: all),
# so that a short device session can rerun what an earlier call did not reach.
# Writes ${OUT:-bench/results}/gpu_last.md (machine, versions, command, step summary, tables) and the
# full log gpu_check.log beside it. Copy gpu_last.md over bench/gpu_last.md: the repository keeps the
# last run's tables only. GPU_CHECK_CPU_MS="shakespeare=MS,gpt2-124m=MS" adds the CPU-versus-GPU
# speedup table (CPU step times measured elsewhere). Every step has a timeout and the whole run stays
# within GPU_CHECK_BUDGET_S (default 470 s); a failed step is recorded and the script goes on,
# exiting non-zero at the end if anything failed.
set -uo pipefail

OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
TABLE="$OUT_DIR/gpu_last.md"
BENCH_MD="$OUT_DIR/gpu_bench.md"
TRAIN_MD="$OUT_DIR/gpu_train_bench.md"
RESUME_MD="$OUT_DIR/resume_check.md"
SAMPLE_MD="$OUT_DIR/gpu_sample.md"
# tiny shakespeare, where the caller has a copy (the box may be offline): else the README is the corpus
SHAKESPEARE=${SHAKESPEARE:-.gpu_data/input.txt}
: >"$LOG"
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # whole-script deadline: under 8 minutes
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the CUDA images have python3 only
unset TRITON_INTERPRET  # the interpreter would run everything on the CPU
export PYTHONUNBUFFERED=1

declare -a SUMMARY=()
FAILED=0
ONLY=" ${GPU_CHECK_ONLY:-tests train families sample compare ops kernels} "
want() { [[ "$ONLY" == *" $1 "* ]]; }

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

# In order of what matters most when time runs short (each step's timeout leaves RESERVE seconds for
# the steps after it): the new CUDA paths' tests, the whole-step benchmark, the CPU-versus-CUDA runs,
# then the per-op tests and micro-benchmarks. The first run of each kernel variant compiles it.
want tests && step "pytest triton_ops, train_cuda, compile" 150 300 \
    "$PY" -m pytest tests/test_triton_ops.py tests/test_train_cuda.py tests/test_compile.py -q -rs \
    -p no:cacheprovider --durations=5

# Whole training steps at nanoGPT's shakespeare GPU config and GPT-2 124M, every mode side by side.
TRAIN_LEFT=$((BUDGET_S - SECONDS - 150))
want train && step "gpu_train_bench.py" 260 140 "$PY" bench/gpu_train_bench.py --out "$TRAIN_MD" \
    --budget $((TRAIN_LEFT > 240 ? 230 : (TRAIN_LEFT > 40 ? TRAIN_LEFT - 20 : 20))) --cpu-ms "${GPU_CHECK_CPU_MS:-}"

# The same training on both devices (same weights and batches; dropout masks differ across devices),
# at the shakespeare config and at GPT-2 124M's shape with a small batch (the CPU side is the slow one).
DATA_ARGS=(--dataset=shakespeare_char --data_dir=/tmp/nanofast-data)
if [[ -f "$SHAKESPEARE" ]]; then DATA_ARGS+=(--data_path="$SHAKESPEARE"); else DATA_ARGS=(--dataset=readme \
    --data_path=README.md --data_dir=/tmp/nanofast-data); fi
# Hugging Face families patched on CUDA, where the caller brought transformers' wheels.
if want families; then
    if [[ -d .gpu_wheels ]]; then
        SOFT=1 step "pip install transformers (.gpu_wheels)" 90 120 "$PY" -m pip install -q --no-index \
            --find-links .gpu_wheels transformers
    fi
    step "pytest patch_transformers, triton_layers" 180 100 "$PY" -m pytest tests/test_patch_transformers.py \
        tests/test_triton_layers.py -q -rs -p no:cacheprovider --durations=5
fi

# Sampling with the key/value cache against without it and against Hugging Face's generate.
want sample && step "pytest sampling on CUDA" 60 130 "$PY" -m pytest tests/test_train_cuda.py -k sampling -q \
    -rs -p no:cacheprovider
want sample && SOFT=1 step "gpu_sample.py" 90 100 "$PY" bench/gpu_sample.py --out "$SAMPLE_MD"

want compare && step "nanofast-compare cpu cuda (shakespeare config)" 70 100 "$PY" -m nanofast.compare \
    config/train_shakespeare_char.py cpu:bfloat16 cuda:bfloat16 --iters=12 --batch_size=16 "${DATA_ARGS[@]}" \
    --out_dir="$OUT_DIR/compare-shakespeare"
want compare && step "nanofast-compare cpu cuda (GPT-2 124M shape)" 70 70 "$PY" -m nanofast.compare \
    config/train_shakespeare_char.py cpu:bfloat16 cuda:bfloat16 --iters=4 --n_layer=12 --n_head=12 --n_embd=768 \
    --block_size=1024 --batch_size=2 --dropout=0.0 "${DATA_ARGS[@]}" --out_dir="$OUT_DIR/compare-gpt2"
# A run started on the CPU, resumed on CUDA, against CUDA from scratch.
want compare && step "resume_check.py (CPU -> CUDA)" 70 40 "$PY" bench/resume_check.py --out "$RESUME_MD" --work /tmp/nanofast-resume \
    --batch_size=16 --dtype=bfloat16 "${DATA_ARGS[@]}"

# The ops tests that put CUDA tensors through the ops (the rest test the CPU kernels).
want ops && step "pytest ops tests (CUDA cases)" 90 30 "$PY" -m pytest tests/test_ops_add_layer_norm.py \
    tests/test_ops_linear_cross_entropy.py -k cuda -q -rs -p no:cacheprovider
want ops && SOFT=1 step "gpu_bench.py" 60 20 "$PY" bench/gpu_bench.py --out "$BENCH_MD"
# The Triton kernels' own tests compile every kernel variant: they get what time is left.
want kernels && step "pytest test_triton_kernels, layer_norm_extremes (Triton)" 300 5 \
    "$PY" -m pytest tests/test_triton_kernels.py "tests/test_layer_norm_extremes.py::test_size_one_triton" \
    "tests/test_layer_norm_extremes.py::test_overflowing_rows_triton" \
    "tests/test_layer_norm_extremes.py::test_triton_wide_row_sums_are_blocked" \
    -q -rs --maxfail=10 -p no:cacheprovider --durations=10

VERSIONS=$(timeout 30 "$PY" -c "
import sys, torch, triton
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__)
" 2>/dev/null || echo "unavailable (see gpu_check.log)")
{
    echo "# Last GPU check"
    echo
    echo "The output of bench/gpu_check.sh (written to \$OUT/gpu_last.md, default bench/results/; the copy in"
    echo "bench/gpu_last.md is the last run's)."
    echo
    echo "- command: \`GPU_CHECK_BUDGET_S=$BUDGET_S GPU_CHECK_ONLY=\"${ONLY:1:-1}\" bash bench/gpu_check.sh\`"
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
    echo "## Whole training steps (bench/gpu_train_bench.py)"
    echo
    if [[ -s "$TRAIN_MD" ]]; then cat "$TRAIN_MD"; else echo "(no table: see gpu_check.log)"; fi
    echo
    echo "## CPU versus CUDA (nanofast-compare; bench/resume_check.py)"
    echo
    for d in compare-shakespeare compare-gpt2; do
        echo "- $d: $(timeout 20 "$PY" -c "import json, sys; s = json.load(open(sys.argv[1]))['summary']
print('agree' if s['agree'] else 'DIFFER', '| max gap', s['max_gap'], '| max noise', s['max_noise'], '| ms/iter cpu',
      s['ms_per_iter_a'], '| ms/iter cuda', s['ms_per_iter_b'], '| cuda speedup', s['speedup_b_over_a'])" \
            "$OUT_DIR/$d/compare.json" 2>/dev/null || echo 'no compare.json: see gpu_check.log')"
    done
    echo
    if [[ -s "$RESUME_MD" ]]; then cat "$RESUME_MD"; else echo "(no resume table: see gpu_check.log)"; fi
    echo
    echo "## Sampling (bench/gpu_sample.py)"
    echo
    if [[ -s "$SAMPLE_MD" ]]; then cat "$SAMPLE_MD"; else echo "(no sampling table: see gpu_check.log)"; fi
    echo
    echo "## Kernel micro-benchmarks (bench/gpu_bench.py)"
    echo
    if [[ -s "$BENCH_MD" ]]; then cat "$BENCH_MD"; else echo "(no benchmark table: see gpu_check.log)"; fi
} >"$TABLE"
log "wrote $TABLE and $LOG"
cat "$TABLE"
exit $FAILED

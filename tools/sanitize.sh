#!/usr/bin/env bash
# Builds the C++ kernels with AddressSanitizer + UndefinedBehaviorSanitizer (-DNANOFAST_SANITIZE=ON)
# into a scratch folder and runs the CPU op tests against that build.
# Usage: tools/sanitize.sh [pytest arguments, default: the CPU op test files]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${NANOFAST_SANITIZE_DIR:-/tmp/nanofast-sanitize}
mkdir -p "$work/build" "$work/site"
cmake -S "$root" -B "$work/build" -G Ninja -DNANOFAST_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$work/build" >/dev/null
# An overlay package: the Python sources of this checkout plus the sanitized extension.
rm -rf "$work/site/nanofast"
cp -r "$root/python/nanofast" "$work/site/nanofast"
[ -d "$root/kernels" ] && cp -r "$root/kernels" "$work/site/nanofast/kernels"
rm -f "$work/site/nanofast"/_C*.so
cp "$work/build"/_C*.so "$work/site/nanofast/"
# An editable install of nanofast hooks imports ahead of PYTHONPATH: drop that hook in this process.
cat >"$work/site/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
PY
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cd "$root"
PYTHONPATH="$work/site" python3 -c "import nanofast._C as c; assert c.__file__.startswith('$work'), c.__file__"
if [ $# -eq 0 ]; then
  # every op's tests (a new op's file is picked up by its name), and the C++ the model and optimizer reach
  set -- tests/test_ops_*.py tests/test_dropout.py tests/test_optim.py tests/test_fused_block.py
fi
PYTHONPATH="$work/site" python3 -m pytest -q -p no:cacheprovider "$@"

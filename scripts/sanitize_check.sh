#!/usr/bin/env bash
# Builds the C++ extension with AddressSanitizer and UndefinedBehaviorSanitizer (DECOVAE_SANITIZE=1,
# CPU only) into a scratch folder, then runs the CPU kernel tests against that build from outside
# the source tree, once per kernel variant this CPU runs: odd sizes, far flows, strided inputs, the
# row rings, the buffer pool and the backward's packed partials. Any out-of-bounds access, use after
# free or undefined behaviour aborts the test run with the sanitizer's report.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$PWD"
PY="${PYTHON:-$SRC/.venv/bin/python}"
case "$PY" in /*) ;; *) PY="$SRC/$PY" ;; esac  # the tests run from the scratch folder
WORK="${SANITIZE_DIR:-/tmp/decovae_sanitize}"
mkdir -p "$WORK"
export DECOVAE_SANITIZE=1 DECOVAE_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}"
"$PY" setup.py -q build --build-base "$WORK/build" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
LIB="$(ls -d "$WORK"/build/lib*)"
ASAN="$(gcc -print-file-name=libasan.so)"
UBSAN="$(gcc -print-file-name=libubsan.so)"
cd "$WORK"
# the per-ISA tests (tests/conftest.py cpu_isa) run every kernel variant this CPU runs in turn
echo "== CPU kernel tests under ASan + UBSan"
PYTHONPATH="$LIB" LD_PRELOAD="$ASAN $UBSAN" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  "$PY" -m pytest -q -p no:cacheprovider --rootdir "$SRC" \
  "$SRC/tests/ops/test_warp_ops.py" "$SRC/tests/ops/test_causal_conv3d.py" "$SRC/tests/ops/test_ops_foundation.py" \
  "$SRC/tests/ops/test_kernel_invariance.py" \
  -k "not triton and not gpu and not memory and not cuda"
where="$(PYTHONPATH="$LIB" LD_PRELOAD="$ASAN $UBSAN" ASAN_OPTIONS=detect_leaks=0 "$PY" -c \
  'import decovae_fast._C as c; print(c.__file__)')"
case "$where" in "$LIB/"*) ;; *) echo "sanitize check: the extension came from $where, not the sanitized build"; exit 1;; esac
echo "sanitize check passed ($where)"

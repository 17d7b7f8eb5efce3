#!/usr/bin/env bash
# Builds a wheel (pip wheel --no-build-isolation --no-deps .), installs it into a fresh venv and,
# from outside the source tree, runs `decovae info` and the CPU kernel tests with every kernel
# variant this CPU runs forced in turn (DECOVAE_CPU_CAPABILITY). torch and the other dependencies
# are borrowed from .venv through a .pth file instead of being installed again (5 GB).
# DECOVAE_BUILD_CUDA=0 by default here: the CUDA part is built and tested by `make setup` / CI.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$PWD"
PY="${PYTHON:-$SRC/.venv/bin/python}"
WORK="$(mktemp -d /tmp/decovae_wheel.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export DECOVAE_BUILD_CUDA="${DECOVAE_BUILD_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .
python3 -m venv "$WORK/venv"
"$PY" -c "import site; print(site.getsitepackages()[0])" > "$("$WORK/venv/bin/python" -c "import site; print(site.getsitepackages()[0])")/borrowed_deps.pth"
"$WORK/venv/bin/python" -m pip install -q --no-deps "$WORK"/dist/decovae_fast-*.whl
cd "$WORK"
where="$("$WORK/venv/bin/python" -c 'import decovae_fast, os; print(os.path.dirname(decovae_fast.__file__))')"
case "$where" in "$WORK/venv/"*) ;; *) echo "wheel check: decovae_fast imported from $where, not the wheel"; exit 1;; esac
"$WORK/venv/bin/decovae" info
for isa in $("$WORK/venv/bin/python" -c 'from decovae_fast import _ext; print(*_ext.supported_cpu_capabilities())'); do
  echo "== CPU kernel tests, DECOVAE_CPU_CAPABILITY=$isa, package from $where"
  DECOVAE_CPU_CAPABILITY=$isa "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$SRC" \
    "$SRC/tests/ops/test_warp_ops.py" "$SRC/tests/ops/test_causal_conv3d.py" "$SRC/tests/ops/test_cpu_capability.py" \
    -k "isa_$isa and not triton and not gpu"
done
echo "wheel check passed"

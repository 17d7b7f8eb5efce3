#!/usr/bin/env bash
# Compiles every C++ source of the CPU extension for aarch64 (Debian's cross g++, installed with
# apt-get when missing), with the flags of setup.py less the x86 -march, against the installed
# torch's headers: what an ARM build gets is the portable kernels (kernels_avx2/avx512.cpp
# compile to the portable code there and are never chosen), so no x86 intrinsic may reach them.
# Compile only: there is no aarch64 libtorch here to link against, and no ARM CPU to run on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
CXX="${ARM_CXX:-aarch64-linux-gnu-g++}"
if ! command -v "$CXX" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing g++-aarch64-linux-gnu (Debian's cross compiler)"
    apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null || { apt-get update -qq >/dev/null && apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null; }
  else
    echo "arm check: $CXX not found and cannot install it (needs root and apt-get)"; exit 1
  fi
fi
read -r -a INCLUDES <<<"$("$PY" - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]))
PY
)"
OUT="$(mktemp -d /tmp/decovae_arm.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
SOURCES=(csrc/*.cpp csrc/cpu/*.cpp)
export CXX OUT FLAGS="-c -O2 -std=c++20 -fopenmp -fPIC -Wall -Icsrc ${INCLUDES[*]} -DDECOVAE_BUILD_MARCH=\"default\" -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C"
printf '%s\n' "${SOURCES[@]}" | xargs -P "${MAX_JOBS:-2}" -I{} sh -c 'echo "  {}"; $CXX $FLAGS {} -o "$OUT/$(basename {}).o"' \
  || { echo "arm check: a source failed to compile for aarch64"; exit 1; }
file "$OUT"/*.o | grep -vq "ARM aarch64" && { echo "arm check: an object is not aarch64"; file "$OUT"/*.o; exit 1; }
echo "arm check passed: ${#SOURCES[@]} sources compiled for aarch64 with $("$CXX" -dumpversion)"

#!/usr/bin/env bash
# Rebuilds decovae_fast/_C*.so in place (ninja: only changed sources recompile). A lock serialises
# builds started in parallel. DECOVAE_BUILD_CUDA=0 skips the CUDA sources for a quick CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
PY="${PYTHON:-.venv/bin/python}"
exec flock /tmp/decovae_build.lock "$PY" setup.py -q build_ext --inplace

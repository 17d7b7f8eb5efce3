"""Triton kernels, installed as decovae_fast.ops.triton.

TRITON_OPS maps an op name to a callable with the same positional signature as the matching
decovae_fast.ops.reference function, differentiable (autograd wired to the backward kernels).

COMPILE_SPECS lists (kernel, signature, constexprs) for every Triton kernel and dtype it is
launched with; each kernel module lists its own (its COMPILE_SPECS, gathered here), and
tests/ops/test_triton_compile.py compiles them
all for sm_90 without a GPU. Launchable kernels are named *_kernel (the test checks that each
has specs); @triton.jit helpers called from kernels are not.

When the extension is built, the Triton kernels also serve the CUDA key of torch.ops.decovae ops
that have no CUDA C++ kernel (so the "cuda" backend and torch.compile reach them).
Importing this package without triton installed leaves TRITON_OPS empty.
"""
from __future__ import annotations

TRITON_OPS: dict = {}
COMPILE_SPECS: list = []

try:
    import triton  # noqa: F401
except ImportError:  # no triton: the reference and C++ backends still work
    triton = None

if triton is not None:
    from . import warp

    COMPILE_SPECS.extend(warp.COMPILE_SPECS)
    TRITON_OPS["warp_residual"] = warp.warp_residual
    TRITON_OPS["warp_add"] = warp.warp_add


def _register_cuda_kernels() -> None:
    """Triton kernels as the CUDA-key kernels of the registered ops that have none in C++."""
    import torch

    from decovae_fast import _ext

    if triton is None or not _ext.cpu_compiled():
        return
    kernels = {
        "warp_residual": lambda volume, motion, frames: warp.warp_forward(volume, motion, frames, False),
        "warp_add": lambda volume, motion, residual: warp.warp_forward(volume, motion, residual, True),
        "warp_sample_backward": warp.warp_sample_backward,
    }
    for op, fn in kernels.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"decovae::{op}", "CUDA"):
            torch.library.register_kernel(f"decovae::{op}", "cuda", fn)


_register_cuda_kernels()

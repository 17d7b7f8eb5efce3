"""The CPU kernels' outputs are bit-identical whatever the thread count and whatever else shares
the batch (issue 20): each output element is computed by the same instructions in the same order
however the work is split. Odd sizes, both conv paths (Winograd for 3x3 stride 1, implicit GEMM
otherwise), fp32 and bf16, every compiled instruction set.

Not covered (and not bit-identical): the warp backward sums per-thread partial gradients, one per
thread (docs/ops.md), so training gradients differ in the last bits between thread counts."""
from __future__ import annotations

import pytest
import torch

import decovae_fast.ops as ops
from decovae_fast import _ext
from conftest import num_threads

pytestmark = [pytest.mark.skipif(not _ext.cpu_compiled(), reason="C++ extension not built"),
              pytest.mark.usefixtures("cpu_isa")]

THREADS = (1, 2, 3)
DTYPES = [torch.float32, torch.bfloat16]


def rnd(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_invariant(fn, batch_inputs, split=0):
    """fn(*inputs) with 1, 2 and 3 threads, and on item `split` alone: all the same bits."""
    outs = []
    for n in THREADS:
        with num_threads(n):
            outs.append(fn(*batch_inputs))
            outs.append(fn(*(x[split:split + 1] for x in batch_inputs)))
    ref = outs[0][split:split + 1]
    for i, out in enumerate(outs):
        item = out if out.shape[0] == 1 else out[split:split + 1]
        assert torch.equal(item, ref), f"run {i}: max diff {(item.float() - ref.float()).abs().max().item()}"
    for i in range(0, len(outs), 2):  # the whole batch, too
        assert torch.equal(outs[i], outs[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel,stride,size", [
    ((3, 3, 3), (1, 1, 1), (12, 12)),   # Winograd, the small frames where the work split used to move
    ((3, 3, 3), (1, 1, 1), (13, 27)),   # Winograd, odd sizes
    ((1, 3, 3), (1, 1, 1), (40, 8)),
    ((3, 3, 3), (1, 2, 2), (13, 11)),   # implicit GEMM (strided)
    ((1, 5, 5), (1, 1, 1), (9, 10)),    # implicit GEMM (5x5)
])
def test_causal_conv3d_same_bits_any_threads_any_batch(dtype, kernel, stride, size):
    g = torch.Generator().manual_seed(0)
    B, C, Cout, T = 5, 24, 16, 4
    kt = kernel[0]
    x = rnd(g, B, C, T, *size, dtype=dtype)
    cache = rnd(g, B, C, kt - 1, *size, dtype=dtype)
    w = rnd(g, Cout, C, *kernel, dtype=dtype, scale=(C * kernel[0] * kernel[1] * kernel[2]) ** -0.5)
    b, nw = rnd(g, Cout, dtype=dtype), rnd(g, C, dtype=dtype).abs() + 0.5

    def conv(x, cache):
        with torch.no_grad():
            return ops.causal_conv3d(x, w, b, stride, cache, norm_weight=nw, prologue_silu=True, epilogue_silu=True)[0]
    assert_invariant(conv, (x, cache), split=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gaussian_volume_and_warps_same_bits_any_threads_any_batch(dtype):
    g = torch.Generator().manual_seed(1)
    B, T, H, W = 5, 3, 37, 29
    frame = rnd(g, B, 3, H, W, dtype=dtype).clamp(-1, 1)
    frames = rnd(g, B, 3, T, H, W, dtype=dtype).clamp(-1, 1)
    motion = torch.cat([rnd(g, B, 2, T, H, W, scale=6.0), torch.rand(B, 1, T, H, W, generator=g) * 4], 1)
    with torch.no_grad():
        assert_invariant(lambda f: ops.gaussian_volume(f, 5, 1.0), (frame,), split=2)
        volume = ops.gaussian_volume(frame, 5, 1.0)
        assert_invariant(lambda v, m, f: ops.warp_residual(v, m, f), (volume, motion, frames), split=4)
        assert_invariant(lambda v, m, r: ops.warp_add(v, m, r), (volume, motion, frames), split=1)

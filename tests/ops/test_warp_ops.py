"""Scale-space warp (warp_residual / warp_add) and gaussian_volume kernels against the reference:
the C++ CPU kernels (torch.ops.decovae, CPU key) and the Triton kernels (TRITON_INTERPRET=1 on a
machine without a GPU), forward and every gradient."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import decovae_fast.ops as ops
from decovae_fast import _ext
from decovae_fast.ops import _backend
from decovae_fast.ops import reference as R
from conftest import EXTREME_IDS, EXTREMES, assert_close_relative, num_threads

# CPU tests run once per compiled instruction set (tests/ops/conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_isa")

needs_ext = pytest.mark.skipif(not _ext.cpu_compiled(), reason="C++ extension not built")

# Tolerances per dtype. Kernels and reference both compute in fp32 from the same (already rounded)
# inputs and round once at the end, so they differ by fp32 summation order (~1e-6 relative to the
# largest term) plus at most ~1 ulp of the output dtype where the two fp32 results straddle a
# rounding boundary: fp16 ulp = 2^-10 relative (9.8e-4), bf16 ulp = 2^-7 (7.8e-3). The atol is
# scaled by the largest magnitude of the expected tensor, since a gradient summed over many sample
# points carries absolute rounding error proportional to its size.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def make_inputs(shape, dtype, motion_dtype=None, *, far=False, reach=3.0, seed=0, device="cpu"):
    """volume (B,C,L+1,H,W), motion (B,3,T,H,W), frames (B,C,T,H,W).

    Flows are quantised to 1/4 px and offset by 1/8, so every sample coordinate is exactly
    representable in every dtype (kernel and reference see the same point) and lies strictly
    between grid points and borders (the derivative is one-sided on them). s spans beyond [0, L]
    on both sides; flows reach up to `reach` pixels, with far=True up to 3 images outside the frame.
    """
    B, C, T, D, H, W = shape
    g = torch.Generator().manual_seed(seed)
    volume = torch.randn(B, C, D, H, W, generator=g)
    frames = torch.randn(B, C, T, H, W, generator=g)
    reach = 3.0 * max(H, W) if far else reach
    uv = (torch.rand(B, 2, T, H, W, generator=g) * 2 - 1) * reach
    s = torch.rand(B, 1, T, H, W, generator=g) * (D - 1 + 3.0) - 1.5  # [-1.5, L + 1.5]
    motion = torch.floor(torch.cat([uv, s], 1) * 4) / 4 + 0.125
    motion_dtype = motion_dtype or dtype
    return (volume.to(device, dtype), motion.to(device, motion_dtype), frames.to(device, dtype))


SHAPES = {
    "T1_odd": (1, 3, 1, 6, 13, 17),   # T = 1, odd H and W, L = 5
    "batch": (2, 2, 3, 4, 8, 9),      # B > 1
    "L0": (1, 3, 2, 1, 9, 11),        # L = 0: plain bilinear warp
    "big": (1, 3, 2, 3, 37, 70),      # H*W = 2590: not a multiple of the Triton block (512)
    "H1": (1, 3, 2, 3, 1, 18),        # one image row: the CPU kernel's portable path
    "H2W1": (1, 2, 2, 3, 2, 1),       # smallest image the SIMD path takes; one column
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _grads(fn, volume, motion, frames, seed=1):
    """Output and gradients of sum(out * g) for a random g."""
    v, m, f = (t.detach().clone().requires_grad_() for t in (volume, motion, frames))
    out = fn(v, m, f)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    out.backward(g)
    return out, v.grad, m.grad, f.grad


def _compare(fn, ref_fn, inputs, dtype):
    got, want = _grads(fn, *inputs), _grads(ref_fn, *inputs)
    for name, a, b in zip(("output", "grad volume", "grad motion", "grad frames"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, dtype, name)


# ---- C++ CPU kernels -------------------------------------------------------------------------------

def _cpu(op):
    def run(*args):
        with ops.use_backend("cpu"):
            return getattr(ops, op)(*args)
    return run


@needs_ext
def test_cpu_backend_is_picked():
    for op in ("warp_residual", "warp_add", "gaussian_volume"):
        assert ops.implements("cpu", op)
        assert ops.backend_for(op, torch.device("cpu")) == "cpu"


@needs_ext
@pytest.mark.parametrize("op", ["warp_residual", "warp_add"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cpu_warp_matches_reference(op, dtype, shape):
    _compare(_cpu(op), getattr(R, op), make_inputs(shape, dtype), dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_warp_fp32_motion_beside_half_frames(dtype):
    inputs = make_inputs(SHAPES["T1_odd"], dtype, torch.float32)
    _compare(_cpu("warp_residual"), R.warp_residual, inputs, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_warp_far_flows(dtype):
    inputs = make_inputs((1, 2, 2, 4, 11, 13), dtype, far=True)
    assert (inputs[1][:, :2].abs() > 13).any()
    _compare(_cpu("warp_residual"), R.warp_residual, inputs, dtype)


# Magnitudes far from 1 (fp16 near its top and bottom, bf16 at 2^+-100): samples, residuals and
# every gradient sum run in fp32 from the rounded inputs, so nothing overflows or flushes where the
# reference does not; compared relative to each tensor's largest value, with TOL.


@needs_ext
@pytest.mark.parametrize("dtype,scale", EXTREMES, ids=EXTREME_IDS)
@pytest.mark.parametrize("op", ["warp_residual", "warp_add"])
def test_cpu_warp_extreme_magnitudes(dtype, scale, op):
    volume, motion, frames = make_inputs(SHAPES["big"], torch.float32)
    inputs = ((volume * scale).to(dtype), motion, (frames * scale).to(dtype))  # fp32 motion, as the model
    got, want = _grads(_cpu(op), *inputs), _grads(getattr(R, op), *inputs)
    for name, a, b in zip(("output", "grad volume", "grad motion", "grad frames"), got, want):
        assert_close_relative(a, b, TOL[dtype], f"{name} ({dtype})")


@needs_ext
@pytest.mark.parametrize("dtype,scale", EXTREMES, ids=EXTREME_IDS)
def test_cpu_gaussian_volume_extreme_magnitudes(dtype, scale):
    x = (torch.randn(2, 3, 29, 31, generator=torch.Generator().manual_seed(0)) * scale).to(dtype)
    got, want = (fn(x, 5, 1.0) for fn in (_cpu("gaussian_volume"), R.gaussian_volume))
    assert_close_relative(got, want, TOL[dtype], f"volume ({dtype})")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels", [0, 3])
@pytest.mark.parametrize("reach", [12.0, None], ids=["reach12", "far"])
def test_cpu_warp_flows_beyond_the_row_window(dtype, levels, reach):
    """The SIMD forward keeps the rows around the output row (y - 7 .. y + 8) packed; samples
    further away along y are packed one by one. Rows of 45 px, flows of up to 12 px (a mix of both
    in most 16-px blocks) or 3 images: both kinds of sample, in two batches, against the reference."""
    shape = (2, 3, 3, levels + 1, 45, 37)
    inputs = make_inputs(shape, dtype, far=reach is None, reach=reach or 0.0)
    v = inputs[1][:, 1].float()
    assert (v.abs() > 9).any() and (v.abs() < 7).any()
    for op in ("warp_residual", "warp_add"):
        got, want = _cpu(op)(*inputs), getattr(R, op)(*inputs)
        assert_close(got, want, dtype, op)


@needs_ext
@pytest.mark.parametrize("threads", [1, 3, 5])
def test_cpu_warp_forward_thread_chunks(threads):
    """The SIMD forward visits rows in (b, y, t) order, in one chunk per thread, and each chunk
    fills its own ring of volume rows. With B = 2 and H = 45, 3 or 5 threads start chunks in the
    middle of an image and of the second batch: every split gives the reference's result, and the
    same bits as one thread."""
    inputs = make_inputs((2, 3, 3, 4, 45, 37), torch.float32, reach=12.0)
    with num_threads(1):
        single = _cpu("warp_residual")(*inputs)
    with num_threads(threads):
        got = _cpu("warp_residual")(*inputs)
    assert_close(got, R.warp_residual(*inputs), torch.float32, "warp_residual")
    torch.testing.assert_close(got, single, rtol=0, atol=0)


def _last_level_cache_bytes() -> int:
    """As the kernel reads it: sysfs, 32 MiB if unknown."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            size = f.read().strip()
        return int(size[:-1]) << (20 if size.endswith("M") else 10)
    except (OSError, ValueError):
        return 32 << 20


@needs_ext
def test_cpu_warp_streamed_output():
    """An fp32 forward whose frames, motion and output exceed the last-level cache writes its output
    with non-temporal stores, for 16-value blocks that are whole and aligned. Rows of 264 px: a
    masked tail, and row starts that alternate between aligned and not."""
    dtype, H, W = torch.float32, 256, 264
    T = -(-3 * _last_level_cache_bytes() // (2 * H * W * 9 * dtype.itemsize))  # 1.5x the cache
    if T > 64:
        pytest.skip(f"a last-level cache of {_last_level_cache_bytes() >> 20} MiB needs too big an input")
    inputs = make_inputs((1, 3, T, 6, H, W), dtype)
    for op in ("warp_residual", "warp_add"):
        got, want = _cpu(op)(*inputs), getattr(R, op)(*inputs)
        assert_close(got, want, dtype, op)


@needs_ext
@pytest.mark.parametrize("levels", [0, 3])
def test_cpu_warp_exact_borders(levels):
    """Samples exactly on the last row, column and level (and beyond): the SIMD forward puts the
    lower corner one short of the border there, with weight 1 on the upper one."""
    B, C, T, H, W = 1, 3, 3, 9, 21
    g = torch.Generator().manual_seed(2)
    volume = torch.randn(B, C, levels + 1, H, W, generator=g)
    frames = torch.randn(B, C, T, H, W, generator=g)
    ys = torch.arange(H, dtype=torch.float32).view(H, 1).expand(H, W)
    xs = torch.arange(W, dtype=torch.float32).expand(H, W)
    motion = torch.stack([(W - 1) - xs, (H - 1) - ys, torch.full((H, W), float(levels))])  # exact corner
    motion = torch.stack([motion, motion + torch.tensor([2.0, 3.0, 1.5]).view(3, 1, 1), torch.zeros(3, H, W)], 1)
    motion = motion.unsqueeze(0)  # t = 0 on the border, t = 1 beyond it, t = 2 zero motion
    for op in ("warp_residual", "warp_add"):
        got = _cpu(op)(volume, motion, frames)
        want = getattr(R, op)(volume, motion, frames)
        assert_close(got, want, torch.float32, op)
    corner = volume[:, :, -1, -1, -1].view(B, C, 1, 1)
    torch.testing.assert_close(_cpu("warp_residual")(volume, motion, frames)[:, :, 0], frames[:, :, 0] - corner,
                               rtol=0, atol=0)


@needs_ext
def test_cpu_warp_concurrent_calls():
    """Pooled buffers kept between calls (the forward's row rings): calls from several threads at
    once (some get kept buffers, the others their own) and calls of growing size give the
    single-thread results."""
    import threading

    cases = [make_inputs((1, 3, 2, 6, 150 + 7 * i, 160), torch.float32, seed=i) for i in range(4)]
    want = [_cpu("warp_residual")(*c) for c in reversed(cases)][::-1]  # largest first, then smaller
    got = [None] * len(cases)

    def work(i):
        for _ in range(3):
            got[i] = torch.ops.decovae.warp_residual(*cases[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_ext
def test_cpu_warp_pooled_output_is_an_ordinary_tensor():
    """Outputs of 2 MiB or more live on pooled buffers; they must still grow, share and save."""
    import io

    volume, motion, frames = make_inputs((1, 3, 4, 3, 200, 300), torch.float32)
    with ops.use_backend("cpu"):
        out = ops.warp_residual(volume, motion, frames)
    assert out.nbytes >= 2**21 and out.untyped_storage().resizable()
    want = out.clone()
    out.resize_(2, *out.shape[1:])  # moves to new memory; the pooled buffer goes back to the pool
    assert torch.equal(out[:1], want)
    with ops.use_backend("cpu"):
        again = ops.warp_residual(volume, motion, frames)  # may reuse that buffer
    assert torch.equal(again, want) and torch.equal(out[:1], want)
    again.share_memory_()
    buf = io.BytesIO()
    torch.save(again, buf)
    buf.seek(0)
    assert again.is_shared() and torch.equal(torch.load(buf), want)


def _run_python(code: str) -> str:
    """Runs code in a fresh interpreter; its stdout (a failure shows its stderr)."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@needs_ext
def test_cpu_warp_pooled_output_outlives_the_library():
    """Outputs on pooled buffers that are still alive at interpreter exit are freed after the
    extension's static destructors have run: the process must still exit cleanly."""
    code = ("import torch, decovae_fast.ops as ops\n"
            "v = torch.rand(1, 3, 3, 200, 300); m = torch.zeros(1, 3, 4, 200, 300); f = torch.rand(1, 3, 4, 200, 300)\n"
            "with ops.use_backend('cpu'):\n"
            "    KEEP = [ops.warp_residual(v, m, f) for _ in range(3)]\n"
            "assert torch.equal(KEEP[0], KEEP[2])\n")
    _run_python(code)


@needs_ext
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_warp_forward_memory_stays_near_the_output():
    """The forward's working memory beyond its output is a few packed volume rows per thread, not
    a packed copy of the volume (at 1080p with L = 5 that copy is 190 MiB, and the output of one
    frame 24 MiB). Measured in a fresh process: the peak RSS of the call (Linux's VmHWM, reset just
    before it) minus the RSS before it."""
    code = ("import torch, decovae_fast.ops as ops\n"
            "def kib(key):\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
            "torch.set_num_threads(2)\n"
            "v = torch.rand(1, 3, 6, 1080, 1920); m = torch.rand(1, 3, 1, 1080, 1920) * 4 - 2\n"
            "f = torch.rand(1, 3, 1, 1080, 1920)\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"  # VmHWM := VmRSS
            "before = kib('VmRSS:')\n"
            "with ops.use_backend('cpu'):\n"
            "    out = ops.warp_residual(v, m, f)\n"
            "print((kib('VmHWM:') - before) / 1024 - out.numel() * 4 / 2**20)\n")
    extra_mib = float(_run_python(code).split()[-1])
    assert extra_mib < 48, f"the forward held {extra_mib:.0f} MiB beyond its output"


@needs_ext
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_warp_backward_memory_follows_the_budget(monkeypatch):
    """The backward keeps one fp32 partial volume gradient per chunk of rows, packed as (B, L+1, H,
    W+1, 4) (csrc/cpu/warp_backward.h), and the volume packed the same way for the motion gradient:
    with 4 threads and 540x960, L = 5 (51 MiB each), four partials by default, one under a 40 MiB
    budget. Peak RSS of the call in a fresh process, less its two gradients."""
    code = ("import torch\n"
            "import decovae_fast.ops\n"
            "def kib(key):\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
            "torch.set_num_threads(4)\n"
            "v = torch.rand(1, 3, 6, 540, 960); m = torch.rand(1, 3, 1, 540, 960) * 4 - 2\n"
            "g = torch.rand(1, 3, 1, 540, 960)\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"  # VmHWM := VmRSS
            "before = kib('VmRSS:')\n"
            "gv, gm = torch.ops.decovae.warp_sample_backward(g, v, m, True, True)\n"
            "print((kib('VmHWM:') - before) / 1024 - (gv.numel() + gm.numel()) * 4 / 2**20)\n")
    part_mib = 4 * 6 * 540 * 961 * 4 / 2**20
    default = float(_run_python(code).split()[-1])
    monkeypatch.setenv("DECOVAE_WARP_GRAD_MIB", "40")
    capped = float(_run_python(code).split()[-1])
    assert default > 4.5 * part_mib, f"4 threads held {default:.0f} MiB, not 4 partials + the packed volume of {part_mib:.0f}"
    assert capped < 2.5 * part_mib, f"a 40 MiB budget held {capped:.0f} MiB, more than 1 partial + the packed volume"


def _non_contiguous(volume, motion, frames):
    """Same values, strided storage: volume and frames transposed in memory, motion sliced."""
    v = volume.transpose(3, 4).contiguous().transpose(3, 4)
    f = frames.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    m = torch.stack([motion, motion], dim=-1)[..., 0]
    assert not (v.is_contiguous() or f.is_contiguous() or m.is_contiguous())
    return v, m, f


@needs_ext
def test_cpu_warp_non_contiguous():
    inputs = make_inputs(SHAPES["batch"], torch.float32)
    _compare(_cpu("warp_residual"), R.warp_residual, _non_contiguous(*inputs), torch.float32)
    _compare(_cpu("warp_add"), R.warp_add, _non_contiguous(*inputs), torch.float32)


@needs_ext
@pytest.mark.parametrize("op", ["warp_residual", "warp_add"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 3, 5, 6), (1, 1, 1, 1, 4, 3)], ids=["L2", "L0"])
def test_cpu_warp_gradcheck_fp64(op, shape):
    inputs = [t.requires_grad_() for t in make_inputs(shape, torch.float64)]
    assert torch.autograd.gradcheck(getattr(torch.ops.decovae, op), inputs)


@needs_ext
def test_cpu_backward_deterministic_and_partial():
    volume, motion, frames = make_inputs((1, 3, 5, 4, 20, 23), torch.float32)
    g = torch.randn_like(frames)
    bw = torch.ops.decovae.warp_sample_backward
    gv1, gm1 = bw(g, volume, motion, True, True)
    gv2, gm2 = bw(g, volume, motion, True, True)
    assert torch.equal(gv1, gv2) and torch.equal(gm1, gm2)
    gv, gm = bw(g, volume, motion, True, False)
    assert torch.equal(gv, gv1) and not gm.any()
    gv, gm = bw(g, volume, motion, False, True)
    assert torch.equal(gm, gm1) and not gv.any()


@needs_ext
def test_cpu_backward_grad_budget(monkeypatch):
    """DECOVAE_WARP_GRAD_MIB caps the backward's partial volume gradients: a budget below one
    partial leaves one chunk, which gives the one-thread bits with 3 threads; a malformed value is
    an error that names the variable."""
    volume, motion, frames = make_inputs((2, 3, 5, 4, 20, 23), torch.float32)
    g = torch.randn_like(frames)
    bw = torch.ops.decovae.warp_sample_backward
    with num_threads(1):
        single = bw(g, volume, motion, True, True)
    with num_threads(3):
        three = bw(g, volume, motion, True, True)
        monkeypatch.setenv("DECOVAE_WARP_GRAD_MIB", "0")
        capped = bw(g, volume, motion, True, True)
        monkeypatch.setenv("DECOVAE_WARP_GRAD_MIB", "lots")
        with pytest.raises(RuntimeError, match="DECOVAE_WARP_GRAD_MIB"):
            bw(g, volume, motion, True, True)
    assert all(torch.equal(a, b) for a, b in zip(capped, single))
    assert not torch.equal(three[0], single[0])  # 3 chunks sum in another order: the cap did something
    for a, b in zip(three, single):
        assert_close(a, b, torch.float32, "3 chunks against 1")


@needs_ext
def test_cpu_warp_bad_inputs_raise():
    volume, motion, frames = make_inputs((1, 3, 2, 3, 6, 7), torch.float32)
    with pytest.raises(RuntimeError, match="motion"):
        torch.ops.decovae.warp_residual(volume, motion[:, :2], frames)
    with pytest.raises(RuntimeError, match="volume"):
        torch.ops.decovae.warp_add(volume[..., :5], motion, frames)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.decovae.warp_residual(volume.double(), motion, frames)
    # NaN / inf flows must not index outside the volume: they sample a border pixel.
    bad = motion.clone()
    bad[0, 0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    out = torch.ops.decovae.warp_residual(volume, bad, frames)
    assert torch.isfinite(out).all()


@needs_ext
@pytest.mark.parametrize("op", ["warp_residual", "warp_add"])
def test_opcheck_warp(op):
    volume, motion, frames = make_inputs((1, 2, 2, 3, 5, 6), torch.float32)
    torch.library.opcheck(getattr(torch.ops.decovae, op),
                          (volume.requires_grad_(), motion.requires_grad_(), frames.requires_grad_()))


@needs_ext
def test_opcheck_warp_sample_backward():
    volume, motion, frames = make_inputs((1, 2, 2, 3, 5, 6), torch.float32)
    torch.library.opcheck(torch.ops.decovae.warp_sample_backward, (frames, volume, motion, True, True))


# ---- gaussian_volume (C++) -------------------------------------------------------------------------

GV_SHAPES = {"odd": (1, 3, 13, 17), "tiny": (2, 1, 1, 1), "thin": (1, 2, 3, 40), "square": (1, 1, 32, 32)}


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GV_SHAPES.values(), ids=GV_SHAPES.keys())
@pytest.mark.parametrize("levels,sigma0", [(5, 1.0), (2, 0.7), (0, 1.0)])
def test_cpu_gaussian_volume_matches_reference(dtype, shape, levels, sigma0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)

    def grads(fn):
        xr = x.clone().requires_grad_()
        out = fn(xr, levels, sigma0)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        return out, xr.grad

    for name, a, b in zip(("volume", "grad x0"), grads(_cpu("gaussian_volume")), grads(R.gaussian_volume)):
        assert a.dtype == b.dtype
        assert_close(a, b, dtype, name)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 2, 7, 9), (1, 1, 2, 3)])
def test_cpu_gaussian_volume_gradcheck_fp64(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.decovae.gaussian_volume(t, 3, 0.8), (x,))


@needs_ext
def test_opcheck_gaussian_volume():
    x = torch.randn(1, 2, 9, 11)
    torch.library.opcheck(torch.ops.decovae.gaussian_volume, (x.requires_grad_(), 3, 1.0))
    torch.library.opcheck(torch.ops.decovae.gaussian_volume_backward, (torch.randn(1, 2, 4, 9, 11), 3, 1.0))


# ---- Triton kernels --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def triton_warp():
    """decovae_fast.ops.triton.warp runnable here: on the GPU if there is one, else under
    TRITON_INTERPRET=1. triton.jit picks interpreter or compiler when a kernel is defined, so a
    module imported earlier in this process without the variable is reloaded."""
    pytest.importorskip("triton")
    from decovae_fast.ops.triton import warp
    from triton.runtime.interpreter import InterpretedFunction

    if torch.cuda.is_available():
        yield warp, "cuda"
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        if not isinstance(warp.warp_forward_kernel, InterpretedFunction):
            n_specs = len(warp.COMPILE_SPECS)
            warp = importlib.reload(warp)
            del warp.COMPILE_SPECS[n_specs:]  # the reload appended its specs again
        _backend._availability.cache_clear()
        yield warp, "cpu"
    _backend._availability.cache_clear()


TRITON_CASES = {
    "T1_odd_fp32": (SHAPES["T1_odd"], torch.float32, None),
    "L0_fp16": (SHAPES["L0"], torch.float16, None),
    "big_bf16_fp32motion": (SHAPES["big"], torch.bfloat16, torch.float32),
    "batch_bf16": (SHAPES["batch"], torch.bfloat16, None),
    "batch_fp16_fp32motion": (SHAPES["batch"], torch.float16, torch.float32),
    "big_fp32": (SHAPES["big"], torch.float32, None),
}


@pytest.mark.parametrize("op", ["warp_residual", "warp_add"])
@pytest.mark.parametrize("case", TRITON_CASES.values(), ids=TRITON_CASES.keys())
def test_triton_warp_matches_reference(triton_warp, op, case):
    warp, device = triton_warp
    shape, dtype, motion_dtype = case
    _compare(getattr(warp, op), getattr(R, op), make_inputs(shape, dtype, motion_dtype, device=device), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_warp_far_flows_non_contiguous(triton_warp, dtype):
    warp, device = triton_warp
    inputs = _non_contiguous(*make_inputs((1, 2, 2, 4, 11, 13), dtype, far=True, device=device))
    _compare(warp.warp_residual, R.warp_residual, inputs, dtype)


def test_triton_ops_table_and_backend(triton_warp):
    warp, device = triton_warp
    from decovae_fast.ops.triton import TRITON_OPS

    assert {"warp_residual", "warp_add"} <= set(TRITON_OPS)
    volume, motion, frames = make_inputs(SHAPES["T1_odd"], torch.float32, device=device)
    with ops.use_backend("triton"):
        assert ops.backend_for("warp_residual", volume.device) == "triton"
        got = ops.warp_residual(volume, motion, frames)
    assert_close(got, R.warp_residual(volume, motion, frames), torch.float32, "warp_residual via backend")


def test_triton_sample_backward_flags(triton_warp):
    warp, device = triton_warp
    volume, motion, frames = make_inputs(SHAPES["batch"], torch.float32, device=device)
    g = torch.randn_like(frames)
    gv, gm = warp.warp_sample_backward(g, volume, motion, True, True)
    gv_only, gm_zero = warp.warp_sample_backward(g, volume, motion, True, False)
    gv_zero, gm_only = warp.warp_sample_backward(g, volume, motion, False, True)
    assert not gm_zero.any() and not gv_zero.any()
    assert_close(gv_only, gv, torch.float32, "grad volume")  # atomics: order may differ
    assert torch.equal(gm_only, gm)

"""causal_conv3d C++ kernels (csrc/cpu, csrc/cuda) against the reference sequence
(decovae_fast/ops/reference.py): dtypes, kernel sizes, strides, odd sizes, T = 1, every prologue /
epilogue option, chunked streaming, non-contiguous inputs, gradients and opcheck.

Tolerances (outputs are O(1): weights are scaled by 1/sqrt(fan_in)):
- fp32: the CPU fast path is Winograd F(4x4, 3x3), whose transforms (coefficients up to 8 and
  1/24) add a few fp32 ulps per term: max error ~1e-6..1e-5 at these sizes, so 1e-4.
- fp16: both sides compute in fp32 and round the output once; they may differ by one fp16 ulp of
  the output (2^-10 relative) plus the fp32 error: 2e-3. On the GPU the activations (after the
  prologue) are also rounded to fp16 before the tensor-core MMA: still within 2 ulps.
- bf16: same reasoning with bf16's 2^-7 ulp: 1.6e-2 (2 ulps), on the GPU 3e-2.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import decovae_fast.ops as ops
from decovae_fast import _ext
from decovae_fast.ops import reference
from conftest import EXTREME_IDS, EXTREMES, assert_close_relative, num_threads

# CPU tests run once per compiled instruction set (tests/ops/conftest.py)
pytestmark = [pytest.mark.skipif(not _ext.cpu_compiled(), reason="C++ extension not built"),
              pytest.mark.usefixtures("cpu_isa")]

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
# GPU fp32 runs cuDNN on both sides, possibly with TF32 (10-bit mantissa) and different algorithms.
GPU_TOL = {torch.float32: 2e-3, torch.float16: 3e-3, torch.bfloat16: 3e-2}
OPTIONS = {  # name -> (norm, prologue_silu, epilogue_silu, residual, bias)
    "plain": (False, False, False, False, False),
    "bias": (False, False, False, False, True),
    "norm": (True, False, False, False, True),
    "norm_silu": (True, True, False, False, True),
    "silu_only": (False, True, False, False, False),
    "epi_silu": (False, False, True, False, True),
    "residual": (False, False, False, True, False),
    "all": (True, True, True, True, True),
}


def make_inputs(B=2, C=6, Cout=5, T=5, H=7, W=9, kernel=(3, 3, 3), stride=(1, 1, 1), cache=True,
                options="all", dtype=torch.float32, device="cpu", seed=0):
    norm, _, _, res, bias = OPTIONS[options]
    g = torch.Generator().manual_seed(seed)
    kt, kh, kw = kernel

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    To, Ho, Wo = ((T - 1) // stride[0] + 1, (H - 1) // stride[1] + 1, (W - 1) // stride[2] + 1)
    return dict(
        x=rnd(B, C, T, H, W),
        weight=rnd(Cout, C, kt, kh, kw, scale=(C * kt * kh * kw) ** -0.5),
        bias=rnd(Cout) if bias else None,
        stride=stride,
        cache=rnd(B, C, kt - 1, H, W) if cache else None,
        norm_weight=(rnd(C).abs() + 0.5) if norm else None,
        residual=rnd(B, Cout, To, Ho, Wo) if res else None,
    )


def run(backend, inp, options="all"):
    _, pro, epi, _, _ = OPTIONS[options]
    with ops.use_backend(backend):
        return ops.causal_conv3d(inp["x"], inp["weight"], inp["bias"], inp["stride"], inp["cache"],
                                 norm_weight=inp["norm_weight"], prologue_silu=pro, epilogue_silu=epi,
                                 residual=inp["residual"])


def grads(backend, inp, options="all", upstream_seed=None):
    """Gradients of every tensor argument of `run` on one backend: of sum(y) in fp32, or of
    sum(y * g) for a random g drawn with upstream_seed."""
    args = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    y, _ = run(backend, args, options)
    if upstream_seed is None:
        y.float().sum().backward()
    else:
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(upstream_seed))).sum().backward()
    return {k: args[k].grad for k in ARG_NAMES if isinstance(args[k], torch.Tensor)}


def assert_matches(got, want, tol):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


def check_against_reference(device, tol_table, **kw):
    options = kw.get("options", "all")
    inp = make_inputs(device=device, **kw)
    backend = "cpu" if device == "cpu" else "cuda"
    y, cache = run(backend, inp, options)
    y_ref, cache_ref = run("reference", inp, options)
    assert_matches(y, y_ref, tol_table[inp["x"].dtype])
    assert torch.equal(cache, cache_ref)  # the cache is a copy of raw frames: exact
    assert y.is_contiguous() and cache.is_contiguous()
    return y


def test_cpu_backend_is_selected():
    assert ops.implements("cpu", "causal_conv3d")
    assert ops.backend_for("causal_conv3d", torch.device("cpu")) == "cpu"


# ---- forward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_forward_options_dtypes(dtype, options):
    check_against_reference("cpu", TOL, dtype=dtype, options=options)


@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1), (1, 3, 3), (2, 3, 5)])
@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("cache", [False, True])
def test_forward_kernels_strides(kernel, stride, cache):
    for options in ("plain", "all"):
        check_against_reference("cpu", TOL, kernel=kernel, stride=stride, cache=cache, options=options)


@pytest.mark.parametrize("T,H,W", [(1, 7, 9), (1, 1, 1), (2, 1, 6), (3, 4, 4), (4, 5, 13), (2, 17, 3)])
def test_forward_odd_sizes(T, H, W):
    for cache in (False, True):
        check_against_reference("cpu", TOL, T=T, H=H, W=W, cache=cache)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_forward_work_split(threads):
    """The fast path splits tile rows into units (by frame size; the threads share them out):
    every thread count must agree, including a last unit with padding rows (H=17: 5 tile rows) and
    several units per image. tests/ops/test_kernel_invariance.py asks for the same bits."""
    with num_threads(threads):
        for B, H, W in ((1, 17, 20), (1, 40, 64), (3, 9, 9)):
            check_against_reference("cpu", TOL, B=B, C=9, Cout=11, T=3, H=H, W=W)


def test_forward_larger_channels():
    """Decoder-like channel count: a longer GEMM K must stay within the fp32 tolerance."""
    check_against_reference("cpu", {torch.float32: 2e-4}, B=1, C=64, Cout=64, T=3, H=12, W=12)


def test_forward_kt1_no_history():
    y = check_against_reference("cpu", TOL, kernel=(1, 3, 3), cache=False)
    assert y.shape[2] == 5


def test_forward_non_contiguous():
    base = make_inputs(C=6, Cout=5, T=5, H=7, W=9)
    inp = dict(base)
    # x and cache as channels-last views, residual and weight as strided views of bigger tensors.
    inp["x"] = base["x"].to(memory_format=torch.channels_last_3d)
    inp["cache"] = base["cache"].transpose(3, 4).contiguous().transpose(3, 4)
    big_res = torch.zeros(*base["residual"].shape[:4], 2 * base["residual"].shape[4])
    big_res[..., ::2] = base["residual"]
    inp["residual"] = big_res[..., ::2]
    inp["weight"] = base["weight"].permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)
    assert not inp["x"].is_contiguous() and not inp["residual"].is_contiguous()
    assert not inp["cache"].is_contiguous() and not inp["weight"].is_contiguous()
    y, c = run("cpu", inp)
    y_ref, c_ref = run("reference", base)
    assert_matches(y, y_ref, TOL[torch.float32])
    assert torch.equal(c, c_ref)


# Magnitudes far from 1 (fp16 near its top and bottom, bf16 at 2^+-100): the Winograd transforms
# (coefficients up to 8), the RMSNorm squares and every sum run in fp32, so nothing overflows or
# flushes where the reference does not; compared relative to the largest output, with TOL.


def scaled_inputs(dtype, scale, **kw):
    inp = make_inputs(dtype=torch.float64, **kw)
    for k in ("x", "cache", "residual", "bias"):
        if inp[k] is not None:
            inp[k] = inp[k] * scale
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


@pytest.mark.parametrize("dtype,scale", EXTREMES, ids=EXTREME_IDS)
@pytest.mark.parametrize("options", ["plain", "norm_silu", "all"])
@pytest.mark.parametrize("kernel,stride", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (1, 2, 2))])
def test_forward_extreme_magnitudes(dtype, scale, options, kernel, stride):
    inp = scaled_inputs(dtype, scale, C=16, Cout=8, H=13, W=11, kernel=kernel, stride=stride, options=options)
    y, _ = run("cpu", inp, options)
    y_ref, _ = run("reference", inp, options)
    assert_close_relative(y, y_ref, TOL[dtype], f"y ({dtype})")


@pytest.mark.parametrize("scale", [2.0 ** 60, 2.0 ** -60])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_grads_bf16_extreme_magnitudes(scale, options):
    inp = scaled_inputs(torch.bfloat16, scale, B=1, C=4, Cout=3, T=3, H=5, W=5, options=options)
    got, want = (grads(b, inp, options, upstream_seed=2) for b in ("cpu", "reference"))
    for k in got:
        assert_close_relative(got[k], want[k], 3e-2, k)


# ---- streaming ---------------------------------------------------------------------------------

def stream(backend, inp, chunk, options="all"):
    _, pro, epi, _, _ = OPTIONS[options]
    st = inp["stride"][0]
    cache, ys = inp["cache"], []
    for t0 in range(0, inp["x"].shape[2], chunk):
        x = inp["x"][:, :, t0:t0 + chunk]
        res = inp["residual"][:, :, t0 // st:(t0 + x.shape[2] - 1) // st + 1] if inp["residual"] is not None else None
        with ops.use_backend(backend):
            y, cache = ops.causal_conv3d(x, inp["weight"], inp["bias"], inp["stride"], cache,
                                         norm_weight=inp["norm_weight"], prologue_silu=pro, epilogue_silu=epi,
                                         residual=res)
        ys.append(y)
    return torch.cat(ys, 2), cache


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("start_cache", [False, True])
@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1)])
def test_streaming_equals_whole(chunk, start_cache, kernel):
    inp = make_inputs(T=7, kernel=kernel, cache=start_cache)
    y_whole, c_whole = run("cpu", inp)
    y, c = stream("cpu", inp, chunk)
    torch.testing.assert_close(y, y_whole, atol=1e-6, rtol=1e-6)
    assert torch.equal(c, c_whole)
    assert_matches(y, run("reference", inp)[0], TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_temporal_stride(dtype):
    inp = make_inputs(T=8, stride=(2, 1, 1), cache=False, dtype=dtype)
    y_whole, c_whole = run("cpu", inp)
    y, c = stream("cpu", inp, 2)
    torch.testing.assert_close(y.float(), y_whole.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(c, c_whole)


# ---- gradients ---------------------------------------------------------------------------------

def op_fn(options, stride):
    _, pro, epi, _, _ = OPTIONS[options]

    def f(x, weight, bias, cache, norm_weight, residual):
        with ops.use_backend("cpu"):
            return ops.causal_conv3d(x, weight, bias, stride, cache, norm_weight=norm_weight, prologue_silu=pro,
                                     epilogue_silu=epi, residual=residual)[0]
    return f


ARG_NAMES = ("x", "weight", "bias", "cache", "norm_weight", "residual")


@pytest.mark.parametrize("options,kernel,stride", [("all", (3, 3, 3), (1, 1, 1)), ("plain", (3, 3, 3), (1, 1, 1)),
                                                   ("norm", (3, 3, 3), (2, 2, 1)), ("all", (1, 3, 3), (1, 1, 1)),
                                                   ("all", (3, 1, 1), (1, 1, 1))])
def test_gradcheck_fp64(options, kernel, stride):
    inp = make_inputs(B=1, C=3, Cout=2, T=3, H=3, W=4, kernel=kernel, stride=stride, options=options,
                      dtype=torch.float64)
    args = [inp[k].requires_grad_() if inp[k] is not None else None for k in ARG_NAMES]
    assert torch.autograd.gradcheck(op_fn(options, stride), args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", ["all", "norm_silu", "epi_silu", "plain"])
@pytest.mark.parametrize("kernel,stride,cache", [((3, 3, 3), (1, 1, 1), True), ((3, 3, 3), (1, 1, 1), False),
                                                 ((3, 3, 3), (2, 2, 2), True), ((3, 1, 1), (1, 1, 1), True),
                                                 ((1, 3, 3), (1, 2, 2), False)])
def test_grads_match_reference_fp32(options, kernel, stride, cache):
    inp = make_inputs(B=2, C=5, Cout=4, T=5, H=7, W=6, kernel=kernel, stride=stride, cache=cache, options=options)
    got, want = (grads(b, inp, options, upstream_seed=1) for b in ("cpu", "reference"))
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4, msg=k)


def test_grads_bf16():
    inp = make_inputs(B=1, C=4, Cout=3, T=3, H=5, W=5, dtype=torch.bfloat16)
    got, want = (grads(b, inp) for b in ("cpu", "reference"))
    for k in ARG_NAMES:
        assert got[k].dtype == torch.bfloat16
        # Both compute in fp32; the grads are rounded to bf16 once (sums over many terms: 2 ulps).
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=3e-2, rtol=3e-2, msg=k)


def test_backward_output_mask():
    inp = make_inputs(B=1, C=3, Cout=2, T=2, H=4, W=4)
    op = torch.ops.decovae.causal_conv3d_backward
    gy = torch.randn(1, 2, 2, 4, 4)
    args = (gy, inp["x"], inp["weight"], inp["bias"], [1, 1, 1], inp["cache"], inp["norm_weight"], 1e-6, True, True)
    full = op(*args, [True] * 5)
    assert all(t is not None for t in full)
    for i in range(5):
        mask = [j == i for j in range(5)]
        part = op(*args, mask)
        for j in range(5):
            if j == i:
                torch.testing.assert_close(part[j], full[j], atol=0, rtol=0)
            else:
                assert part[j] is None


def test_opcheck():
    for options, cache in (("all", True), ("plain", False)):
        inp = make_inputs(B=1, C=3, Cout=2, T=3, H=5, W=4, cache=cache, options=options)
        _, pro, epi, _, _ = OPTIONS[options]
        args = [inp[k].requires_grad_() if inp[k] is not None else None for k in ("x", "weight", "bias")]
        args += [list(inp["stride"]), inp["cache"].requires_grad_() if inp["cache"] is not None else None,
                 inp["norm_weight"].requires_grad_() if inp["norm_weight"] is not None else None, 1e-6, pro, epi,
                 inp["residual"].requires_grad_() if inp["residual"] is not None else None]
        torch.library.opcheck(torch.ops.decovae.causal_conv3d.default, args)
    gy = torch.randn(1, 2, 3, 5, 4)
    inp = make_inputs(B=1, C=3, Cout=2, T=3, H=5, W=4)
    torch.library.opcheck(torch.ops.decovae.causal_conv3d_backward.default,
                          (gy, inp["x"], inp["weight"], inp["bias"], [1, 1, 1], inp["cache"], inp["norm_weight"],
                           1e-6, True, True, [True, True, False, True, True]))


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    inp = make_inputs(B=1, C=3, Cout=2, T=3, H=5, W=4)
    op = torch.ops.decovae.causal_conv3d
    base = [inp["x"], inp["weight"], inp["bias"], [1, 1, 1], inp["cache"], inp["norm_weight"], 1e-6, False, False,
            inp["residual"]]
    bad = {
        1: (torch.randn(2, 4, 3, 3, 3), "input channels"),
        2: (torch.randn(3), "bias"),
        3: ([1, 0, 1], "stride"),
        4: (torch.randn(1, 3, 1, 5, 4), "cache"),
        5: (torch.randn(4), "norm_weight"),
        9: (torch.randn(1, 2, 3, 5, 5), "residual"),
    }
    for i, (value, name) in bad.items():
        args = list(base)
        args[i] = value
        with pytest.raises(RuntimeError, match=name):
            op(*args)
    with pytest.raises(RuntimeError, match="weight"):
        op(inp["x"], torch.randn(2, 3, 3, 2, 3), *base[2:])


# ---- GPU ---------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.cuda_compiled()),
                         reason="needs a CUDA device and the CUDA kernels")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_gpu_forward_options_dtypes(dtype, options):
    check_against_reference("cuda", GPU_TOL, dtype=dtype, options=options)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,stride,cache",
                         list(itertools.product([(3, 3, 3), (3, 1, 1), (1, 3, 3)],
                                                [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 2)], [False, True])))
def test_gpu_forward_kernels_strides(dtype, kernel, stride, cache):
    check_against_reference("cuda", GPU_TOL, dtype=dtype, kernel=kernel, stride=stride, cache=cache)


@gpu
@pytest.mark.parametrize("T,H,W,C,Cout", [(1, 7, 9, 6, 5), (1, 1, 1, 3, 2), (4, 5, 13, 70, 130), (9, 33, 31, 64, 64)])
def test_gpu_forward_odd_sizes(T, H, W, C, Cout):
    for dtype in (torch.float16, torch.bfloat16):
        check_against_reference("cuda", GPU_TOL, T=T, H=H, W=W, C=C, Cout=Cout, dtype=dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_gpu_streaming_equals_whole(dtype, chunk):
    inp = make_inputs(T=7, dtype=dtype, device="cuda")
    y_whole, c_whole = run("cuda", inp)
    y, c = stream("cuda", inp, chunk)
    torch.testing.assert_close(y.float(), y_whole.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(c, c_whole)


@gpu
def test_gpu_non_contiguous():
    inp = make_inputs(device="cuda", dtype=torch.bfloat16)
    y_ref, _ = run("reference", inp)
    inp["x"] = inp["x"].to(memory_format=torch.channels_last_3d)
    y, _ = run("cuda", inp)
    assert_matches(y, y_ref, GPU_TOL[torch.bfloat16])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_grads_match_reference(dtype):
    inp = make_inputs(B=2, C=5, Cout=4, T=5, H=7, W=6, device="cuda", dtype=dtype)
    got, want = (grads(b, inp) for b in ("cuda", "reference"))
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for k in ARG_NAMES:
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=tol, rtol=tol, msg=k)

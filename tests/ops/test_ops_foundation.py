"""The op contract itself: the reference oracle's math, registration, dispatch and bad use.
Kernel-vs-reference tests live beside each kernel (test_warp_ops.py, test_causal_conv3d.py)."""
import pytest
import torch
import torch.nn.functional as F

from decovae_fast import _ext, ops
from decovae_fast.ops import reference as R

OPS = ["gaussian_volume", "gaussian_volume_backward", "warp_residual", "warp_add",
       "warp_sample_backward", "causal_conv3d", "causal_conv3d_backward"]


def _motion(B, T, H, W, L, scale=3.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, 3, T, H, W, generator=g, dtype=dtype) * scale
    # keep s strictly inside (0, L) and off integers so every sample has a two-sided derivative
    m[:, 2] = torch.rand(B, T, H, W, generator=g, dtype=dtype) * L * 0.9 + 0.05 * L if L else 0
    return m


# ---- the reference's math ---------------------------------------------------------------------

def test_gradcheck_gaussian_volume():
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: R.gaussian_volume(t, 2, 0.8), (x,))


@pytest.mark.parametrize("op", ["warp_residual", "warp_add"])
def test_gradcheck_warps(op):
    B, C, T, H, W, L = 1, 2, 2, 5, 6, 2
    vol = torch.randn(B, C, L + 1, H, W, dtype=torch.float64, requires_grad=True)
    mot = _motion(B, T, H, W, L, scale=1.3).requires_grad_()
    fr = torch.randn(B, C, T, H, W, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(getattr(R, op), (vol, mot, fr))


def test_gradcheck_causal_conv3d_with_prologue_epilogue_cache():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    cache = torch.randn(1, 3, 2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    nw = torch.rand(3, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    res = torch.randn(1, 4, 3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, w, b, cache, nw, res):
        return R.causal_conv3d(x, w, b, (1, 1, 1), cache, nw, 1e-6, True, True, res)[0]
    assert torch.autograd.gradcheck(f, (x, w, b, cache, nw, res))


@pytest.mark.parametrize("kernel,stride", [((3, 3, 3), (1, 1, 1)), ((3, 1, 1), (1, 1, 1)),
                                           ((1, 3, 3), (1, 2, 2)), ((3, 3, 3), (2, 1, 1))])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_reference_conv_chunked_equals_whole(kernel, stride, chunk):
    if chunk % stride[0]:
        pytest.skip("chunks must hold a multiple of the temporal stride")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 9, 5, generator=g)
    w = torch.randn(6, 4, *kernel, generator=g)
    b = torch.randn(6, generator=g)
    nw = torch.rand(4, generator=g) + 0.5
    whole, last = R.causal_conv3d(x, w, b, stride, None, nw, 1e-6, True, True)
    cache, outs = None, []
    for s in range(0, x.shape[2], chunk):
        y, cache = R.causal_conv3d(x[:, :, s:s + chunk], w, b, stride, cache, nw, 1e-6, True, True)
        outs.append(y)
    # identical fp32 arithmetic per output element, so only summation order may differ
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, last, rtol=0, atol=0)


def test_conv_cache_is_causal_history():
    x = torch.randn(1, 2, 5, 4, 4)
    w = torch.randn(3, 2, 3, 3, 3)
    y, cache = R.causal_conv3d(x, w)
    assert torch.equal(cache, x[:, :, -2:])
    # the first output frame sees only zeros before the video: equal to the conv of frame 0 alone
    y0, _ = R.causal_conv3d(x[:, :, :1], w)
    torch.testing.assert_close(y[:, :, :1], y0)


def test_zero_motion_returns_keyframe_exactly():
    key = torch.randn(2, 3, 9, 11)
    vol = R.gaussian_volume(key, 4, 1.0)
    assert torch.equal(vol[:, :, 0], key)
    pred = R.warp_add(vol, torch.zeros(2, 3, 5, 9, 11), torch.zeros(2, 3, 5, 9, 11))
    assert torch.equal(pred, key.unsqueeze(2).expand_as(pred))


def test_integer_scale_selects_blur_level():
    key = torch.randn(1, 3, 8, 10)
    vol = R.gaussian_volume(key, 3, 1.0)
    mot = torch.zeros(1, 3, 1, 8, 10)
    mot[:, 2] = 2.0
    torch.testing.assert_close(R.warp_add(vol, mot, torch.zeros(1, 3, 1, 8, 10))[:, :, 0], vol[:, :, 2])


def test_gaussian_volume_levels_are_separable_blurs():
    key = torch.randn(1, 1, 12, 13, dtype=torch.float64)
    vol = R.gaussian_volume(key, 2, 1.0)
    for level, sigma in ((1, 1.0), (2, 2.0)):
        taps = R.gaussian_taps(sigma, torch.float64)
        r = taps.numel() // 2
        k2 = torch.outer(taps, taps).view(1, 1, 2 * r + 1, 2 * r + 1)
        want = F.conv2d(F.pad(key, (r, r, r, r), mode="replicate"), k2)
        torch.testing.assert_close(vol[:, :, level], want)


@pytest.mark.parametrize("H,W", [(7, 9), (1, 5), (6, 1)])
def test_l0_warp_equals_grid_sample_border_align_corners(H, W):
    B, C, T = 2, 3, 4
    vol = torch.randn(B, C, 1, H, W, dtype=torch.float64)
    mot = _motion(B, T, H, W, 0, scale=4.0)  # also far outside the image
    got = R.warp_add(vol, mot, torch.zeros(B, C, T, H, W, dtype=torch.float64))
    xs = torch.arange(W, dtype=torch.float64).view(1, 1, 1, W) + mot[:, 0]
    ys = torch.arange(H, dtype=torch.float64).view(1, 1, H, 1) + mot[:, 1]
    nx = 2 * xs / (W - 1) - 1 if W > 1 else torch.zeros_like(xs)
    ny = 2 * ys / (H - 1) - 1 if H > 1 else torch.zeros_like(ys)
    grid = torch.stack([nx, ny], -1).reshape(B, T * H, W, 2)
    want = F.grid_sample(vol[:, :, 0], grid, mode="bilinear", padding_mode="border", align_corners=True)
    torch.testing.assert_close(got, want.reshape(B, C, T, H, W), rtol=1e-12, atol=1e-12)


def test_reference_low_precision_accumulates_in_fp32():
    vol = torch.randn(1, 3, 3, 8, 8)
    mot = _motion(1, 2, 8, 8, 2, dtype=torch.float32)
    fr = torch.randn(1, 3, 2, 8, 8)
    want = R.warp_residual(vol, mot, fr)
    for dt in (torch.float16, torch.bfloat16):
        got = R.warp_residual(vol.to(dt), mot, fr.to(dt))
        assert got.dtype == dt
        # inputs rounded to dt (rel 2^-11 / 2^-8) then one rounding of the output
        tol = 4e-3 if dt == torch.float16 else 3e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


# ---- registration and dispatch ----------------------------------------------------------------

needs_ext = pytest.mark.skipif(not _ext.cpu_compiled(), reason=f"extension not built: {_ext.LOAD_ERROR}")


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_registered_as_torch_ops(op):
    assert hasattr(torch.ops.decovae, op)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"decovae::{op}", "CPU"), \
        f"no CPU kernel registered for decovae::{op}"


def test_backends_listing():
    b = ops.backends()
    assert set(b) == set(ops.BACKENDS)
    assert b["reference"]["usable"]
    assert b["cpu"]["compiled"] == _ext.cpu_compiled()
    if not torch.cuda.is_available():
        assert not b["cuda"]["usable"]


def test_use_backend_forces_and_restores(monkeypatch):
    monkeypatch.delenv("DECOVAE_BACKEND", raising=False)
    cpu = torch.device("cpu")
    with ops.use_backend("reference"):
        assert ops.backend_for("warp_residual", cpu) == "reference"
        assert ops.forced_backend() == "reference"
    assert ops.forced_backend() is None


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("DECOVAE_BACKEND", "reference")
    assert ops.backend_for("causal_conv3d", torch.device("cpu")) == "reference"
    monkeypatch.setenv("DECOVAE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DECOVAE_BACKEND"):
        ops.backend_for("causal_conv3d", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_forced_unavailable_backend_is_clear_error(monkeypatch):
    monkeypatch.delenv("DECOVAE_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="'cuda' is not usable"):
        with ops.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("tpu"):
            pass
    monkeypatch.setenv("DECOVAE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not usable"):
        ops.warp_add(torch.zeros(1, 3, 1, 4, 4), torch.zeros(1, 3, 1, 4, 4), torch.zeros(1, 3, 1, 4, 4))


@needs_ext
def test_forced_backend_on_wrong_device_is_error():
    with ops.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="cannot run"):
            ops.backend_for("warp_add", torch.device("meta"))


# ---- bad use: errors name the argument ------------------------------------------------------

def _warp_args(**over):
    a = dict(volume=torch.zeros(1, 3, 2, 6, 5), motion=torch.zeros(1, 3, 4, 6, 5), frames=torch.zeros(1, 3, 4, 6, 5))
    a.update(over)
    return a


@pytest.mark.parametrize("over,match", [
    (dict(volume=torch.zeros(3, 2, 6, 5)), "volume must have 5 dimensions"),
    (dict(motion=torch.zeros(1, 2, 4, 6, 5)), "motion must have shape"),
    (dict(frames=torch.zeros(1, 3, 4, 6, 6)), "volume shape"),
    (dict(frames=torch.zeros(1, 3, 4, 6, 5, dtype=torch.int32)), "frames must be float"),
    (dict(frames=torch.zeros(1, 3, 4, 6, 5, dtype=torch.float16)), "frames has dtype"),
    (dict(motion=torch.zeros(1, 3, 4, 6, 5, device="meta")), "motion is on meta"),
    (dict(volume=[1, 2]), "volume must be a torch.Tensor"),
])
def test_warp_bad_use(over, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.warp_residual(**_warp_args(**over))


def test_conv_bad_use():
    x = torch.zeros(1, 4, 3, 6, 6)
    w = torch.zeros(5, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="input channels"):
        ops.causal_conv3d(x, torch.zeros(5, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="must be odd"):
        ops.causal_conv3d(x, torch.zeros(5, 4, 3, 2, 2))
    with pytest.raises(ValueError, match="cache must have shape"):
        ops.causal_conv3d(x, w, cache=torch.zeros(1, 4, 1, 6, 6))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.causal_conv3d(x, w, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="stride"):
        ops.causal_conv3d(x, w, stride=(1, 0, 1))
    with pytest.raises(ValueError, match="x must have 5 dimensions"):
        ops.causal_conv3d(x[0], w)
    with pytest.raises(ValueError, match="residual must have"):
        ops.causal_conv3d(x, w, residual=torch.zeros(1, 5, 3, 3, 3))
    with pytest.raises(ValueError, match="norm_weight must have"):
        ops.causal_conv3d(x, w, norm_weight=torch.zeros(5))
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.causal_conv3d(x, w.to("meta"))


def test_gaussian_volume_bad_use():
    with pytest.raises(ValueError, match="x0 must have 4"):
        ops.gaussian_volume(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="levels"):
        ops.gaussian_volume(torch.zeros(1, 3, 4, 4), levels=-1)
    with pytest.raises(ValueError, match="sigma0"):
        ops.gaussian_volume(torch.zeros(1, 3, 4, 4), sigma0=0.0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_ops_run_under_inference_mode(backend):
    """Users call encoders under torch.inference_mode(); kernels must not lose it in worker threads."""
    g = torch.Generator().manual_seed(3)
    key = torch.randn(1, 3, 20, 24, generator=g)
    mot = torch.randn(1, 3, 5, 20, 24, generator=g)
    fr = torch.randn(1, 3, 5, 20, 24, generator=g)
    x = torch.randn(1, 32, 5, 20, 24, generator=g)
    w = torch.randn(32, 32, 3, 3, 3, generator=g) * 0.05
    nw = torch.ones(32)

    def run():
        vol = ops.gaussian_volume(key, 3, 1.0)
        res = ops.warp_residual(vol, mot, fr)
        out = ops.warp_add(vol, mot, res)
        y1, _ = ops.causal_conv3d(x, w, norm_weight=nw, prologue_silu=True)  # Winograd path
        y2, _ = ops.causal_conv3d(x, w, stride=(1, 2, 2))  # implicit-GEMM path
        return out, y1, y2

    with ops.use_backend(backend):
        with torch.no_grad():
            want = run()
        with torch.inference_mode():
            got = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

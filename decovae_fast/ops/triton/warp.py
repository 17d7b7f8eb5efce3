"""Triton kernels of the scale-space warp (DESIGN.md ops 2-4): warp_residual, warp_add and their
shared backward, with the semantics of decovae_fast.ops.reference.

One program handles BLOCK pixels of one frame: it reads the pixels' motion once, turns it into
corner offsets and weights, then for each channel gathers the 8 trilinear corners of the volume
and reads/writes the frames stream once. fp32 math whatever the input dtype. The backward scatters
the volume gradient with fp32 atomics (not bitwise deterministic, unlike the CPU kernel) and
writes the motion gradient per pixel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 512


@triton.jit
def _axis(coord, n):
    """reference._axis: c = clamp(coord, 0, n-1), lo = floor(c), hi = lo + step, w = c - lo.
    `passed` is the reference's gradient mask (torch.clamp with scalar bounds: zero where coord
    equals a bound). NaN maps to 0 (indices stay in range)."""
    top = (n - 1).to(tl.float32)
    passed = (coord > 0.0) & (coord < top)
    c = tl.where(coord > 0.0, coord, 0.0)
    c = tl.where(c < top, c, top)
    lo = c.to(tl.int32)  # c >= 0: truncation is floor
    w = c - lo.to(tl.float32)
    step = tl.where(lo + 1 < n, 1, 0)
    return lo, step, w, passed


@triton.jit
def _taps(mot_ptr, b, t, offs, mask, T, D, H, W):
    """Corner offsets (within a (b, c) volume) and weights of the sample points at offs."""
    HW = H * W
    y = offs // W
    x = offs - y * W
    base = mot_ptr + (b * 3 * T + t).to(tl.int64) * HW
    u = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(base + T * HW + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(base + 2 * T * HW + offs, mask=mask, other=0.0).to(tl.float32)
    x0, dx, wx, px = _axis(x.to(tl.float32) + u, W)
    y0, dy, wy, py = _axis(y.to(tl.float32) + v, H)
    s0, ds, ws, ps = _axis(s, D)
    i00 = s0 * HW + y0 * W + x0
    i01 = i00 + dy * W
    i10 = i00 + ds * HW
    i11 = i10 + dy * W
    return i00, i01, i10, i11, dx, wx, wy, ws, px, py, ps


@triton.jit
def _corners(vp, ia, ib, dx, mask):
    """The 4 corners (x0, x1 at rows a and b) of one level."""
    va0 = tl.load(vp + ia, mask=mask, other=0.0).to(tl.float32)
    va1 = tl.load(vp + ia + dx, mask=mask, other=0.0).to(tl.float32)
    vb0 = tl.load(vp + ib, mask=mask, other=0.0).to(tl.float32)
    vb1 = tl.load(vp + ib + dx, mask=mask, other=0.0).to(tl.float32)
    return va0, va1, vb0, vb1


@triton.jit
def warp_forward_kernel(vol_ptr, mot_ptr, src_ptr, out_ptr, C, T, D, H, W,
                        ADD: tl.constexpr, SINGLE_LEVEL: tl.constexpr, BLOCK: tl.constexpr):
    """out = src - sample (ADD false: warp_residual) or src + sample (ADD true: warp_add)."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    i00, i01, i10, i11, dx, wx, wy, ws, px, py, ps = _taps(mot_ptr, b, t, offs, mask, T, D, H, W)
    for c in range(C):
        bc = (b * C + c).to(tl.int64)
        vp = vol_ptr + bc * D * HW
        v00, v01, v10, v11 = _corners(vp, i00, i01, dx, mask)
        a0 = v00 + wx * (v01 - v00)
        a1 = v10 + wx * (v11 - v10)
        pred = a0 + wy * (a1 - a0)
        if not SINGLE_LEVEL:
            w00, w01, w10, w11 = _corners(vp, i10, i11, dx, mask)
            b0 = w00 + wx * (w01 - w00)
            b1 = w10 + wx * (w11 - w10)
            pred = pred + ws * (b0 + wy * (b1 - b0) - pred)
        fo = (bc * T + t) * HW + offs
        f = tl.load(src_ptr + fo, mask=mask, other=0.0).to(tl.float32)
        res = f + pred if ADD else f - pred
        tl.store(out_ptr + fo, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_level(gp, ia, ib, dx, wx, wy, g, mask):
    ga = g * (1.0 - wy)
    gb = g * wy
    tl.atomic_add(gp + ia, ga * (1.0 - wx), mask=mask)
    tl.atomic_add(gp + ia + dx, ga * wx, mask=mask)
    tl.atomic_add(gp + ib, gb * (1.0 - wx), mask=mask)
    tl.atomic_add(gp + ib + dx, gb * wx, mask=mask)


@triton.jit
def warp_backward_kernel(grad_ptr, vol_ptr, mot_ptr, gvol_ptr, gmot_ptr, C, T, D, H, W,
                         VOLUME_GRAD: tl.constexpr, MOTION_GRAD: tl.constexpr, SINGLE_LEVEL: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Gradients of sum(grad * sample(volume, motion)): the volume's by fp32 atomics into gvol
    (fp32, zero-initialised), the motion's written per pixel into gmot."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    b = tl.program_id(2)
    HW = H * W
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    i00, i01, i10, i11, dx, wx, wy, ws, px, py, ps = _taps(mot_ptr, b, t, offs, mask, T, D, H, W)
    # Not tl.zeros: it is a @triton.jit helper, which the interpreter cannot call when triton was
    # imported before TRITON_INTERPRET=1 was set (the tests may do that).
    gu = wx * 0.0
    gv = wx * 0.0
    gs = wx * 0.0
    for c in range(C):
        bc = (b * C + c).to(tl.int64)
        g = tl.load(grad_ptr + (bc * T + t) * HW + offs, mask=mask, other=0.0).to(tl.float32)
        if MOTION_GRAD:
            vp = vol_ptr + bc * D * HW
            v00, v01, v10, v11 = _corners(vp, i00, i01, dx, mask)
            a0 = v00 + wx * (v01 - v00)
            a1 = v10 + wx * (v11 - v10)
            dwx = (v01 - v00) + wy * ((v11 - v10) - (v01 - v00))
            dwy = a1 - a0
            if SINGLE_LEVEL:
                gu += g * dwx
                gv += g * dwy
            else:
                w00, w01, w10, w11 = _corners(vp, i10, i11, dx, mask)
                b0 = w00 + wx * (w01 - w00)
                b1 = w10 + wx * (w11 - w10)
                dwx1 = (w01 - w00) + wy * ((w11 - w10) - (w01 - w00))
                gu += g * (dwx + ws * (dwx1 - dwx))
                gv += g * (dwy + ws * ((b1 - b0) - dwy))
                gs += g * ((b0 + wy * (b1 - b0)) - (a0 + wy * (a1 - a0)))
        if VOLUME_GRAD:
            gp = gvol_ptr + bc * D * HW
            if SINGLE_LEVEL:
                _scatter_level(gp, i00, i01, dx, wx, wy, g, mask)
            else:
                _scatter_level(gp, i00, i01, dx, wx, wy, g * (1.0 - ws), mask)
                _scatter_level(gp, i10, i11, dx, wx, wy, g * ws, mask)
    if MOTION_GRAD:
        base = gmot_ptr + (b * 3 * T + t).to(tl.int64) * HW + offs
        ty = gmot_ptr.dtype.element_ty
        tl.store(base, tl.where(px, gu, 0.0).to(ty), mask=mask)
        tl.store(base + T * HW, tl.where(py, gv, 0.0).to(ty), mask=mask)
        tl.store(base + 2 * T * HW, tl.where(ps, gs, 0.0).to(ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------

def _check(volume, motion, src, name):
    if volume.dim() != 5 or motion.dim() != 5 or src.dim() != 5:
        raise ValueError(f"volume, motion and {name} must be 5-D, got {tuple(volume.shape)}, "
                         f"{tuple(motion.shape)}, {tuple(src.shape)}")
    B, C, T, H, W = src.shape
    if volume.shape[:2] != (B, C) or volume.shape[3:] != (H, W):
        raise ValueError(f"volume shape {tuple(volume.shape)} does not match {name} {tuple(src.shape)}")
    if tuple(motion.shape) != (B, 3, T, H, W):
        raise ValueError(f"motion must have shape ({B}, 3, {T}, {H}, {W}), got {tuple(motion.shape)}")
    if volume.shape[2] < 1:
        raise ValueError(f"volume must have at least one level, got shape {tuple(volume.shape)}")
    if volume[0, 0].numel() >= 2 ** 31:
        raise ValueError(f"volume planes of 2^31 elements or more are not supported: {tuple(volume.shape)}")
    return B, C, T, volume.shape[2], H, W


def warp_forward(volume, motion, src, add: bool):
    """src - sample(volume, motion) (add=False) or src + sample (add=True), in src's dtype."""
    B, C, T, D, H, W = _check(volume, motion, src, "residual" if add else "frames")
    volume, motion, src = volume.contiguous(), motion.contiguous(), src.contiguous()
    out = torch.empty_like(src)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(H * W, BLOCK), T, B)
    warp_forward_kernel[grid](volume, motion, src, out, C, T, D, H, W,
                              ADD=add, SINGLE_LEVEL=D == 1, BLOCK=BLOCK)
    return out


def warp_sample_backward(grad, volume, motion, volume_grad: bool, motion_grad: bool):
    """(grad_volume, grad_motion) of sum(grad * sample(volume, motion)); zeros where not asked."""
    B, C, T, D, H, W = _check(volume, motion, grad, "grad_prediction")
    grad, volume, motion = grad.contiguous(), volume.contiguous(), motion.contiguous()
    gvol = torch.zeros(volume.shape, dtype=torch.float32, device=volume.device)
    gmot = (torch.empty_like(motion) if motion_grad else torch.zeros_like(motion))
    if grad.numel() and (volume_grad or motion_grad):
        grid = (triton.cdiv(H * W, BLOCK), T, B)
        warp_backward_kernel[grid](grad, volume, motion, gvol, gmot, C, T, D, H, W,
                                   VOLUME_GRAD=volume_grad, MOTION_GRAD=motion_grad,
                                   SINGLE_LEVEL=D == 1, BLOCK=BLOCK)
    elif motion_grad:
        gmot.zero_()
    return gvol.to(volume.dtype), gmot


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume, motion, src, add):
        ctx.save_for_backward(volume, motion)
        ctx.add = add
        return warp_forward(volume, motion, src, add)

    @staticmethod
    def backward(ctx, grad):
        volume, motion = ctx.saved_tensors
        need_v, need_m, need_s = ctx.needs_input_grad[:3]
        gv = gm = None
        if need_v or need_m:
            gv, gm = warp_sample_backward(grad if ctx.add else -grad, volume, motion, need_v, need_m)
        return (gv if need_v else None), (gm if need_m else None), (grad if need_s else None), None


def warp_residual(volume, motion, frames):
    """Differentiable frames - sample(volume, motion) (signature of reference.warp_residual)."""
    return _Warp.apply(volume, motion, frames, False)


def warp_add(volume, motion, residual):
    """Differentiable sample(volume, motion) + residual (signature of reference.warp_add)."""
    return _Warp.apply(volume, motion, residual, True)


# ---- sm_90 compile specs (tests/ops/test_triton_compile.py) -------------------------------------------

def _specs():
    ints = {"C": "i32", "T": "i32", "D": "i32", "H": "i32", "W": "i32"}
    for dt in ("fp32", "fp16", "bf16"):
        ptr, mptr = f"*{dt}", "*fp32"  # motion may stay fp32 beside fp16/bf16 frames
        for single in (False, True):
            for add in (False, True):
                yield (warp_forward_kernel,
                       {"vol_ptr": ptr, "mot_ptr": mptr, "src_ptr": ptr, "out_ptr": ptr, **ints,
                        "ADD": "constexpr", "SINGLE_LEVEL": "constexpr", "BLOCK": "constexpr"},
                       {"ADD": add, "SINGLE_LEVEL": single, "BLOCK": BLOCK})
            yield (warp_backward_kernel,
                   {"grad_ptr": ptr, "vol_ptr": ptr, "mot_ptr": mptr, "gvol_ptr": "*fp32", "gmot_ptr": mptr,
                    **ints, "VOLUME_GRAD": "constexpr", "MOTION_GRAD": "constexpr",
                    "SINGLE_LEVEL": "constexpr", "BLOCK": "constexpr"},
                   {"VOLUME_GRAD": True, "MOTION_GRAD": True, "SINGLE_LEVEL": single, "BLOCK": BLOCK})


COMPILE_SPECS = list(_specs())  # gathered by decovae_fast.ops.triton

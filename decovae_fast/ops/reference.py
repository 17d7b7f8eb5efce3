"""Pure-PyTorch reference of every op: the oracle the fast kernels are tested against.

Written for clarity, not speed. All math is done in fp32 (fp64 stays fp64, for gradcheck) and the
result is cast back to the input dtype, as the fast kernels do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def gaussian_sigmas(levels: int, sigma0: float) -> list[float]:
    """sigma of level i >= 1 (level 0 is the unblurred image)."""
    return [sigma0 * 2.0 ** (i - 1) for i in range(1, levels + 1)]


def gaussian_taps(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ceil(3 sigma)."""
    radius = int(math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).to(dtype)


def gaussian_volume(x0: torch.Tensor, levels: int, sigma0: float) -> torch.Tensor:
    """(B,C,H,W) -> (B,C,L+1,H,W); separable blur with replicate border per level."""
    B, C, H, W = x0.shape
    x = _acc(x0)
    planes = [x]
    flat = x.reshape(B * C, 1, H, W)
    for sigma in gaussian_sigmas(levels, sigma0):
        taps = gaussian_taps(sigma, x.dtype, x.device)
        r = taps.numel() // 2
        h = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1))
        v = F.conv2d(F.pad(h, (0, 0, r, r), mode="replicate"), taps.view(1, 1, -1, 1))
        planes.append(v.reshape(B, C, H, W))
    return torch.stack(planes, dim=2).to(x0.dtype)


def _axis(coord: torch.Tensor, size: int):
    """Border-clamped linear interpolation indices and weight along one axis."""
    c = coord.clamp(0, size - 1)
    lo = c.floor()
    w = c - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=size - 1)
    return lo, hi, w


def warp_sample(volume: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """Sample volume (B,C,L+1,H,W) at (x+u, y+v, s) for every pixel of motion (B,3,T,H,W).

    Trilinear; x, y clamped to the image, s to [0, L]. Returns (B,C,T,H,W) in the accumulation dtype.
    """
    B, C, D, H, W = volume.shape
    T = motion.shape[2]
    vol = _acc(volume)
    mot = _acc(motion).to(vol.dtype)
    ys = torch.arange(H, device=vol.device, dtype=vol.dtype).view(1, 1, H, 1)
    xs = torch.arange(W, device=vol.device, dtype=vol.dtype).view(1, 1, 1, W)
    x0, x1, wx = _axis(xs + mot[:, 0], W)
    y0, y1, wy = _axis(ys + mot[:, 1], H)
    s0, s1, ws = _axis(mot[:, 2], D)
    flat = vol.reshape(B, C, D * H * W)

    def gather(s, y, x):
        idx = ((s * H + y) * W + x).reshape(B, 1, T * H * W).expand(B, C, T * H * W)
        return flat.gather(2, idx).reshape(B, C, T, H, W)

    wx, wy, ws = wx.unsqueeze(1), wy.unsqueeze(1), ws.unsqueeze(1)
    out = 0
    for s, fs in ((s0, 1 - ws), (s1, ws)):
        for y, fy in ((y0, 1 - wy), (y1, wy)):
            for x, fx in ((x0, 1 - wx), (x1, wx)):
                out = out + fs * fy * fx * gather(s, y, x)
    return out


def warp_residual(volume: torch.Tensor, motion: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """residual = frames - sample(volume, motion)."""
    pred = warp_sample(volume, motion)
    return (_acc(frames) - pred).to(frames.dtype)


def warp_add(volume: torch.Tensor, motion: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """frames = sample(volume, motion) + residual."""
    pred = warp_sample(volume, motion)
    return (pred + _acc(residual)).to(residual.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-position RMSNorm over the channel dim (dim 1) of (B,C,T,H,W)."""
    xa = _acc(x)
    rms = torch.rsqrt(xa.pow(2).mean(dim=1, keepdim=True) + eps)
    return xa * rms * _acc(weight).view(1, -1, 1, 1, 1)


def causal_conv3d(x, weight, bias=None, stride=(1, 1, 1), cache=None, norm_weight=None, eps=1e-6,
                  prologue_silu=False, epilogue_silu=False, residual=None):
    """The PyTorch sequence the fused op replaces: [cache, x] -> RMSNorm -> SiLU -> conv3d -> bias
    -> SiLU -> + residual. Returns (y, new_cache); new_cache is the last kt-1 raw input frames."""
    kt, kh, kw = weight.shape[2:]
    B, C, T, H, W = x.shape
    if cache is None:
        cache = x.new_zeros(B, C, kt - 1, H, W)
    full = torch.cat([cache.to(x.dtype), x], dim=2)
    new_cache = full[:, :, full.shape[2] - (kt - 1):].clone()
    a = _acc(full)
    if norm_weight is not None:
        a = rms_norm(a, norm_weight, eps)
    if prologue_silu:
        a = F.silu(a)
    b = None if bias is None else _acc(bias).to(a.dtype)
    y = F.conv3d(a, _acc(weight).to(a.dtype), b, stride=tuple(stride), padding=(0, kh // 2, kw // 2))
    if epilogue_silu:
        y = F.silu(y)
    if residual is not None:
        y = y + _acc(residual)
    return y.to(x.dtype), new_cache

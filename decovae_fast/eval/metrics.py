"""Per-frame PSNR and SSIM of videos (B, C, T, H, W): the one place these are computed (reports,
validation during training, tests). Both are differentiable torch code, computed in fp32.

`data_range` is the span of the values: 2.0 for model tensors in [-1, 1], 255.0 for uint8 frames.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MAX_PSNR = 100.0  # identical frames: report 100 dB rather than infinity (JSON has no infinity)


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 5:
        raise ValueError(f"x must have shape (B, C, T, H, W), got {tuple(x.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB of each frame, shape (B, T); capped at MAX_PSNR."""
    _check(x, y)
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 3, 4))
    floor = data_range ** 2 * 10 ** (-MAX_PSNR / 10)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(floor))


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-r * r / (2 * sigma * sigma))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid region) of
    each frame, channels averaged, shape (B, T). Frames smaller than the window use a window as
    large as the frame (odd), so any size works."""
    _check(x, y)
    b, c, t, h, w = x.shape
    size = min(window, h if h % 2 else h - 1, w if w % 2 else w - 1)
    size = max(size, 1)
    g = _gaussian_window(size, sigma, x.device)
    # frames as a batch of single-channel images; separable blur (vertical then horizontal)
    xf = x.float().permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    yf = y.float().permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)

    def blur(z):
        z = F.conv2d(z, g.view(1, 1, size, 1))
        return F.conv2d(z, g.view(1, 1, 1, size))

    stats = blur(torch.cat([xf, yf, xf * xf, yf * yf, xf * yf], dim=1).view(-1, 1, h, w))
    stats = stats.view(b * t * c, 5, *stats.shape[-2:])
    mx, my, sxx, syy, sxy = stats.unbind(1)
    vx, vy, cxy = sxx - mx * mx, syy - my * my, sxy - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.mean(dim=(-2, -1)).view(b, t, c).mean(dim=2)


def frame_metrics(original: np.ndarray, reconstruction: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-frame (psnr, ssim) of two uint8 (T, H, W, 3) videos, as lists of floats."""
    def as_video(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(3, 0, 1, 2).unsqueeze(0)

    x, y = as_video(original), as_video(reconstruction)
    return psnr(x, y, 255.0)[0].tolist(), ssim(x, y, 255.0)[0].tolist()

"""A linear patch code: the closed-form floor a learned autoencoder should start from.

A frame (or a group of frames) is cut into non-overlapping p x p patches; each patch (C * f * p * p
values, f frames) is coded by k coefficients, z = A (patch - mu), and rebuilt as patch = S z + mu.
Initialised from the PCA of training patches with whitened coefficients (A = diag(1/sqrt(lambda))
U^T, S = U diag(sqrt(lambda))), it is the best linear code of that size: 16 coefficients of 8x8x3
RGB patches reach 31-33 dB on real frames (issue 18; `decovae diagnose` measures it), where the bundled tiny model started from noise and sat
at 22 dB after 1,800 steps (issue 18's diagnosis). The models add it beside their learned encoder
head and decoder output (both zero-initialised), so training starts on this floor and learns only
the correction. A and S stay trainable; whitening keeps the latent channels at unit variance,
which is what the KL prior and the posterior noise assume.
"""
from __future__ import annotations

import torch
from torch import nn

from decovae_fast.models.layers import depth_to_space, space_to_depth


def patches(x: torch.Tensor, p: int, frames: int = 1) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C * frames * p * p, T / frames, H / p, W / p), channel-major order
    (c, t, dy, dx): the same order the PCA is fitted in."""
    B, C, T, H, W = x.shape
    if T % frames:
        raise ValueError(f"{T} frames cannot be grouped by {frames}")
    x = x.reshape(B, C, T // frames, frames, H, W).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(B, C * frames, T // frames, H, W)
    return space_to_depth(x, p)


def unpatches(z: torch.Tensor, C: int, p: int, frames: int = 1) -> torch.Tensor:
    """The inverse of patches."""
    x = depth_to_space(z, p)
    B, _, T, H, W = x.shape
    x = x.reshape(B, C, frames, T, H, W).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, C, T * frames, H, W)


def patch_rows(x: torch.Tensor, p: int, frames: int = 1) -> torch.Tensor:
    """(B, C, T, H, W) -> (N, C * frames * p * p): every patch as one row, in `patches` order."""
    q = patches(x, p, frames)
    return q.permute(0, 2, 3, 4, 1).reshape(-1, q.shape[1])


def fit_pca(samples: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """samples (N, d) -> (mean (d,), basis (d, k) orthonormal columns, variances (k,)), largest first."""
    x = samples.double()
    mean = x.mean(0)
    cov = torch.cov((x - mean).T)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)[:k]
    return mean.float(), evecs[:, order].float(), evals[order].clamp_min(1e-8).float()


class PatchLinear(nn.Module):
    """z = A (patch - mu), patch = S z + mu over p x p x `frames` patches of `channels` channels."""

    def __init__(self, k: int, channels: int = 3, patch: int = 8, frames: int = 1):
        super().__init__()
        self.k, self.channels, self.patch, self.frames = k, channels, patch, frames
        d = channels * frames * patch * patch
        self.analysis = nn.Parameter(torch.zeros(k, d))
        self.synthesis = nn.Parameter(torch.zeros(d, k))
        self.mean = nn.Parameter(torch.zeros(d))

    @property
    def dim(self) -> int:
        return self.analysis.shape[1]

    @torch.no_grad()
    def init_from_pca(self, samples: torch.Tensor) -> None:
        """samples: (N, d) patches in `patches` order."""
        mean, basis, var = fit_pca(samples, self.k)
        std = var.sqrt()
        self.mean.copy_(mean)
        self.analysis.copy_(basis.T / std[:, None])
        self.synthesis.copy_(basis * std[None, :])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W), H and W multiples of the patch -> (B, k, T / frames, H / p, W / p)."""
        q = patches(x, self.patch, self.frames)
        q = q - self.mean.to(q.dtype).view(1, -1, 1, 1, 1)
        return torch.einsum("kd,bdthw->bkthw", self.analysis.to(q.dtype), q)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        q = torch.einsum("dk,bkthw->bdthw", self.synthesis.to(z.dtype), z)
        q = q + self.mean.to(q.dtype).view(1, -1, 1, 1, 1)
        return unpatches(q, self.channels, self.patch, self.frames)


def sample_patches(videos, n: int, patch: int = 8, frames: int = 1, seed: int = 0) -> torch.Tensor:
    """n patches (n, C * frames * patch^2) in [-1, 1], in `patches` order, from uint8 videos
    (T, C, H, W): random frame groups of `frames` consecutive frames, each cut on a patch grid at a
    random offset, then n of all those patches drawn at random (seeded)."""
    g = torch.Generator().manual_seed(seed)
    videos = [v for v in videos if v.shape[0] >= frames and min(v.shape[-2:]) >= patch]
    if not videos:
        raise ValueError(f"no video has {frames} frames of at least {patch}x{patch} pixels")
    picks = max(8, min(256, n // 256))
    pool = []
    for _ in range(picks):
        v = videos[int(torch.randint(len(videos), (1,), generator=g))]
        T, C, H, W = v.shape
        t0 = int(torch.randint(T - frames + 1, (1,), generator=g))
        dy, dx = (int(torch.randint(patch, (1,), generator=g)) if s >= 2 * patch else 0 for s in (H, W))
        h, w = (H - dy) // patch * patch, (W - dx) // patch * patch
        x = v[t0:t0 + frames, :, dy:dy + h, dx:dx + w].permute(1, 0, 2, 3)[None].float().div(127.5).sub(1)
        pool.append(patch_rows(x, patch, frames))
    pool = torch.cat(pool)
    return pool[torch.randperm(len(pool), generator=g)[:n]]

"""What DeCoVAE and PlainCausalVAE share: input checks, padding, tiling switches, GOP-wise latent
splitting, save/load, and the encode/decode/forward entry points built on their streaming methods."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from decovae_fast._memory import release_freed_memory
from decovae_fast.models import pretrained
from decovae_fast.models.latent import DeCoLatent, DiagonalGaussian
from decovae_fast.models.tiling import make_tiles, run_tiled


@dataclass
class VAEOutput:
    sample: torch.Tensor  # reconstruction (B, 3, T, H, W), not clamped (training losses)
    latent: DeCoLatent
    parts: dict


def check_video(video, name: str = "video") -> None:
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() != 5:
        raise ValueError(f"{name} must have shape (B, 3, T, H, W), got {video.dim()} dimensions {tuple(video.shape)}")
    if video.shape[1] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels in dim 1, got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [-1, 1], got {video.dtype}")
    if min(video.shape) < 1:
        raise ValueError(f"{name} must have at least one frame and one pixel, got shape {tuple(video.shape)}")
    if not torch.isfinite(video).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_chunk(chunk, size):
    """Checks one chunk of a stream; returns the (batch, height, width) every chunk must share."""
    check_video(chunk, "chunk")
    this = (chunk.shape[0], chunk.shape[3], chunk.shape[4])
    if size is not None and this != size:
        raise ValueError(f"chunk of shape {tuple(chunk.shape)} does not match the first chunk's "
                         f"batch and frame size {size}")
    return this


class FrameGroups:
    """Inner frames buffered into whole temporal groups of `size` (the causal encoders take 4 frames
    per latent step): push() returns what whole groups are ready, flush() the rest padded to a
    group by repeating its last frame. Several tensors (dim 2 is time) travel together."""

    def __init__(self, size: int = 4):
        self.size = size
        self.pending: tuple | None = None

    def push(self, *xs: torch.Tensor) -> tuple | None:
        if self.pending is not None:
            xs = tuple(torch.cat([p, x], 2) for p, x in zip(self.pending, xs))
        n = xs[0].shape[2]
        full = n // self.size * self.size
        self.pending = tuple(x[:, :, full:] for x in xs) if full < n else None
        return tuple(x[:, :, :full] for x in xs) if full else None

    def flush(self) -> tuple | None:
        if self.pending is None:
            return None
        pad = self.size - self.pending[0].shape[2]
        out = tuple(torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1, -1)], 2) for x in self.pending)
        self.pending = None
        return out


def split_gops(latent: DeCoLatent) -> list[tuple[int, DiagonalGaussian | None, ...]]:
    """[(frames, keyframe_moments_slice, motion_slice, residual_slice)] per GOP (Gaussians' means/logvars
    sliced; parts a model lacks are None)."""
    out, offset = [], 0
    for g, (n, k) in enumerate(zip(latent.gop_lengths(), latent.inner_steps())):
        def cut(gauss, a, b):
            return None if gauss is None else DiagonalGaussian(gauss.mean[:, :, a:b], gauss.logvar[:, :, a:b])
        out.append((n, cut(latent.keyframe, g, g + 1), cut(latent.motion, offset, offset + k),
                    cut(latent.residual, offset, offset + k)))
        offset += k
    return out


class VideoVAEBase(nn.Module):
    config_class = None
    spatial_compression_ratio = 8
    temporal_compression_ratio = 4

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.use_tiling = False

    # --- switches and identity -------------------------------------------------------------------
    def enable_tiling(self, tile_size: int | None = None, halo: int | None = None) -> None:
        """Process frames larger than tile_size (px) in tiles with `halo` px of context (see tiling.py)."""
        if tile_size is not None:
            self.config.tile_size = int(tile_size)
        if halo is not None:
            self.config.tile_halo = int(halo)
        self.config.__post_init__()
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _tiles(self, H: int, W: int):
        size = self.config.tile_size
        if not self.use_tiling or (H <= size and W <= size):
            return None
        return make_tiles(H, W, size, self.config.tile_halo)

    @staticmethod
    def _tiled(fn, inputs, out_px, tiles):
        """fn(*inputs, tile_index) over the tiles (or once, tile 0, without tiling)."""
        if tiles is None:
            return fn(*(x for x, _ in inputs), 0)
        return run_tiled(fn, inputs, out_px, tiles)

    def config_hash(self) -> str:
        return self.config.config_hash()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def save_pretrained(self, directory) -> None:
        pretrained.save(self, directory)

    @classmethod
    def from_pretrained(cls, directory=None):
        return pretrained.load_into(cls, directory)

    # --- entry points ----------------------------------------------------------------------------
    def encode(self, video: torch.Tensor, chunk_frames: int | None = None, fixed_gops: bool = False) -> DeCoLatent:
        """fixed_gops: a GOP every keyframe_interval frames, no adaptive cut (what pack() needs)."""
        check_video(video)
        chunks = [video] if chunk_frames is None else video.split(_positive(chunk_frames), dim=2)
        return DeCoLatent.concat(list(self.encode_stream(chunks, fixed_gops=fixed_gops)))

    def pack_layout(self):
        return self.config.pack_layout()

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if c.latents_mean is None:
            raise ValueError("this model's config has no latents_mean / latents_std (`decovae latent-stats` "
                             "computes them)")
        if like.dim() != 5 or like.shape[1] != len(c.latents_mean):
            raise ValueError(f"expected a packed latent (B, {len(c.latents_mean)}, G, h, w), got {tuple(like.shape)}")

        def per_channel(v):
            return torch.tensor(v, dtype=torch.float32, device=like.device).view(1, -1, 1, 1, 1)
        return per_channel(c.latents_mean), per_channel(c.latents_std)

    def normalize(self, packed: torch.Tensor) -> torch.Tensor:
        """(packed - latents_mean) / latents_std per channel, in fp32 (a short last GOP's padding
        is normalised too: layout.valid(T) says which entries are latent values)."""
        mean, std = self._latent_stats(packed)
        return (packed.float() - mean) / std

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(normalized)
        return normalized.float() * std + mean

    def decode(self, latent: DeCoLatent, chunk_frames: int | None = None) -> torch.Tensor:
        return torch.cat(list(self.decode_stream(latent, chunk_frames)), dim=2)

    def decode_stream(self, latent_or_pieces, chunk_frames: int | None = None):
        """Yield (B, 3, t, H, W) frame chunks in [-1, 1] from a DeCoLatent or an iterable of pieces."""
        pieces = [latent_or_pieces] if isinstance(latent_or_pieces, DeCoLatent) else latent_or_pieces
        steps = None if chunk_frames is None else max(1, _positive(chunk_frames) // 4)
        for piece in pieces:
            if not isinstance(piece, DeCoLatent):
                raise TypeError(f"decode needs a DeCoLatent, got {type(piece).__name__}")
            self._check_latent(piece)
            for n, kf, mo, re in split_gops(piece):
                release_freed_memory()
                for out in self._decode_gop(n, kf.mean, None if mo is None else mo.mean,
                                            None if re is None else re.mean, steps, piece.height, piece.width):
                    yield out["frames"][..., :piece.height, :piece.width].clamp(-1, 1)


def _positive(n) -> int:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"chunk_frames must be a positive int or None, got {n!r}")
    return n

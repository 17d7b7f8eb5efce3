"""Latent containers: DiagonalGaussian (one part) and DeCoLatent (the parts of a video + GOPs)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from decovae_fast.models.layers import depth_to_space, space_to_depth

_PARTS = ("keyframe", "motion", "residual")


class DiagonalGaussian:
    """N(mean, exp(logvar)) over a (B, C, T, H, W) latent; kl() is against N(0, 1), per batch item."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor | None = None):
        self.mean = mean
        self.logvar = torch.zeros_like(mean) if logvar is None else logvar.clamp(-30.0, 20.0)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).flatten(1).sum(1)

    def numel(self) -> int:
        return self.mean[0].numel()


@dataclass(frozen=True)
class PackLayout:
    """How a latent with GOPs every `keyframe_interval` frames becomes one tensor (B, C, G, h, w)
    whose shape depends only on (frames, height, width) and the model config (docs/latent_format.md):
    one time step per GOP, h = ceil(height / cell), w = ceil(width / cell). Channels: the keyframe
    latent folded from 8x to `cell` pixels (space_to_depth), then for each of the `steps` inner
    latent steps of a full GOP its motion channels and its folded residual channels. A short last
    GOP's missing steps are zeros (`valid` says which entries carry latent values)."""

    keyframe_interval: int
    keyframe_channels: int
    motion_channels: int  # 0: no motion part (PlainCausalVAE)
    residual_channels: int
    cell: int  # 16 (DeCoVAE: the motion latent's grid) or 8 (PlainCausalVAE)

    @property
    def fold(self) -> int:
        """Side of the 8x-latent pixels folded into one cell."""
        return self.cell // 8

    @property
    def steps(self) -> int:
        """Inner latent steps of a full GOP."""
        return math.ceil((self.keyframe_interval - 1) / 4)

    @property
    def inner_channels(self) -> int:
        return self.motion_channels + self.residual_channels * self.fold ** 2

    @property
    def channels(self) -> int:
        return self.keyframe_channels * self.fold ** 2 + self.steps * self.inner_channels

    def gop_starts(self, frames: int) -> list[int]:
        return list(range(0, frames, self.keyframe_interval))

    def shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, G, h, w) of the packed latent of a (frames, height, width) video."""
        return (self.channels, len(self.gop_starts(frames)), math.ceil(height / self.cell),
                math.ceil(width / self.cell))

    def valid(self, frames: int) -> torch.Tensor:
        """(C, G) bool: False where a short last GOP's missing inner steps are padding."""
        G = len(self.gop_starts(frames))
        mask = torch.ones(self.channels, G, dtype=torch.bool)
        last = frames - self.gop_starts(frames)[-1]
        used = math.ceil((last - 1) / 4)
        mask[self.keyframe_channels * self.fold ** 2 + used * self.inner_channels:, G - 1] = False
        return mask


class ChannelStats:
    """Per-channel mean and std of packed latents, accumulated in fp64 over the valid entries
    (PackLayout.valid) of every packed latent passed to update()."""

    def __init__(self, channels: int):
        self.n = torch.zeros(channels, dtype=torch.float64)
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sq = torch.zeros(channels, dtype=torch.float64)

    def update(self, packed: torch.Tensor, valid: torch.Tensor) -> None:
        x = packed.detach().to("cpu", torch.float64)  # (B, C, G, h, w)
        m = valid.view(1, *valid.shape, 1, 1).expand_as(x).to(torch.float64)
        self.n += m.sum(dim=(0, 2, 3, 4))
        self.sum += (x * m).sum(dim=(0, 2, 3, 4))
        self.sq += (x * x * m).sum(dim=(0, 2, 3, 4))

    def result(self) -> tuple[list[float], list[float]]:
        if (self.n < 2).any():
            raise ValueError("too few latent values for statistics of every channel")
        mean = self.sum / self.n
        var = (self.sq / self.n - mean * mean).clamp_min(0) * self.n / (self.n - 1)
        return mean.tolist(), var.sqrt().clamp_min(1e-6).tolist()


@dataclass
class DeCoLatent:
    """The latent of a video. Parts (None when a model has no such part):

    keyframe (B, Ck, G, H/8, W/8): one per GOP; motion (B, Cm, K, H/16, W/16) and residual
    (B, Cr, K, H/8, W/8): the GOPs' inner latent frames concatenated in time (GOP g of n_g frames
    owns ceil((n_g - 1) / 4) of them). H, W are the padded size. gop_starts: first frame of every
    GOP; frames/height/width: the original size."""

    keyframe: DiagonalGaussian | None
    motion: DiagonalGaussian | None
    residual: DiagonalGaussian | None
    gop_starts: list[int]
    frames: int
    height: int
    width: int
    info: dict = field(default_factory=dict)  # free-form string metadata (e.g. model config hash)

    def parts(self) -> dict[str, DiagonalGaussian]:
        return {k: getattr(self, k) for k in _PARTS if getattr(self, k) is not None}

    def gop_lengths(self) -> list[int]:
        ends = self.gop_starts[1:] + [self.frames]
        return [e - s for s, e in zip(self.gop_starts, ends)]

    def inner_steps(self) -> list[int]:
        """Latent frames of motion/residual per GOP."""
        return [-(-(n - 1) // 4) for n in self.gop_lengths()]

    def numel(self) -> int:
        """Elements the decoder needs (the means), per batch item."""
        return sum(g.numel() for g in self.parts().values())

    def kl(self) -> torch.Tensor:
        return sum(g.kl() for g in self.parts().values())

    def detach(self) -> "DeCoLatent":
        parts = {k: (None if g is None else DiagonalGaussian(g.mean.detach(), g.logvar.detach()))
                 for k, g in ((k, getattr(self, k)) for k in _PARTS)}
        return DeCoLatent(**parts, gop_starts=list(self.gop_starts), frames=self.frames, height=self.height,
                          width=self.width, info=dict(self.info))

    def to_tensors(self, with_logvar: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors (means; logvars too with with_logvar) and string metadata, for a safetensors file."""
        tensors = {}
        for k, g in self.parts().items():
            tensors[k] = g.mean.contiguous()
            if with_logvar:
                tensors[k + "_logvar"] = g.logvar.contiguous()
        meta = {"gop_starts": json.dumps(self.gop_starts), "frames": str(self.frames),
                "height": str(self.height), "width": str(self.width), "info": json.dumps(self.info)}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "DeCoLatent":
        try:
            gop_starts = [int(v) for v in json.loads(metadata["gop_starts"])]
            frames, height, width = (int(metadata[k]) for k in ("frames", "height", "width"))
            info = json.loads(metadata.get("info", "{}"))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"latent metadata is missing or malformed: {e}") from None
        if not gop_starts or gop_starts[0] != 0 or sorted(set(gop_starts)) != gop_starts or gop_starts[-1] >= frames:
            raise ValueError(f"latent gop_starts {gop_starts} are not increasing from 0 below frames={frames}")
        parts = {}
        for k in _PARTS:
            parts[k] = None if k not in tensors else DiagonalGaussian(tensors[k], tensors.get(k + "_logvar"))
        if not any(v is not None for v in parts.values()):
            raise ValueError("latent tensors hold none of keyframe, motion, residual")
        return cls(**parts, gop_starts=gop_starts, frames=frames, height=height, width=width, info=info)

    def pack(self, layout: PackLayout, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """One tensor (B, C, G, h, w) in `layout` (config.pack_layout()): the means, or a sample of
        the posterior with sample=True. Needs GOPs every keyframe_interval frames (encode with
        fixed_gops=True); unpack() restores the latent exactly."""
        if self.gop_starts != layout.gop_starts(self.frames):
            raise ValueError(f"pack needs a GOP every {layout.keyframe_interval} frames, this latent has GOPs at "
                             f"{self.gop_starts} (encode with fixed_gops=True)")
        f = layout.fold

        def part(g, folded):
            if g is None:
                return None
            x = g.sample(generator) if sample else g.mean
            return space_to_depth(x, f) if folded else x

        kf = part(self.keyframe, True)
        B, _, G, h, w = kf.shape
        inner = [t for t in (part(self.motion, False), part(self.residual, True)) if t is not None]
        inner = torch.cat(inner, 1)  # (B, Ci, K, h, w)
        if inner.shape[1] != layout.inner_channels or kf.shape[1] != layout.keyframe_channels * f * f:
            raise ValueError(f"latent channels do not match the layout {layout}")
        S = layout.steps
        slots = inner.new_zeros(B, inner.shape[1], G, S, h, w)
        t = 0
        for g, k in enumerate(self.inner_steps()):
            slots[:, :, g, :k] = inner[:, :, t:t + k]
            t += k
        slots = slots.permute(0, 3, 1, 2, 4, 5).reshape(B, S * inner.shape[1], G, h, w)  # step-major channels
        return torch.cat([kf, slots], 1)

    @classmethod
    def unpack(cls, packed: torch.Tensor, layout: PackLayout, frames: int, height: int, width: int,
               info: dict | None = None) -> "DeCoLatent":
        """The latent that pack() made `packed` from (means only: logvars are zeros)."""
        if packed.dim() != 5 or tuple(packed.shape[1:]) != layout.shape(frames, height, width):
            raise ValueError(f"packed latent of shape {tuple(packed.shape)} does not match {frames}x{height}x{width} "
                             f"in this layout: (B, {', '.join(map(str, layout.shape(frames, height, width)))})")
        B, _, G, h, w = packed.shape
        f, S, Ci = layout.fold, layout.steps, layout.inner_channels
        nk = layout.keyframe_channels * f * f
        keyframe = depth_to_space(packed[:, :nk], f)
        slots = packed[:, nk:].reshape(B, S, Ci, G, h, w).permute(0, 2, 3, 1, 4, 5)  # (B, Ci, G, S, h, w)
        starts = layout.gop_starts(frames)
        lengths = [e - s for s, e in zip(starts, starts[1:] + [frames])]
        inner = torch.cat([slots[:, :, g, :math.ceil((n - 1) / 4)] for g, n in enumerate(lengths)], 2)
        cm = layout.motion_channels
        motion = DiagonalGaussian(inner[:, :cm].contiguous()) if cm else None
        residual = DiagonalGaussian(depth_to_space(inner[:, cm:].contiguous(), f))
        return cls(DiagonalGaussian(keyframe.contiguous()), motion, residual, starts, frames, height, width,
                   info=dict(info or {}))

    @staticmethod
    def concat(pieces: list["DeCoLatent"]) -> "DeCoLatent":
        """Join consecutive pieces (e.g. the GOPs yielded by encode_stream) into one latent."""
        if not pieces:
            raise ValueError("no latent pieces to concatenate")
        first = pieces[0]
        parts = {}
        for k in _PARTS:
            gs = [getattr(p, k) for p in pieces]
            if any(g is None for g in gs):
                parts[k] = None
                continue
            parts[k] = DiagonalGaussian(torch.cat([g.mean for g in gs], 2), torch.cat([g.logvar for g in gs], 2))
        starts, offset = [], 0
        for p in pieces:
            starts += [s + offset for s in p.gop_starts]
            offset += p.frames
        return DeCoLatent(**parts, gop_starts=starts, frames=offset, height=first.height, width=first.width,
                          info=dict(first.info))

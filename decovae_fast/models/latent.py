"""Latent containers: DiagonalGaussian (one part) and DeCoLatent (the parts of a video + GOPs)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

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

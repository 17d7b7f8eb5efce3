"""DeCoVAE in a diffusers pipeline's place (needs the optional `diffusers` package: the extra
`decovae_fast[diffusers]`).

`AutoencoderDeCo` is a diffusers `ModelMixin` + `ConfigMixin` around a DeCoVAE whose latent is the
packed one (DeCoLatent.pack, docs/latent_format.md): `encode(x).latent_dist` is a diffusers
`DiagonalGaussianDistribution` over (B, C, G, h, w); `decode(z).sample` is the video (B, 3, T, H,
W) in [-1, 1]; `enable_tiling()`; `config.latents_mean` / `config.latents_std` are the per-channel
statistics a pipeline normalises with, as for diffusers' AutoencoderKLWan. It saves and loads
with diffusers' own `save_pretrained` / `from_pretrained` (config.json +
diffusion_pytorch_model.safetensors); `from_decovae(folder)` converts this package's weights.

A packed latent does not record the video's length or size: decode takes `num_frames` (default:
whole GOPs, G * keyframe_interval) and gives frames of h * 16 x w * 16 pixels, to be cropped by
the caller if the video was not a multiple of 16.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

from decovae_fast.models import DeCoLatent, DeCoVAE, DeCoVAEConfig, DiagonalGaussian, load_pretrained

_LOGVAR_PADDING = -30.0  # a short last GOP's missing steps: a deterministic zero in a sample


class AutoencoderDeCo(ModelMixin, ConfigMixin):
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, decovae_config: dict | None = None, latents_mean: list | None = None,
                 latents_std: list | None = None, fixed_gops: bool = True):
        super().__init__()
        cfg = DeCoVAEConfig.from_dict(dict(decovae_config or {}))
        if latents_mean is not None:  # the diffusers config is the one a pipeline reads
            cfg.latents_mean, cfg.latents_std = tuple(latents_mean), tuple(latents_std)
        self.vae = DeCoVAE(cfg)
        self.layout = cfg.pack_layout()

    @classmethod
    def from_decovae(cls, directory=None) -> "AutoencoderDeCo":
        """This package's weights folder (default: the bundled weights) as an AutoencoderDeCo."""
        vae = load_pretrained(directory)
        if not isinstance(vae, DeCoVAE):
            raise ValueError(f"{directory}: AutoencoderDeCo wraps a DeCoVAE, not {type(vae).__name__}")
        d = vae.config.to_dict()
        mean, std = d.pop("latents_mean"), d.pop("latents_std")
        model = cls(decovae_config=d, latents_mean=None if mean is None else list(mean),
                    latents_std=None if std is None else list(std))
        model.vae.load_state_dict(vae.state_dict())
        return model.to(vae.dtype).eval()

    def enable_tiling(self, tile_size: int | None = None, halo: int | None = None) -> None:
        self.vae.enable_tiling(tile_size, halo)

    def disable_tiling(self) -> None:
        self.vae.disable_tiling()

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """x (B, 3, T, H, W) in [-1, 1] -> the posterior over the packed latent (B, C, G, h, w)."""
        latent = self.vae.encode(x, fixed_gops=self.config.fixed_gops)
        logvars = DeCoLatent(*(None if g is None else DiagonalGaussian(g.logvar)
                               for g in (latent.keyframe, latent.motion, latent.residual)),
                             latent.gop_starts, latent.frames, latent.height, latent.width)
        logvar = logvars.pack(self.layout)
        logvar[:, ~self.layout.valid(latent.frames)] = _LOGVAR_PADDING
        posterior = DiagonalGaussianDistribution(torch.cat([latent.pack(self.layout), logvar], 1))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, num_frames: int | None = None):
        """z (B, C, G, h, w) -> DecoderOutput(sample=(B, 3, T, h*16, w*16)), T = num_frames or
        G * keyframe_interval."""
        G, h, w = z.shape[2:]
        frames = G * self.layout.keyframe_interval if num_frames is None else int(num_frames)
        cell = self.layout.cell
        latent = DeCoLatent.unpack(z.to(self.vae.dtype), self.layout, frames, h * cell, w * cell)
        video = self.vae.decode(latent)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict, num_frames=sample.shape[2])

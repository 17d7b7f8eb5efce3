"""PlainCausalVAE: the ablation baseline. One RGB encoder (causal 3-D, 4x temporal, 8x spatial) and
DeCo-VAE's decoder trunk, coded in the same independent segments of keyframe_interval frames
(no adaptive cuts). A segment of 1 + 4k frames gives 1 + k latent frames: the first frame is fed to
the encoder 4 times (so it fills a whole temporal group, as causal video VAEs do with their first
frame), the others in groups of 4. In the DeCoLatent, `keyframe` holds each segment's first latent
frame and `residual` its other latent frames (RGB content here, not a residual); motion is None.
"""
from __future__ import annotations

import torch

from decovae_fast._memory import release_freed_memory
from decovae_fast.models.base import FrameGroups, VAEOutput, VideoVAEBase, check_chunk, check_video, split_gops
from decovae_fast.models.config import PlainVAEConfig
from decovae_fast.models.decoder import DecoderTrunk
from decovae_fast.models.encoders import Encoder
from decovae_fast.models.latent import DeCoLatent, DiagonalGaussian
from decovae_fast.models.layers import StreamCache, replicate_pad
from decovae_fast.models.patch_linear import PatchLinear


class PlainCausalVAE(VideoVAEBase):
    config_class = PlainVAEConfig
    spatial_compression_ratio = 8

    def __init__(self, config: PlainVAEConfig | None = None):
        config = PlainVAEConfig() if config is None else config
        super().__init__(config)
        c = config
        self.encoder = Encoder(3, c.latent_channels, c.encoder_channels, c.encoder_blocks, (1, 3, 3), stem=2,
                               time_down=(True, True))
        self.decoder = DecoderTrunk(c.latent_channels, c.latent_channels, c.latent_channels, 3,
                                    c.decoder_channels, c.decoder_blocks)
        # linear patch codes of the first frame and of each group of 4 frames (see DeCoVAE's
        # linear_paths); the learned head and decoder outputs then start at zero
        self.first_linear = PatchLinear(c.latent_channels) if c.linear_path else None
        self.inner_linear = PatchLinear(c.latent_channels, frames=4) if c.linear_path else None
        if c.linear_path:
            with torch.no_grad():
                half = self.encoder.head.weight.shape[0] // 2
                self.encoder.head.weight[:half].zero_()
                self.encoder.head.bias[:half].zero_()
                for conv in (self.decoder.first_head, self.decoder.rest_head):
                    conv.weight.zero_()
                    conv.bias.zero_()

    def _encode(self, x, caches, tiles, first: bool = False):
        def enc(f, i):
            moments = self.encoder(f, caches.setdefault(i, StreamCache()))
            if self.first_linear is None:
                return moments
            mean, logvar = moments.chunk(2, dim=1)
            lin = self.first_linear.encode(f[:, :, :1]) if first else self.inner_linear.encode(f)
            return torch.cat([mean + lin, logvar], 1)

        return self._tiled(enc, [(x, 1)], 8, tiles)

    def encode_stream(self, chunks, on_gop=None, fixed_gops: bool = True):
        """Yield one DeCoLatent piece per segment from an iterable of (B, 3, t, H, W) chunks.
        on_gop is DeCoVAE's hook for the decomposition; a plain VAE has none and never calls it.
        Its segments are always fixed (fixed_gops is accepted for the common interface)."""
        seg, size = None, None
        for chunk in chunks:
            size = check_chunk(chunk, size)
            x = replicate_pad(chunk.to(self.dtype), 8)
            tiles = self._tiles(x.shape[3], x.shape[4])
            i = 0
            while i < x.shape[2]:
                if seg is None:
                    first = x[:, :, i:i + 1]
                    caches = {}
                    seg = {"n": 1, "caches": caches, "tiles": tiles, "groups": FrameGroups(),
                           "first": self._encode(first.expand(-1, -1, 4, -1, -1), caches, tiles, first=True),
                           "inner": []}
                    i += 1
                    continue
                room = self.config.keyframe_interval - seg["n"]
                if room == 0:
                    release_freed_memory()
                    yield self._finish(seg, size)
                    seg = None
                    continue
                part = x[:, :, i:i + room]
                seg["n"] += part.shape[2]
                i += part.shape[2]
                ready = seg["groups"].push(part)
                if ready:
                    seg["inner"].append(self._encode(ready[0], seg["caches"], tiles))
        if seg is None:
            raise ValueError("no frames to encode")
        yield self._finish(seg, size)

    def _finish(self, seg, size):
        rest = seg["groups"].flush()  # the last inner frames, padded to a whole group
        if rest:
            seg["inner"].append(self._encode(rest[0], seg["caches"], seg["tiles"]))
        first = seg["first"]
        inner = torch.cat([first[:, :, :0]] + seg["inner"], 2)
        B, H, W = size
        return DeCoLatent(DiagonalGaussian.from_moments(first), None, DiagonalGaussian.from_moments(inner), [0],
                          seg["n"], H, W, info={"config_hash": self.config_hash()})

    def _check_latent(self, latent: DeCoLatent) -> None:
        ch = self.config.latent_channels
        for name in ("keyframe", "residual"):
            g = getattr(latent, name)
            if g is None or g.mean.dim() != 5 or g.mean.shape[1] != ch:
                raise ValueError(f"PlainCausalVAE latent needs a {name} part of shape (B, {ch}, T, h, w)")
        if latent.keyframe.mean.shape[2] != len(latent.gop_starts):
            raise ValueError(f"latent has {latent.keyframe.mean.shape[2]} first frames but {len(latent.gop_starts)} segments")
        if latent.residual.mean.shape[2] != sum(latent.inner_steps()):
            raise ValueError("latent frames do not match its segments")

    def _decode_gop(self, n, first_z, _motion, inner_z, steps, height, width):
        dt = self.dtype
        first_z, inner_z = first_z.to(dt), inner_z.to(dt)
        tiles = self._tiles(first_z.shape[3] * 8, first_z.shape[4] * 8)
        caches = {}

        def first(z, i):
            img = self.decoder.forward_first(z, caches.setdefault(i, StreamCache()))
            return img if self.first_linear is None else img + self.first_linear.decode(z)

        def rest(z, ctx, i):
            out = self.decoder.forward_rest(z, ctx, caches.setdefault(i, StreamCache()))
            return out if self.inner_linear is None else out + self.inner_linear.decode(z)

        img = self._tiled(first, [(first_z, 8)], 1, tiles)
        yield {"frames": img}
        k, left = inner_z.shape[2], n - 1
        steps = steps or max(k, 1)
        for s in range(0, k, steps):
            out = self._tiled(rest, [(inner_z[:, :, s:s + steps], 8), (first_z, 8)], 1, tiles)[:, :, :left]
            left -= out.shape[2]
            yield {"frames": out}

    def forward(self, video: torch.Tensor, sample_posterior: bool = False, generator=None) -> VAEOutput:
        check_video(video)
        H, W = video.shape[3:]
        latent = DeCoLatent.concat(list(self.encode_stream([video])))
        pick = (lambda g: g.sample(generator)) if sample_posterior else (lambda g: g.mode())
        outs = []
        for n, first, _, inner in split_gops(latent):
            outs.extend(o["frames"] for o in self._decode_gop(n, pick(first), None, pick(inner), None, H, W))
        return VAEOutput(torch.cat(outs, 2)[..., :H, :W], latent, {})

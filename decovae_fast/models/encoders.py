"""Encoders: a stem (space_to_depth), stages of ResBlocks with 2x downsampling between them (2x in
time too where asked), and a head giving the diagonal Gaussian's (mean, logvar) moments."""
from __future__ import annotations

from torch import nn

from decovae_fast.models.layers import CausalConv3d, Downsample, ResBlock, space_to_depth


class Encoder(nn.Module):
    """(B, cin, T, H, W) -> moments (B, 2*latent, T / tf, H / (stem*4), W / (stem*4)).

    channels/blocks/kts: per stage (3 stages, 2x spatial between them); time_down: per transition,
    whether it also halves time (tf = 2 ** sum(time_down)). Stateful (kt > 1) layers take a cache."""

    def __init__(self, cin: int, latent: int, channels, blocks, kts, stem: int = 2, time_down=(False, False)):
        super().__init__()
        self.stem_factor = stem
        self.stem = CausalConv3d(cin * stem * stem, channels[0], (1, 3, 3))
        self.stages = nn.ModuleList(
            nn.ModuleList(ResBlock(c, kt) for _ in range(n)) for c, n, kt in zip(channels, blocks, kts))
        self.downs = nn.ModuleList(Downsample(channels[i], channels[i + 1], time_down[i]) for i in range(2))
        self.head = CausalConv3d(channels[-1], 2 * latent, (1, 3, 3), pre_norm=True)
        self.time_factor = 2 ** sum(bool(t) for t in time_down)

    def forward(self, x, cache=None):
        h = self.stem(space_to_depth(x, self.stem_factor))
        for i, stage in enumerate(self.stages):
            if i:
                h = self.downs[i - 1](h)
            for block in stage:
                h = block(h, cache)
        return self.head(h)


def keyframe_encoder(cfg) -> Encoder:
    """2-D (per-frame), 8x spatial."""
    return Encoder(3, cfg.keyframe_channels, cfg.encoder_channels, cfg.encoder_blocks, (1, 1, 1), stem=2)


def residual_encoder(cfg) -> Encoder:
    """Causal 3-D, 4x temporal, 8x spatial."""
    return Encoder(3, cfg.residual_channels, cfg.encoder_channels, cfg.encoder_blocks, (1, 3, 3), stem=2,
                   time_down=(True, True))


def motion_encoder(cfg) -> Encoder:
    """Causal 3-D, 4x temporal, 16x spatial (motion is smooth)."""
    return Encoder(3, cfg.motion_channels, cfg.motion_encoder_channels, (1, 1, 1), (3, 3, 3), stem=4,
                   time_down=(True, True))

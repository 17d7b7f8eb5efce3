"""The shared causal 3-D decoder trunk.

A GOP's latent is a sequence of 1 + k steps at 1/8 resolution: step 0 is the keyframe latent, steps
1..k the inner latents (motion upsampled to 1/8 and residual, concatenated, plus a projection of the
keyframe latent as context). The trunk runs causal ResBlocks over the steps, expands every inner step
to 4 frames (channels_to_time), so 1 + k steps give 1 + 4k frames, then upsamples 2x twice with
ResBlocks and a head at 1/2 resolution whose channels become full-resolution pixels
(depth_to_space). The keyframe step goes through `first_head` (RGB), the inner frames through
`rest_head` (DeCo-VAE: motion + residual; the plain VAE: RGB). Feed step 0 first, then the inner steps
in any chunks of whole steps, with one StreamCache: the result equals the whole GOP at once.
"""
from __future__ import annotations

import torch
from torch import nn

from decovae_fast.models.layers import CausalConv3d, ResBlock, Upsample, channels_to_time, depth_to_space


class DecoderTrunk(nn.Module):
    def __init__(self, first_ch: int, rest_ch: int, ctx_ch: int, rest_out: int, channels, blocks,
                 kts=(3, 3, 1)):
        super().__init__()
        c2, c1, c0 = channels  # coarse (1/8) to fine (1/2)
        self.in_first = CausalConv3d(first_ch, c2, (1, 3, 3))
        self.in_rest = CausalConv3d(rest_ch, c2, (1, 3, 3))
        self.in_ctx = CausalConv3d(ctx_ch, c2, (1, 1, 1))
        self.low = nn.ModuleList(ResBlock(c2, kts[0]) for _ in range(blocks[0]))
        self.time_up = CausalConv3d(c2, 4 * c2, (1, 1, 1), pre_norm=True)
        self.up1 = Upsample(c2, c1)
        self.mid = nn.ModuleList(ResBlock(c1, kts[1]) for _ in range(blocks[1]))
        self.up2 = Upsample(c1, c0)
        self.high = nn.ModuleList(ResBlock(c0, kts[2]) for _ in range(blocks[2]))
        self.first_head = CausalConv3d(c0, 3 * 4, (1, 3, 3), pre_norm=True)
        self.rest_head = CausalConv3d(c0, rest_out * 4, (1, 3, 3), pre_norm=True)

    def _run(self, blocks, h, cache):
        for block in blocks:
            h = block(h, cache)
        return h

    def _upper(self, h, cache):
        h = self._run(self.mid, self.up1(h), cache)
        return self._run(self.high, self.up2(h), cache)

    def forward_first(self, z: torch.Tensor, cache=None) -> torch.Tensor:
        """Keyframe latent (B, Cf, 1, h, w) -> RGB (B, 3, 1, 8h, 8w)."""
        h = self._run(self.low, self.in_first(z), cache)
        return depth_to_space(self.first_head(self._upper(h, cache)), 2)

    def forward_rest(self, z: torch.Tensor, ctx: torch.Tensor, cache=None) -> torch.Tensor:
        """Inner latents (B, Cr, k, h, w) + context (B, Cc, 1, h, w) -> (B, rest_out, 4k, 8h, 8w)."""
        h = self.in_rest(z) + self.in_ctx(ctx)
        h = self._run(self.low, h, cache)
        h = channels_to_time(self.time_up(h), 4)
        return depth_to_space(self.rest_head(self._upper(h, cache)), 2)

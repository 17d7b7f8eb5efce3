"""Building blocks of the models. Every convolution goes through decovae_fast.ops.causal_conv3d
(with its fused RMSNorm + SiLU prologue and residual epilogue), so the models speed up with the
kernels. Norms are per position (RMSNorm over channels), never over time, so streaming is exact.

Streaming state is explicit: a StreamCache maps each causal layer (the module object itself) to the
last kt-1 input frames it saw. Passing cache=None processes a whole sequence from its start.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from decovae_fast import ops


class StreamCache:
    """Per-layer streaming state: {layer: last kt-1 input frames}. One per independent stream
    (a GOP, a tile of a GOP); start a fresh one at every stream start."""

    def __init__(self):
        self._frames: dict[nn.Module, torch.Tensor] = {}

    def get(self, layer: nn.Module) -> torch.Tensor | None:
        return self._frames.get(layer)

    def set(self, layer: nn.Module, frames: torch.Tensor) -> None:
        self._frames[layer] = frames

    def __len__(self) -> int:
        return len(self._frames)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._frames.values())


class CausalConv3d(nn.Module):
    """y = [residual +] [SiLU](conv([SiLU](RMSNorm(x))) + bias), causal in time, 'same' in space.

    kernel (kt, k, k); kt = 1 makes it a per-frame 2-D convolution (no state)."""

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1), pre_norm: bool = False,
                 post_silu: bool = False, init_scale: float = 1.0):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.kernel, self.stride = kernel, tuple(stride)
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.norm_weight = nn.Parameter(torch.ones(cin)) if pre_norm else None
        self.post_silu = post_silu
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        with torch.no_grad():
            self.weight.mul_(init_scale)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None, residual=None) -> torch.Tensor:
        stateful = cache is not None and self.kernel[0] > 1
        y, new = ops.causal_conv3d(x, self.weight, self.bias, self.stride, cache.get(self) if stateful else None,
                                   norm_weight=self.norm_weight, prologue_silu=self.norm_weight is not None,
                                   epilogue_silu=self.post_silu, residual=residual)
        if stateful:
            cache.set(self, new)
        return y


class ResBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))), both convs fused with their norm."""

    def __init__(self, channels: int, kt: int = 3):
        super().__init__()
        self.conv1 = CausalConv3d(channels, channels, (kt, 3, 3), pre_norm=True)
        self.conv2 = CausalConv3d(channels, channels, (kt, 3, 3), pre_norm=True, init_scale=0.1)

    def forward(self, x, cache=None):
        return self.conv2(self.conv1(x, cache), cache, residual=x)


def space_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B,C,T,H,W) -> (B,C*f*f,T,H/f,W/f)."""
    if f == 1:
        return x
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // f, f, W // f, f).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(B, C * f * f, T, H // f, W // f)


def depth_to_space(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B,C*f*f,T,H,W) -> (B,C,T,H*f,W*f)."""
    if f == 1:
        return x
    B, C, T, H, W = x.shape
    x = x.reshape(B, C // (f * f), f, f, T, H, W).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(B, C // (f * f), T, H * f, W * f)


def time_to_channels(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B,C,T,H,W) -> (B,C*f,T/f,H,W): frames f*i .. f*i+f-1 become one step (causal grouping)."""
    if f == 1:
        return x
    B, C, T, H, W = x.shape
    if T % f:
        raise ValueError(f"{T} frames cannot be grouped by {f}")
    return x.reshape(B, C, T // f, f, H, W).transpose(2, 3).reshape(B, C * f, T // f, H, W)


def channels_to_time(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B,C*f,T,H,W) -> (B,C,T*f,H,W), the inverse of time_to_channels."""
    if f == 1:
        return x
    B, C, T, H, W = x.shape
    return x.reshape(B, C // f, f, T, H, W).transpose(2, 3).reshape(B, C // f, T * f, H, W)


class Downsample(nn.Module):
    """2x spatial (strided conv), optionally 2x temporal (two frames grouped into channels first)."""

    def __init__(self, cin: int, cout: int, time: bool):
        super().__init__()
        self.time = 2 if time else 1
        self.conv = CausalConv3d(cin * self.time, cout, (1, 3, 3), stride=(1, 2, 2), pre_norm=True)

    def forward(self, x, cache=None):
        return self.conv(time_to_channels(x, self.time))


class Upsample(nn.Module):
    """2x spatial (conv + depth_to_space), optionally 2x temporal (channels_to_time)."""

    def __init__(self, cin: int, cout: int, time: bool = False):
        super().__init__()
        self.time = 2 if time else 1
        self.conv = CausalConv3d(cin, cout * 4 * self.time, (1, 3, 3), pre_norm=True)

    def forward(self, x, cache=None):
        return depth_to_space(channels_to_time(self.conv(x), self.time), 2)


def replicate_pad(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Replicate-pad H and W of (B,C,T,H,W) up to multiples of factor."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % factor, (-W) % factor
    if ph == 0 and pw == 0:
        return x
    B, C, T = x.shape[:3]
    y = torch.nn.functional.pad(x.reshape(B, C * T, H, W), (0, pw, 0, ph), mode="replicate")
    return y.reshape(B, C, T, H + ph, W + pw)

"""Public ops of decovae_fast. Each validates its arguments (errors name the argument), then runs
on the backend chosen by decovae_fast.ops._backend: reference, cpu, cuda or triton.

Layout: frames and video (B, C, T, H, W); motion (B, 3, T, H, W) with channels [u, v, s] (u, v in
pixels, s a level of the Gaussian volume); volume (B, C, L+1, H, W).
"""
from __future__ import annotations

import torch

from decovae_fast import _ext
from decovae_fast.ops import reference
from decovae_fast.ops._backend import BACKENDS, backend_for, backends, forced_backend, implements, use_backend

if _ext.cpu_compiled():
    from decovae_fast.ops import _library  # noqa: F401  (fake kernels + autograd)
    import decovae_fast.ops.triton  # noqa: F401  (registers Triton kernels for the CUDA key)

OPS = ("gaussian_volume", "warp_residual", "warp_add", "causal_conv3d")  # the public ops, by name

__all__ = [*OPS, "OPS", "backends", "use_backend", "backend_for", "forced_backend", "implements", "BACKENDS",
           "reference"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, t, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _same_device(**tensors) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {dev}")
    return dev


def _same_dtype(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    for k, v in items[1:]:
        if v.dtype != items[0][1].dtype:
            raise ValueError(f"{k} has dtype {v.dtype} but {items[0][0]} has {items[0][1].dtype}")


def _call(op: str, device: torch.device, *args):
    backend = backend_for(op, device)
    if backend == "reference":
        return getattr(reference, op)(*args)
    if backend == "triton":
        from decovae_fast.ops.triton import TRITON_OPS

        return TRITON_OPS[op](*args)
    return getattr(torch.ops.decovae, op)(*args)


def gaussian_volume(x0: torch.Tensor, levels: int = 5, sigma0: float = 1.0) -> torch.Tensor:
    """(B,C,H,W) keyframe -> (B,C,L+1,H,W) Gaussian scale space (level 0 = x0)."""
    _tensor("x0", x0, 4)
    if not isinstance(levels, int) or levels < 0:
        raise ValueError(f"levels must be a non-negative int, got {levels!r}")
    if not sigma0 > 0:
        raise ValueError(f"sigma0 must be > 0, got {sigma0!r}")
    return _call("gaussian_volume", x0.device, x0, levels, float(sigma0))


def _check_warp(volume, motion, frames, frames_name):
    _tensor("volume", volume, 5)
    _tensor("motion", motion, 5)
    _tensor(frames_name, frames, 5)
    B, C, T, H, W = frames.shape
    if volume.shape[0] != B or volume.shape[1] != C or volume.shape[3:] != (H, W):
        raise ValueError(f"volume shape {tuple(volume.shape)} does not match {frames_name} "
                         f"{tuple(frames.shape)}: expected ({B}, {C}, L+1, {H}, {W})")
    if tuple(motion.shape) != (B, 3, T, H, W):
        raise ValueError(f"motion must have shape ({B}, 3, {T}, {H}, {W}), got {tuple(motion.shape)}")
    # motion may stay fp32 beside fp16/bf16 frames: a flow of 100 px has 0.5 px steps in bf16.
    _same_dtype(volume=volume, **{frames_name: frames})
    return _same_device(volume=volume, motion=motion, **{frames_name: frames})


def warp_residual(volume, motion, frames, return_prediction: bool = False):
    """residual = frames - sample(volume, motion); with return_prediction, (residual, prediction)."""
    device = _check_warp(volume, motion, frames, "frames")
    residual = _call("warp_residual", device, volume, motion, frames)
    if return_prediction:
        return residual, (frames.float() - residual.float()).to(frames.dtype)
    return residual


def warp_add(volume, motion, residual):
    """frames = sample(volume, motion) + residual (the decoder's recoupling)."""
    device = _check_warp(volume, motion, residual, "residual")
    return _call("warp_add", device, volume, motion, residual)


def causal_conv3d(x, weight, bias=None, stride=(1, 1, 1), cache=None, *, norm_weight=None, eps=1e-6,
                  prologue_silu=False, epilogue_silu=False, residual=None):
    """Causal 3-D convolution with optional fused prologue and epilogue; returns (y, new_cache).

    y = [residual +] [SiLU](conv([cache, [SiLU]([RMSNorm](x))]) + bias). Feeding a video chunk by
    chunk with the returned caches equals the whole video at once when every chunk but the last has
    a multiple of stride[0] frames. Gradients do not flow through the returned cache.
    """
    _tensor("x", x, 5)
    _tensor("weight", weight, 5)
    B, C, T, H, W = x.shape
    cout, cin, kt, kh, kw = weight.shape
    if cin != C:
        raise ValueError(f"weight has {cin} input channels but x has {C}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"weight's spatial kernel must be odd for 'same' padding, got {kh}x{kw}")
    stride = (stride,) * 3 if isinstance(stride, int) else tuple(int(s) for s in stride)
    if len(stride) != 3 or min(stride) < 1:
        raise ValueError(f"stride must be a positive int or 3 positive ints, got {stride!r}")
    if bias is not None and tuple(_tensor("bias", bias, 1).shape) != (cout,):
        raise ValueError(f"bias must have shape ({cout},), got {tuple(bias.shape)}")
    if cache is not None and tuple(_tensor("cache", cache, 5).shape) != (B, C, kt - 1, H, W):
        raise ValueError(f"cache must have shape ({B}, {C}, {kt - 1}, {H}, {W}), got {tuple(cache.shape)}")
    if norm_weight is not None and tuple(_tensor("norm_weight", norm_weight, 1).shape) != (C,):
        raise ValueError(f"norm_weight must have shape ({C},), got {tuple(norm_weight.shape)}")
    if residual is not None:
        want = (B, cout, (T - 1) // stride[0] + 1, (H - 1) // stride[1] + 1, (W - 1) // stride[2] + 1)
        if tuple(_tensor("residual", residual, 5).shape) != want:
            raise ValueError(f"residual must have the output's shape {want}, got {tuple(residual.shape)}")
    tensors = dict(x=x, weight=weight, bias=bias, cache=cache, norm_weight=norm_weight, residual=residual)
    _same_dtype(**tensors)
    device = _same_device(**tensors)
    return _call("causal_conv3d", device, x, weight, bias, list(stride), cache, norm_weight, float(eps),
                 bool(prologue_silu), bool(epilogue_silu), residual)

"""Fake (meta) kernels and autograd of the torch.ops.decovae ops, whose schemas live in
csrc/registration.cpp. Imported once by decovae_fast.ops when the extension is built."""
from __future__ import annotations

import torch

lib = "decovae"


def _conv_out(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # causal in time, "same" padding in space


# ---- fake kernels: output shapes for torch.compile / meta tensors -------------------------------

@torch.library.register_fake(f"{lib}::gaussian_volume")
def _(x0, levels, sigma0):
    B, C, H, W = x0.shape
    return x0.new_empty(B, C, levels + 1, H, W)


@torch.library.register_fake(f"{lib}::gaussian_volume_backward")
def _(grad_volume, levels, sigma0):
    B, C, _, H, W = grad_volume.shape
    return grad_volume.new_empty(B, C, H, W)


@torch.library.register_fake(f"{lib}::warp_residual")
def _(volume, motion, frames):
    return torch.empty_like(frames, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{lib}::warp_add")
def _(volume, motion, residual):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{lib}::warp_sample_backward")
def _(grad_prediction, volume, motion, volume_grad, motion_grad):
    return (torch.empty_like(volume, memory_format=torch.contiguous_format),
            torch.empty_like(motion, memory_format=torch.contiguous_format))


@torch.library.register_fake(f"{lib}::causal_conv3d")
def _(x, weight, bias, stride, cache, norm_weight, eps, prologue_silu, epilogue_silu, residual):
    B, C, T, H, W = x.shape
    kt = weight.shape[2]
    y = x.new_empty(B, weight.shape[0], _conv_out(T, stride[0]), _conv_out(H, stride[1]),
                    _conv_out(W, stride[2]))
    return y, x.new_empty(B, C, kt - 1, H, W)


@torch.library.register_fake(f"{lib}::causal_conv3d_backward")
def _(grad_y, x, weight, bias, stride, cache, norm_weight, eps, prologue_silu, epilogue_silu,
      output_mask):
    def like(t, need):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if (need and t is not None) else None
    return (like(x, output_mask[0]), like(weight, output_mask[1]), like(bias, output_mask[2]),
            like(cache, output_mask[3]), like(norm_weight, output_mask[4]))


# ---- autograd ------------------------------------------------------------------------------------

def _gv_setup(ctx, inputs, output):
    _, ctx.levels, ctx.sigma0 = inputs


def _gv_backward(ctx, grad):
    return torch.ops.decovae.gaussian_volume_backward(grad.contiguous(), ctx.levels, ctx.sigma0), None, None


torch.library.register_autograd(f"{lib}::gaussian_volume", _gv_backward, setup_context=_gv_setup)


def _warp_setup(ctx, inputs, output):
    volume, motion, _ = inputs
    ctx.save_for_backward(volume, motion)


def _warp_grads(ctx, grad_prediction):
    volume, motion = ctx.saved_tensors
    need_v, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_v or need_m):
        return None, None
    gv, gm = torch.ops.decovae.warp_sample_backward(grad_prediction.contiguous(), volume, motion, need_v, need_m)
    return (gv if need_v else None), (gm if need_m else None)


def _warp_residual_backward(ctx, grad):
    gv, gm = _warp_grads(ctx, -grad)
    return gv, gm, grad


def _warp_add_backward(ctx, grad):
    gv, gm = _warp_grads(ctx, grad)
    return gv, gm, grad


torch.library.register_autograd(f"{lib}::warp_residual", _warp_residual_backward, setup_context=_warp_setup)
torch.library.register_autograd(f"{lib}::warp_add", _warp_add_backward, setup_context=_warp_setup)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, cache, norm_weight, eps, pro_silu, epi_silu, residual = inputs
    ctx.save_for_backward(x, weight, bias, cache, norm_weight)
    ctx.args = (stride, eps, pro_silu, epi_silu)
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(output[1])  # gradients do not flow through the returned cache


def _conv_backward(ctx, grad_y, _grad_cache):
    x, weight, bias, cache, norm_weight = ctx.saved_tensors
    stride, eps, pro_silu, epi_silu = ctx.args
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and bias is not None, need[4] and cache is not None,
            need[5] and norm_weight is not None]
    gx = gw = gb = gc = gn = None
    if any(mask):
        gx, gw, gb, gc, gn = torch.ops.decovae.causal_conv3d_backward(
            grad_y.contiguous(), x, weight, bias, stride, cache, norm_weight, eps, pro_silu, epi_silu, mask)
    g_res = grad_y if (ctx.has_residual and need[9]) else None
    return gx, gw, gb, None, gc, gn, None, None, None, g_res


torch.library.register_autograd(f"{lib}::causal_conv3d", _conv_backward, setup_context=_conv_setup)

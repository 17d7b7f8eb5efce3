"""The stage losses: motion (stage 0: photometric warp, smoothness, distillation of DIS flow),
autoencoder (L1 + SSIM + KL + the decoded parts against their targets) and image (the keyframe path
on single frames). Each is loss_fn(model, video, cfg) -> {"loss": total, term: value, ...}."""
from __future__ import annotations

import torch

from decovae_fast.errors import UserError
from decovae_fast.eval import metrics
from decovae_fast.training.config import TrainConfig


def recon_loss(x, y, ssim_weight):
    l1 = (x - y).abs().mean()
    ss = metrics.ssim(x, y).mean() if ssim_weight > 0 else x.new_zeros(())
    return l1, 1 - ss


def smoothness(motion: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Edge-aware first-order smoothness of the motion field (B,3,T,H,W)."""
    gx = (motion[..., :, 1:] - motion[..., :, :-1]).abs()
    gy = (motion[..., 1:, :] - motion[..., :-1, :]).abs()
    ix = (frames[..., :, 1:] - frames[..., :, :-1]).abs().mean(1, keepdim=True)
    iy = (frames[..., 1:, :] - frames[..., :-1, :]).abs().mean(1, keepdim=True)
    return (gx * torch.exp(-10 * ix)).mean() + (gy * torch.exp(-10 * iy)).mean()


def motion_losses(model, video, cfg: TrainConfig) -> dict:
    """Stage 0: the motion estimator alone, keyframe = the clip's first frame (one GOP)."""
    from decovae_fast import ops
    from decovae_fast.models.motion import dis_flow

    keyframe = video[:, :, 0]
    motion = model.motion_estimator(video, keyframe).float()
    volume = ops.gaussian_volume(keyframe.float(), model.config.volume_levels, model.config.volume_sigma0)
    residual = ops.warp_residual(volume, motion, video.float())
    photo = (residual.pow(2) + 1e-6).sqrt().mean()   # Charbonnier
    terms = {"photo": photo, "smooth": smoothness(motion, video)}
    if cfg.distill_weight > 0:
        teacher = dis_flow(video, keyframe).to(video.device)
        terms["distill"] = (motion[:, :2] - teacher).abs().mean()
    total = cfg.photo_weight * photo + cfg.smooth_weight * terms["smooth"] \
        + cfg.distill_weight * terms.get("distill", 0.0)
    return {"loss": total, **terms}


def autoencoder_losses(model, video, cfg: TrainConfig) -> dict:
    out = model(video, sample_posterior=True)
    with torch.autocast(video.device.type, enabled=False):  # SSIM's variances cancel catastrophically in bf16
        return _autoencoder_terms(out, video.float(), cfg)


def image_losses(model, video, cfg: TrainConfig) -> dict:
    """The keyframe path alone, every frame of the batch an image: keyframe encoder (and linear
    code) -> posterior sample -> the decoder's keyframe head. No motion, residual or temporal work,
    so a step sees every pixel-frame of the batch at a fraction of a video step's cost (the
    training-throughput lever of issue 18; rows train.* in `decovae bench`)."""
    from decovae_fast.models import DeCoVAE
    from decovae_fast.models.latent import DiagonalGaussian
    from decovae_fast.models.layers import StreamCache

    if not isinstance(model, DeCoVAE):
        raise UserError("the image stage (loss = 'image') trains a DeCoVAE's keyframe path")
    B, C, T, H, W = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(B * T, C, 1, H, W)
    post = DiagonalGaussian.from_moments(model._keyframe_moments(frames))
    recon = model._keyframe_image(post.sample(), StreamCache())
    with torch.autocast(video.device.type, enabled=False):
        return _recon_kl_terms(recon.float(), frames.float(), post.kl(), cfg)


LOSSES = {"motion": motion_losses, "autoencoder": autoencoder_losses, "image": image_losses}


def _recon_kl_terms(recon, target, kl, cfg: TrainConfig) -> dict:
    """L1 + SSIM weight x (1 - SSIM) + KL weight x KL per input element, and those terms."""
    l1, dssim = recon_loss(recon, target, cfg.ssim_weight)
    kl = kl.float().sum() / target.numel()
    return {"loss": l1 + cfg.ssim_weight * dssim + cfg.kl_weight * kl, "l1": l1, "dssim": dssim, "kl": kl}


def _autoencoder_terms(out, video, cfg: TrainConfig) -> dict:
    terms = _recon_kl_terms(out.sample.float(), video, out.latent.kl(), cfg)
    total = terms.pop("loss")
    parts = out.parts or {}
    for name in ("keyframe", "motion", "residual"):  # DeCoVAE's decoded parts against their targets
        pred, target = parts.get(name), parts.get("target_" + name)
        if pred is None or target is None:
            continue
        err = (pred.float() - target.float()).abs().mean()
        if name == "motion":
            err = err * cfg.motion_component_scale
        terms[name] = err
        total = total + cfg.component_weight * err
    return {"loss": total, **terms}

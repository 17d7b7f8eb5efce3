"""`decovae diagnose`: where the dB are lost, stage by stage, on the held-out clips.

For each held-out clip (33 frames, short side resized to 256, centre-cropped to 256x256 by
default) it measures, in fp32 from the posterior means:

- keyframe: decoded keyframes against the true keyframes (encode -> decode of the GOP starts);
- copy: the true keyframe copied over the GOP's inner frames (what a warp must beat);
- warp (true kf, est. motion): the encoder's own prediction, the true keyframe warped with the
  motion estimator's motion (the best the inner frames can get with a zero residual);
- warp (true kf, dec. motion): the same with the decoded motion (the motion code's loss);
- warp (dec. kf, dec. motion): decoded keyframe and decoded motion, zero residual;
- full: the whole reconstruction, on the inner frames and on all frames;
- colour: PSNR of the chroma channels (Cb, Cr of BT.601) and the saturation ratio (mean of
  max - min over R, G, B per pixel, reconstruction over original);

beside trivial and closed-form floors computed on the same frames: bicubic from 1/8 (bilinear
antialiased downsample, 3 values per 8x8 block), and the PCA of 8x8x3 RGB blocks fitted on the
training frames, applied per frame with 16 coefficients (the keyframe latent's shape, 1:12) and
with 2 (1:96, about the whole latent budget). Inner-frame rows are PSNR over the frames that are
not keyframes; "all" rows over every frame. A PlainCausalVAE gets the rows that apply to it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from decovae_fast.eval import metrics
from decovae_fast.io.clips import load_eval_clips, read_clip, resolve_clip
from decovae_fast.models.patch_linear import PatchLinear, sample_patches

PCA_PATCHES = 60_000


def _psnr(x, y, frames=None) -> float:
    if frames is not None:
        x, y = x[:, :, frames], y[:, :, frames]
    if x.shape[2] == 0:
        return float("nan")
    return float(metrics.psnr(x.float().clamp(-1, 1), y.float()).mean())


def chroma(x: torch.Tensor) -> torch.Tensor:
    """(B,3,T,H,W) RGB in [-1,1] -> (B,2,T,H,W) Cb, Cr (BT.601), same units."""
    r, g, b = x.float().unbind(1)
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return torch.stack([cb, cr], 1)


def saturation(x: torch.Tensor) -> float:
    x = x.float().clamp(-1, 1)
    return float((x.amax(1) - x.amin(1)).mean())


def bicubic_floor(video: torch.Tensor, factor: int = 8) -> torch.Tensor:
    B, C, T, H, W = video.shape
    f = video.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W).float()
    small = F.interpolate(f, size=(H // factor, W // factor), mode="bilinear", antialias=True, align_corners=False)
    up = F.interpolate(small, size=(H, W), mode="bicubic", align_corners=False)
    return up.reshape(B, T, C, H, W).permute(0, 2, 1, 3, 4).clamp(-1, 1)


def fit_floor_pca(train_specs, k: int, short_side: int = 256, seed: int = 0) -> PatchLinear:
    """The PCA floor: PatchLinear of k coefficients fitted on the training clips' frames."""
    videos = [read_clip(s.path, short_side, s.start, s.stop) for s in map(resolve_clip, train_specs)]
    lin = PatchLinear(k)
    lin.init_from_pca(sample_patches(videos, PCA_PATCHES, seed=seed))
    return lin


@torch.no_grad()
def diagnose_clip(model, video: torch.Tensor, floors: dict) -> dict:
    """The rows for one clip (1,3,T,H,W) in [-1, 1]."""
    from decovae_fast import ops
    from decovae_fast.models import DeCoVAE

    T = video.shape[2]
    latent = model.encode(video)
    starts = list(latent.gop_starts)
    inner = [t for t in range(T) if t not in starts]
    row = {"gops": len(starts), "latent_elements": latent.numel()}
    if isinstance(model, DeCoVAE):
        c = model.config
        parts = model.decode_parts(latent)
        recon = parts["frames"].float()
        row["keyframe"] = _psnr(parts["keyframes"], video[:, :, starts])
        dec = model.decompose(video)
        true_kf = torch.zeros_like(video)
        dec_kf = torch.zeros_like(video)
        for g, s in enumerate(starts):
            end = starts[g + 1] if g + 1 < len(starts) else T
            true_kf[:, :, s:end] = video[:, :, s:s + 1]
            dec_kf[:, :, s:end] = parts["keyframes"][:, :, g:g + 1].float()
        row["copy"] = _psnr(true_kf, video, inner)
        row["warp_true_kf_est_motion"] = _psnr(dec["prediction"], video, inner)

        def warp(kf_frames, motion):
            out = torch.empty_like(video)
            for g, s in enumerate(starts):
                end = starts[g + 1] if g + 1 < len(starts) else T
                vol = ops.gaussian_volume(kf_frames[:, :, s], c.volume_levels, c.volume_sigma0)
                out[:, :, s:end] = ops.warp_add(vol, motion[:, :, s:end].float(), torch.zeros_like(video[:, :, s:end]))
            return out

        row["warp_true_kf_dec_motion"] = _psnr(warp(true_kf, parts["motion"]), video, inner)
        row["warp_dec_kf_dec_motion"] = _psnr(warp(dec_kf, parts["motion"]), video, inner)
        est = dec["motion"].float()
        row["motion_error_px"] = float((parts["motion"][:, :2, inner] - est[:, :2, inner]).abs().mean()) if inner else 0.0
    else:
        recon = model.decode(latent).float()
        row["keyframe"] = _psnr(recon[:, :, starts], video[:, :, starts])
    row["full_inner"] = _psnr(recon, video, inner)
    row["full"] = _psnr(recon, video)
    row["chroma"] = _psnr(chroma(recon), chroma(video))
    row["saturation_ratio"] = saturation(recon) / max(saturation(video), 1e-6)
    row["ssim"] = float(metrics.ssim(recon.clamp(-1, 1), video).mean())
    row["bicubic_1_8"] = _psnr(bicubic_floor(video), video)
    for name, lin in floors.items():
        row[name] = _psnr(lin.decode(lin.encode(video.float())), video)
    return row


ROWS = [  # (key, label) in table order
    ("keyframe", "keyframe alone (decoded vs true keyframes)"),
    ("copy", "copy of the true keyframe, inner frames"),
    ("warp_true_kf_est_motion", "warp: true keyframe + estimated motion, inner"),
    ("warp_true_kf_dec_motion", "warp: true keyframe + decoded motion, inner"),
    ("warp_dec_kf_dec_motion", "warp: decoded keyframe + decoded motion, inner"),
    ("full_inner", "full reconstruction, inner frames"),
    ("full", "**full reconstruction, all frames**"),
    ("ssim", "SSIM, all frames"),
    ("chroma", "chroma (Cb, Cr) PSNR"),
    ("saturation_ratio", "saturation, reconstruction / original"),
    ("bicubic_1_8", "floor: bicubic from 1/8"),
    ("pca16", "floor: PCA 16 of 8x8x3 per frame (1:12)"),
    ("pca2", "floor: PCA 2 of 8x8x3 per frame (1:96)"),
]


def table(result: dict) -> str:
    clips = [k for k in result["clips"] if k != "mean"]
    names = [k.split("[")[0].replace(".mp4", "") for k in clips]
    lines = ["| stage | " + " | ".join(names) + " | mean |", "|---|" + "---:|" * (len(names) + 1)]
    for key, label in ROWS:
        vals = [result["clips"][c].get(key) for c in clips]
        if all(v is None for v in vals):
            continue
        fmt = "{:.3f}" if key in ("ssim", "saturation_ratio") else "{:.2f}"
        cells = ["" if v is None or v != v else fmt.format(v) for v in vals]
        mean = result["clips"]["mean"].get(key)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if mean is None else fmt.format(mean)} |")
    return "\n".join(lines)


def diagnose(val, train=(), short_side: int = 256, weights=None, frames: int = 33, size: int = 256,
             floors: bool = True) -> dict:
    """The rows of every held-out clip in `val` (clip specs, io.clips.resolve_clip) and their mean;
    the PCA floors are fitted on the `train` clips at short side `short_side`."""
    from decovae_fast.models import load_pretrained

    model = load_pretrained(weights).float().eval()
    clips = load_eval_clips(val, frames, size)
    fl = {}
    if floors:
        fl = {"pca16": fit_floor_pca(train, 16, short_side), "pca2": fit_floor_pca(train, 2, short_side)}
    res = {name: diagnose_clip(model, video, fl) for name, video in clips}
    keys = {k for r in res.values() for k in r}
    res["mean"] = {k: float(np.nanmean([r[k] for r in res.values() if k in r])) for k in sorted(keys)}
    return {"weights": str(weights or "bundled"), "model_type": type(model).__name__, "frames": frames,
            "size": size, "clips": res}

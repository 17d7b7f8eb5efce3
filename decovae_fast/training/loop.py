"""The training loop: `train` runs (or resumes) the stages of a config. Each stage trains the modules
it names and freezes the rest (eval mode, requires_grad False, so they get no gradient); rank 0
validates on the held-out clips, checkpoints and saves the best and final EMA weights.

Stages (DESIGN.md): 0 motion estimator (photometric warp loss + smoothness + distillation
of OpenCV's DIS flow), then frozen; 1 keyframe encoder + decoder; 2 motion encoder; 3 residual
encoder; 4 joint."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from decovae_fast.errors import UserError
from decovae_fast.eval import metrics
from decovae_fast.io.outputs import atomic_output
from decovae_fast.training import data as D
from decovae_fast.training.checkpoint import EMA, load_optimizer_tensors, save_checkpoint
from decovae_fast.training.config import STAGE_MODULES_ALL, StageConfig, TrainConfig
from decovae_fast.training.data import train_data
from decovae_fast.training.losses import LOSSES, image_losses
from decovae_fast.training.model_init import build_model
from decovae_fast.training.runtime import amp_enabled, autocast, backend_context, distributed, resolve_device


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


def lr_at(stage: StageConfig, step_in_stage: int) -> float:
    """Linear warm-up, then cosine decay to 10% over the stage."""
    if step_in_stage < stage.warmup:
        return stage.lr * (step_in_stage + 1) / stage.warmup
    span = max(1, stage.steps - stage.warmup)
    frac = min(1.0, (step_in_stage - stage.warmup) / span)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


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


@contextlib.contextmanager
def _evaluating(module):
    """module in eval mode inside the block (its device is yielded), its training flag restored after."""
    was_training = module.training
    module.eval()
    try:
        yield next(module.parameters()).device
    finally:
        module.train(was_training)


def _with_mean(res: dict, keys: tuple) -> dict:
    """res ({clip: {key: value}}) with a "mean" entry over the clips, when there are any."""
    if res:
        res["mean"] = {k: float(np.mean([r[k] for r in res.values()])) for k in keys}
    return res


@torch.no_grad()
def evaluate(model, clips, amp: bool = False) -> dict:
    """PSNR / SSIM (dB, mean over frames) of each clip's reconstruction (posterior means)."""
    res = {}
    with _evaluating(model) as dev:
        for name, video in clips:
            video = video.to(dev)
            with autocast(amp, dev.type):
                recon = model.decode(model.encode(video))
            recon = recon.float().clamp(-1, 1)
            res[name] = {"psnr": float(metrics.psnr(recon, video).mean()),
                         "ssim": float(metrics.ssim(recon, video).mean())}
    return _with_mean(res, ("psnr", "ssim"))


@torch.no_grad()
def evaluate_motion(model, clips, gop: int, amp: bool = False) -> dict:
    """Stage 0's check: PSNR of the warped keyframe against the frames of the first GOP, next to
    the PSNR of simply copying the keyframe (the warp must beat it)."""
    from decovae_fast import ops

    me = model.motion_estimator
    res = {}
    with _evaluating(me) as dev:
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
    return _with_mean(res, ("psnr", "copy_psnr", "ssim"))


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
    with atomic_output(path) as tmp:  # the temporary name keeps .png: savefig takes the format from it
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


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

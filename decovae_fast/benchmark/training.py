"""Training-throughput rows of `decovae bench` (issue 18): one optimisation step (loss, backward,
clipping, AdamW) of each recipe on its own training data, timed interleaved in one process with the
thread count the recipes train with, so the ratios hold while the machine drifts.

Rows train.<recipe>: median_ms per step, fps (frames / s), pixel_frames_per_s (H * W * frames / s:
what a step moves through the model) and steps_per_hour. Recipes: the first bundled recipe's joint
stage (tiny_v1, the baseline the issue's 3x target is set against), the second recipe (tiny, the
bundled default now), its plain ablation, and the image stage (keyframe path on single frames,
bigger crops) that a recipe can run before the video stages.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from decovae_fast.benchmark.harness import _r, row

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# name -> (config file, stage index, loss override, (batch, frames, size) override or None)
RECIPES = {
    "tiny_v1": ("tiny_v1.toml", -1, None, None),
    "tiny": ("tiny.toml", 0, None, None),
    "plain_tiny": ("plain_tiny.toml", 0, None, None),
    "tiny_image": ("tiny.toml", 0, "image", "image"),
}


def _recipe(name: str, video_shape: tuple, image_shape: tuple):
    from decovae_fast.models import DeCoVAE, PlainCausalVAE, PlainVAEConfig
    from decovae_fast.training.config import load_config
    from decovae_fast.training.data import train_data
    from decovae_fast.training.losses import LOSSES
    from decovae_fast.training.loop import LossModule, set_stage
    from decovae_fast.training.model_init import decovae_config

    file, stage_index, loss, shape = RECIPES[name]
    cfg = load_config(CONFIGS / file)
    cfg.batch_size, cfg.frames, cfg.size = image_shape if shape == "image" else video_shape
    stage = cfg.stages[stage_index]
    if loss:
        stage.loss = loss
    mc = decovae_config(cfg)
    # fresh weights: the step's cost does not depend on them (no PCA fit, no motion_init)
    model = DeCoVAE(mc) if cfg.model_type == "decovae" else PlainCausalVAE(PlainVAEConfig.matching(mc))
    params = set_stage(model, stage)
    opt = torch.optim.AdamW(params, lr=stage.lr)
    stream = train_data(cfg, cfg.seed)
    runner = LossModule(model, LOSSES[stage.loss], cfg)
    return cfg, runner, opt, params, stream


def run_training(plan, log=lambda msg: None) -> list[dict]:
    from decovae_fast.training.loop import train_step
    from decovae_fast.dtypes import cpu_has_native_bf16
    from decovae_fast.training.runtime import backend_context

    device = torch.device("cpu")  # the recipes' device here; a GPU run trains with torchrun
    rows = []
    names = list(plan.train_recipes or RECIPES)
    dtypes = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])  # bf16 crawls without native support
    threads = torch.get_num_threads()
    for dtype in dtypes:
        built = {n: _recipe(n, plan.train_video_shape, plan.train_image_shape) for n in names}
        times = {n: [] for n in names}
        torch.set_num_threads(built[names[0]][0].threads or threads)
        try:
            for rnd in range(plan.train_rounds + 1):  # round 0 warms up
                for n in names:
                    cfg, runner, opt, params, stream = built[n]
                    video = next(stream)
                    with backend_context(cfg):
                        t0 = time.perf_counter()
                        train_step(runner, video, opt, params, cfg, dtype == "bf16", device, n)
                        dt = time.perf_counter() - t0
                    if rnd:
                        times[n].append(dt)
        finally:
            used = torch.get_num_threads()
            torch.set_num_threads(threads)
        for n in names:
            cfg = built[n][0]
            ms = 1000 * statistics.median(times[n])
            frames = cfg.batch_size * cfg.frames
            rows.append(row(name=f"train.{n}", shape=f"{cfg.batch_size}x3x{cfg.frames}x{cfg.size}x{cfg.size}",
                            dtype=dtype, backend=cfg.backend, median_ms=_r(ms), fps=_r(1000 * frames / ms),
                            pixel_frames_per_s=_r(1000 * frames * cfg.size * cfg.size / ms, 1),
                            steps_per_hour=_r(3.6e6 / ms, 1)))
            log(f"  train.{n:12s} {dtype} {ms:9.0f} ms/step  {rows[-1]['pixel_frames_per_s']:.3g} "
                f"pixel-frames/s ({used} thread{'s' if used > 1 else ''})")
    return rows


def training_table(rows: list[dict]) -> list[str]:
    base = {r["dtype"]: r["pixel_frames_per_s"] for r in rows if r["name"] == "train.tiny_v1"}
    lines = ["| training step | shape (BxCxTxHxW) | dtype | ms / step | steps / hour | pixel-frames / s "
             "| vs tiny_v1 fp32 |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ref = base.get("fp32")
        ratio = f"{r['pixel_frames_per_s'] / ref:.2f}x" if ref else ""
        lines.append(f"| {r['name']} | {r['shape']} | {r['dtype']} | {r['median_ms']:.0f} | {r['steps_per_hour']:.0f} "
                     f"| {r['pixel_frames_per_s']:.3g} | {ratio} |")
    lines += ["", "One optimisation step (loss, backward, clipping, AdamW) of each recipe on its own data, "
              "with the thread count the recipes train with (1), all recipes timed interleaved. tiny_v1: "
              "the first bundled recipe's joint stage, the baseline of issue 18's 3x target; tiny_image: the "
              "keyframe path on single frames (`loss = \"image\"`).", ""]
    return lines

"""A benchmark run: the Plan (what is measured at which shapes) and run_suite, which measures the
ceilings, the op cases, the pipeline, streaming and training rows and returns the JSON document."""
from __future__ import annotations

import dataclasses
import time

import torch

from decovae_fast.benchmark.cases import OpCase, check_case, conv_cases, gaussian_case, run_op_case, warp_cases
from decovae_fast.benchmark.harness import (COPY_MIB, Timing, _r, combine_ceilings, context, device_name, loadavg,
                                            measure_ceilings)
from decovae_fast.dtypes import DTYPES, cpu_has_native_bf16


@dataclasses.dataclass
class Plan:
    """What a run measures. quick: fewer repeats, the pipeline at 9x128x128, streaming at 64x64."""
    quick: bool
    device: torch.device
    op_dtypes: list[str]
    pipeline_shapes: list[tuple[int, int, int]]        # (T, H, W)
    warp_shapes: tuple = ((16, 256, 256), (16, 512, 512))  # (T, H, W): the sizes of the warp targets
    gaussian_shape: tuple[int, int] = (256, 256)
    conv_shapes: tuple = ((128, 128, 9, 64, 64), (32, 32, 9, 128, 128))   # (cin, cout, T, H, W)
    levels: int = 5
    timing: Timing = dataclasses.field(default_factory=Timing)
    pipeline_rounds: int = 2            # interleaved rounds after each model's first encode + decode
    pipeline_budget_s: float | None = None  # no new round once the rounds have taken this long
    ceiling_dtypes: list[str] = dataclasses.field(default_factory=lambda: list(DTYPES))
    copy_mib: int = COPY_MIB       # copy ceiling: buffer size
    matmul_n: int | None = None    # matmul ceiling: n (None: 2048 on a CPU, 4096 on a GPU)
    pipeline_models: tuple | None = None   # restrict the pipeline rows to these models (None: all)
    stream_shapes: tuple = ()      # (T, H, W) of the stream.tiny rows: a short and a long T per frame size
    stream_allocator_check: bool = False   # stream again with a fixed mmap threshold (bench_pipeline)
    train_rounds: int = 3          # training-step rows (bench_training): timed steps per recipe
    train_video_shape: tuple = (2, 17, 64)   # (batch, frames, crop size) of the video recipes
    train_image_shape: tuple = (8, 1, 128)   # the same for the image stage: 8 single 128x128 frames
    train_recipes: tuple | None = None       # restrict to these bench_training.RECIPES (None: all)
    left_out: list[str] = dataclasses.field(default_factory=list)  # rows not measured, and why


def make_plan(quick: bool, device: torch.device) -> Plan:
    plan = _make_plan(quick, device)
    if device.type == "cpu" and not cpu_has_native_bf16():
        # without native bf16 PyTorch's bf16 conv crawls (issue 21: one did not finish in 120 s),
        # and the quick bench must finish on every host: bf16 rows are left out, and the result says so
        plan.op_dtypes = [d for d in plan.op_dtypes if d != "bf16"]
        plan.ceiling_dtypes = [d for d in plan.ceiling_dtypes if d != "bf16"]
        plan.left_out.append("bf16 op rows and ceiling: this CPU has no native bf16 (avx512_bf16 or AMX)")
    return plan


def _make_plan(quick: bool, device: torch.device) -> Plan:
    if quick:
        # warmup=0: the correctness check just before the timing has called every backend once
        # pipeline: the peers take ~2 min a round on a busy 2-core CPU; the budget keeps --quick
        # under 10 minutes there (one round) and gives an idle machine a second one
        # stream: 40-60 s at 64x64 on a busy 2-core CPU (257 frames: 15 GOPs of 17, one of 2)
        return Plan(True, device, ["fp32", "bf16"], [(9, 128, 128)], timing=Timing(0, 3, 30, 1.5),
                    pipeline_rounds=2, pipeline_budget_s=120, stream_shapes=((17, 64, 64), (257, 64, 64)))
    shapes = [(9, 128, 128), (17, 256, 256)] + ([(33, 512, 512)] if device.type == "cuda" else [])
    return Plan(False, device, ["fp32", "bf16", "fp16"], shapes, timing=Timing(2, 10, 200, 5.0),
                pipeline_rounds=3, stream_shapes=((17, 256, 256), (257, 256, 256)),
                stream_allocator_check=True)


def tiny_plan(device: torch.device) -> Plan:
    """Smallest shapes through the same code (the smoke test)."""
    return Plan(True, device, ["fp32"], [(5, 32, 32)], warp_shapes=((2, 16, 20),), gaussian_shape=(16, 20),
                conv_shapes=((4, 4, 2, 8, 8),), levels=2, timing=Timing(0, 2, 2, 0.0), pipeline_rounds=1,
                ceiling_dtypes=["fp32"], copy_mib=4, matmul_n=128, pipeline_models=("tiny",),
                stream_shapes=((5, 32, 32), (21, 32, 32)), stream_allocator_check=True,
                train_rounds=1, train_video_shape=(1, 5, 32), train_image_shape=(2, 1, 32),
                train_recipes=("tiny", "tiny_image"))


def op_cases(plan: Plan) -> list[OpCase]:
    cases = []
    for dtype in plan.op_dtypes:
        for shape in plan.warp_shapes:
            cases += warp_cases(*shape, plan.levels, dtype, plan.device)
        cases.append(gaussian_case(*plan.gaussian_shape, plan.levels, dtype, plan.device))
        for shape in plan.conv_shapes:
            cases += conv_cases(*shape, dtype, plan.device)
    return cases


def run_suite(plan: Plan, *, ops: bool = True, pipeline: bool = True, peers: bool = True,
              training: bool = True, log=lambda msg: None) -> dict:
    """Measure everything the plan asks for and return the result document."""
    device = plan.device
    t0 = time.perf_counter()
    result = context(device)
    result["quick"] = plan.quick
    result["left_out"] = list(plan.left_out)
    for why in plan.left_out:
        log(f"left out: {why}")
    log(f"ceilings ({device_name(device)}, {torch.get_num_threads()} threads) ...")
    samples = [measure_ceilings(device, plan.ceiling_dtypes, plan.copy_mib, plan.matmul_n)]
    result["ceilings"] = combine_ceilings(samples)
    log(f"  copy {samples[0]['copy_gbps']} GB/s, matmul {samples[0]['matmul_gflops']} GFLOP/s")
    rows, checks = [], []
    if ops:
        for case in op_cases(plan):
            checks += check_case(case)
            new = run_op_case(case, result["ceilings"], plan.timing, device)
            rows += new
            for r in new:
                log(f"  {r['name']:22s} {r['dtype']} {r['backend']:18s} {r['median_ms']:10.3f} ms  "
                    f"x{r['speedup']:.2f} vs reference")
        bad = [c for c in checks if not c["ok"]]
        for c in bad:
            log(f"  WARNING: {c['name']} {c['dtype']} {c['backend']} differs from the reference "
                f"(max rel err {c['max_rel_err']})")
    if ops and pipeline:
        samples.append(measure_ceilings(device, plan.ceiling_dtypes, plan.copy_mib, plan.matmul_n))
    if pipeline:
        from decovae_fast.benchmark import pipeline as bench_pipeline

        prows, notes = bench_pipeline.run_pipeline(plan, peers=peers, log=log)
        rows += prows
        result["pipeline_notes"] = notes
    if training and device.type == "cpu":  # (a GPU trains with torchrun: no CPU rows beside it)
        from decovae_fast.benchmark import training as bench_training

        log("training steps ...")
        rows += bench_training.run_training(plan, log=log)
    # Ceilings again after the rows; the run's ceiling is the best sample, and the op rows'
    # fractions are recomputed against it.
    samples.append(measure_ceilings(device, plan.ceiling_dtypes, plan.copy_mib, plan.matmul_n))
    result["ceilings"] = combine_ceilings(samples)
    result["ceiling_samples"] = samples
    for r in rows:
        if r["gflops"] is not None:
            r["ceiling_fraction"] = _r(r["gflops"] / result["ceilings"]["matmul_gflops"][r["dtype"]], 4)
        elif r["gbps"] is not None:
            r["ceiling_fraction"] = _r(r["gbps"] / result["ceilings"]["copy_gbps"], 4)
    result["rows"] = rows
    result["checks"] = checks
    result["loadavg_end"] = loadavg()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result



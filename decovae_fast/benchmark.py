"""Benchmark suite and the `decovae bench` subcommand.

Every op is timed for each fast backend beside the pure-PyTorch reference (and, where a PyTorch user
would write it differently, the plain PyTorch way) in the same run, interleaved call by call,
because this kind of machine drifts by +-30% over minutes: only ratios measured side by side mean
something. The machine's own ceilings (copy bandwidth, matmul throughput per dtype) are measured in
the same run, before and after the ops. Pipeline rows (DeCo-VAE and the diffusers peers) live in
decovae_fast.bench_pipeline.

JSON (DESIGN.md, "Benchmarks"): {"device", "torch", "threads", "ceilings": {"copy_gbps",
"matmul_gflops": {dtype: value}}, "rows": [...]}, plus context keys (allocator, loadavg, checks,
...). Row keys are ROW_KEYS, null where a key does not apply.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

ROW_KEYS = ("name", "shape", "dtype", "backend", "median_ms", "reference_ms", "speedup", "gbps", "gflops",
            "ceiling_fraction", "fps", "peak_mem_mb", "latent_elements", "pixel_frames_per_s", "steps_per_hour")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Baselines that are not backends of decovae_fast.ops: the way a PyTorch user writes the op.
TORCH_GRID_SAMPLE = "torch_grid_sample"   # warp ops: 5-D grid_sample (border, align_corners) + add/sub
TORCH_SEQUENCE = "torch_sequence"         # conv ops: Wan's RMSNorm -> SiLU -> cat cache -> F.pad -> conv3d
# warp ops: dst.copy_(src) moving the op's ideal bytes (read + write), timed interleaved with the op:
# the machine's copy bandwidth at the same moment, a yardstick beside the run's best copy sample
COPY_SAME_BYTES = "copy_same_bytes"
YARDSTICKS = (COPY_SAME_BYTES,)
NOT_FAST = ("reference", TORCH_GRID_SAMPLE, TORCH_SEQUENCE) + YARDSTICKS  # rows that are no fast backend
# max |fast - reference| / max |reference| accepted by the sanity check of each timed path; loose
# because it only guards against timing a wrong computation (the tests hold the real tolerances):
# fp16/bf16 carry 11/8 significant bits and the conv sums ~3500 products.
CHECK_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}


def row(**kw) -> dict:
    """A result row with every key of ROW_KEYS (null where not given)."""
    unknown = set(kw) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row keys {sorted(unknown)}")
    return {k: kw.get(k) for k in ROW_KEYS}


# ---- machine context ----------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


def device_slug(device: torch.device | None = None) -> str:
    """The results file's name: bench/results/<slug>.json, e.g. cpu-amd-epyc-2c."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name(device)
    if device.type == "cpu":
        name = name.removeprefix("cpu: ").replace(" cores", "c")
        name = "cpu " + name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def context(device: torch.device) -> dict:
    """Everything a reader needs to judge the figures: versions, threads, allocator, load."""
    from decovae_fast import __version__
    from decovae_fast.ops import backends

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "decovae_fast": __version__,
        "python": platform.python_version(),
        # glibc reads GLIBC_TUNABLES at process start; unset means default malloc, under which every
        # fresh output of 32 MiB or more is mmapped and page-faulted anew (DESIGN.md).
        "allocator": {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                      "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")},
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "DECOVAE_BACKEND", "TRITON_INTERPRET")
                if k in os.environ},
        "backends": {k: v["usable"] for k, v in backends().items()},
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg(),
    }


# ---- timing -------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flush:
    """On a GPU, overwrite a buffer larger than L2 before each timed call (as triton's do_bench does),
    so no op is timed with its inputs still in cache from the previous backend."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def time_call(fn: Callable, device: torch.device, flush: _L2Flush | None = None) -> float:
    """Milliseconds of one call: CUDA events on a GPU, perf_counter around a synchronised call elsewhere."""
    if device.type == "cuda":
        if flush is not None:
            flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@dataclasses.dataclass
class Timing:
    """How long to time each case: warm-up rounds, then rounds until both min_rounds and budget_s
    are reached (or max_rounds)."""
    warmup: int = 1
    min_rounds: int = 5
    max_rounds: int = 50
    budget_s: float = 2.0


def interleaved(fns: dict[str, Callable], device: torch.device, timing: Timing) -> dict[str, list[float]]:
    """Time each callable once per round, in turn, so slow drift of the machine hits all alike.

    Returns {name: [ms per round]}; the order within a round rotates, so no callable always runs
    right after the same neighbour."""
    names = list(fns)
    flush = _L2Flush(device)
    for _ in range(timing.warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times = {n: [] for n in names}
    t_start = time.perf_counter()
    r = 0
    while r < timing.max_rounds and (r < timing.min_rounds or time.perf_counter() - t_start < timing.budget_s):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(time_call(fns[n], device, flush))
        r += 1
    return times


# ---- ceilings -----------------------------------------------------------------------------------

# Copy ceiling: each buffer 256 MiB, well beyond the last-level cache (STREAM asks for 4x). At 64 MiB
# the dev VM's copy was partly served from cache: 65-80 GB/s, against 31-58 GB/s at 256 MiB-1 GiB
# measured minutes apart (its host's cache is larger than the 32 MiB L3 the VM reports).
COPY_MIB = 256


def copy_gbps(device: torch.device, mib: int = COPY_MIB, repeats: int = 10) -> float:
    """Best bandwidth of dst.copy_(src) into a preallocated buffer, read + write counted (a ceiling is
    the best the machine did: other workers on a shared machine only ever slow a call down)."""
    nbytes = 2 * mib << 20
    copy = copy_of_bytes(nbytes, device)
    copy()
    _sync(device)
    ms = min(time_call(copy, device) for _ in range(repeats))
    return nbytes / (ms * 1e-3) / 1e9


def matmul_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 5, n: int | None = None) -> float:
    """Best throughput of an n x n x n matmul. n is 2048 (4096 on a GPU) except for a dtype with no
    fast CPU kernel (fp16 on many CPUs runs at well under 1 GFLOP/s): a trial at n=256 picks a
    size that takes about 0.2 s."""
    n = n or (4096 if device.type == "cuda" else 2048)
    if device.type == "cpu" and n > 256:
        a = torch.randn(256, 256, device=device).to(dtype)
        a @ a
        t0 = time.perf_counter()
        a @ a
        trial = 2 * 256**3 / max(time.perf_counter() - t0, 1e-9)
        n = int(min(n, max(256, (0.2 * trial / 2) ** (1 / 3))))
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    ms = min(time_call(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / (ms * 1e-3) / 1e9


def measure_ceilings(device: torch.device, dtypes: list[str], copy_mib: int = COPY_MIB, matmul_n: int | None = None) -> dict:
    return {"copy_gbps": round(copy_gbps(device, copy_mib), 2),
            "matmul_gflops": {d: round(matmul_gflops(device, DTYPES[d], n=matmul_n), 1) for d in dtypes}}


def combine_ceilings(samples: list[dict]) -> dict:
    """The run's ceiling: the best of the measurements taken before, between and after the rows."""
    return {"copy_gbps": max(s["copy_gbps"] for s in samples),
            "matmul_gflops": {d: max(s["matmul_gflops"][d] for s in samples) for d in samples[0]["matmul_gflops"]}}


# ---- op cases -----------------------------------------------------------------------------------

@dataclasses.dataclass
class OpCase:
    """One op at one shape and dtype: a callable per backend, and what one call moves and computes."""
    name: str
    shape: str
    dtype: str
    fns: dict[str, Callable]          # backend -> zero-argument callable returning the output(s)
    bytes: int | None = None          # ideal traffic: each input read once, each output written once
    flops: int | None = None          # multiply-adds x 2 (convolutions only)


def fast_backends(op: str, device: torch.device) -> list[str]:
    """Usable backends with their own kernel for `op` on `device` (the reference excluded).
    The Triton interpreter on a CPU is not timed: it is a correctness tool, not a backend."""
    from decovae_fast.ops import backends, implements

    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    avail = backends()
    return [b for b in order if avail[b]["usable"] and implements(b, op)]


def _with_backend(backend: str, fn: Callable) -> Callable:
    from decovae_fast.ops import use_backend

    def call():
        with use_backend(backend):
            return fn()
    return call


def smooth_motion(B: int, T: int, H: int, W: int, levels: int, device, dtype, gen) -> torch.Tensor:
    """Plausible motion: flow of a few pixels that varies smoothly (as a real flow field does, which
    matters for the gathers' cache behaviour), scale in [0, levels]."""
    lo = (B, 3, T, max(2, H // 16), max(2, W // 16))
    coarse = torch.randn(lo, generator=gen)
    coarse[:, :2] *= 3.0
    coarse[:, 2] = torch.rand(lo[0], lo[2], lo[3], lo[4], generator=gen) * levels
    m = F.interpolate(coarse, size=(T, H, W), mode="trilinear", align_corners=False)
    return m.to(device=device, dtype=dtype)


def grid_sample_warp(volume: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """The PyTorch way to sample the scale space: one 5-D grid_sample, trilinear, border,
    align_corners=True (pixel centres on the integer grid, as in the op contract).

    grid_sample wants the grid in the volume's dtype, and a bf16 grid is off by up to a pixel at
    256 px, so fp16/bf16 are sampled in fp32 (the op's own accumulation); returns fp32 (fp64 for fp64)."""
    B, C, D, H, W = volume.shape
    acc = torch.float64 if volume.dtype == torch.float64 else torch.float32
    m = motion.to(acc)
    xs = torch.arange(W, device=m.device, dtype=acc)
    ys = torch.arange(H, device=m.device, dtype=acc).view(H, 1)
    gx = (xs + m[:, 0]) * (2.0 / max(W - 1, 1)) - 1.0
    gy = (ys + m[:, 1]) * (2.0 / max(H - 1, 1)) - 1.0
    gz = m[:, 2] * (2.0 / max(D - 1, 1)) - 1.0
    grid = torch.stack([gx, gy, gz], dim=-1)   # (B, T, H, W, 3) as (x, y, s)
    return F.grid_sample(volume.to(acc), grid, mode="bilinear", padding_mode="border", align_corners=True)


def grid_sample_residual(volume, motion, frames, sign: float = -1.0) -> torch.Tensor:
    """frames + sign * sample(volume, motion) the PyTorch way, in fp32, cast back once (as the op)."""
    pred = grid_sample_warp(volume, motion)
    return (frames.to(pred.dtype) + sign * pred).to(frames.dtype)


def warp_fwd_bytes(motion: torch.Tensor, frames: torch.Tensor) -> int:
    """A warp forward's ideal bytes as issue 3 counts them: frames and motion read, output written.
    The scale-space volume (read once per call, (L+1)/T of the frames' size) is left out."""
    return motion.numel() * motion.element_size() + 2 * frames.numel() * frames.element_size()


def copy_of_bytes(nbytes: int, device) -> Callable:
    """dst.copy_(src) moving nbytes in all (half read, half written): the copy yardstick."""
    src = torch.full((nbytes // 2,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def warp_cases(T: int, H: int, W: int, levels: int, dtype: str, device: torch.device) -> list[OpCase]:
    from decovae_fast import ops

    gen = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    B, C = 1, 3
    volume = torch.rand(B, C, levels + 1, H, W, generator=gen).to(device=device, dtype=dt)
    frames = torch.rand(B, C, T, H, W, generator=gen).to(device=device, dtype=dt)
    motion = smooth_motion(B, T, H, W, levels, device, dt, gen)
    es = volume.element_size()
    fwd_bytes = warp_fwd_bytes(motion, frames)
    shape = f"{B}x{C}x{T}x{H}x{W} L={levels}"

    def fwd(op):
        return lambda: getattr(ops, op)(volume, motion, frames)

    copy_same = copy_of_bytes(fwd_bytes, device)

    cases = []
    for op, sign in (("warp_residual", -1.0), ("warp_add", 1.0)):
        fns = {"reference": _with_backend("reference", fwd(op))}
        fns.update({b: _with_backend(b, fwd(op)) for b in fast_backends(op, device)})
        fns[TORCH_GRID_SAMPLE] = (lambda s: lambda: grid_sample_residual(volume, motion, frames, s))(sign)
        fns[COPY_SAME_BYTES] = copy_same
        cases.append(OpCase(f"{op}.fwd", shape, dtype, fns, bytes=fwd_bytes))

    # forward + backward to the volume and the motion (the frames need no gradient)
    vol_g = volume.detach().clone().requires_grad_(True)
    mot_g = motion.detach().clone().requires_grad_(True)
    grad = torch.rand(frames.shape, generator=gen).to(device=device, dtype=dt)

    def fwd_bwd(residual_fn):
        def call():
            out = residual_fn()
            return torch.autograd.grad(out, (vol_g, mot_g), grad)
        return call

    fns = {"reference": _with_backend("reference", fwd_bwd(lambda: ops.warp_residual(vol_g, mot_g, frames)))}
    fns.update({b: _with_backend(b, fwd_bwd(lambda: ops.warp_residual(vol_g, mot_g, frames)))
                for b in fast_backends("warp_residual", device)})
    fns[TORCH_GRID_SAMPLE] = fwd_bwd(lambda: grid_sample_residual(vol_g, mot_g, frames))
    # backward: read grad, volume, motion; write grad of volume and of motion
    bwd_bytes = (frames.numel() + 2 * volume.numel() + 2 * motion.numel()) * es
    cases.append(OpCase("warp_residual.fwd_bwd", shape, dtype, fns, bytes=fwd_bytes + bwd_bytes))
    return cases


def gaussian_case(H: int, W: int, levels: int, dtype: str, device: torch.device) -> OpCase:
    from decovae_fast import ops

    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 3, H, W, generator=gen).to(device=device, dtype=DTYPES[dtype])
    fns = {b: _with_backend(b, lambda: ops.gaussian_volume(x0, levels, 1.0))
           for b in ["reference"] + fast_backends("gaussian_volume", device)}
    return OpCase("gaussian_volume.fwd", f"1x3x{H}x{W} L={levels}", dtype, fns,
                  bytes=x0.numel() * (levels + 2) * x0.element_size())


def wan_rms_norm(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Wan 2.1's RMS_norm (channel first): F.normalize over channels * sqrt(C) * gamma."""
    return F.normalize(x, dim=1) * (x.shape[1] ** 0.5) * gamma.view(-1, 1, 1, 1)


def wan_causal_conv(x: torch.Tensor, cache: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Wan 2.1's CausalConv3d on a streamed chunk: keep the last frames as the next cache, cat the
    previous cache in front, F.pad the space (the padded copy of x), conv3d with bias."""
    kt, kh, kw = weight.shape[2:]
    new_cache = x[:, :, -(kt - 1):].clone()
    x = torch.cat([cache, x], dim=2)
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, 0, 0))
    return F.conv3d(x, weight, bias), new_cache


def conv_cases(cin: int, cout: int, T: int, H: int, W: int, dtype: str, device: torch.device) -> list[OpCase]:
    """causal_conv3d 3x3x3 on a streamed chunk (cache of 2 frames given): plain conv + bias (.fwd) and
    RMSNorm + SiLU + conv + bias (.block), each beside Wan's PyTorch sequence for the same thing."""
    from decovae_fast import ops
    from decovae_fast.ops import reference

    gen = torch.Generator().manual_seed(2)
    dt = DTYPES[dtype]
    k = 3
    x = torch.randn(1, cin, T, H, W, generator=gen).to(device=device, dtype=dt)
    cache = torch.randn(1, cin, k - 1, H, W, generator=gen).to(device=device, dtype=dt)
    weight = (torch.randn(cout, cin, k, k, k, generator=gen) / math.sqrt(cin * k**3)).to(device=device, dtype=dt)
    bias = (0.1 * torch.randn(cout, generator=gen)).to(device=device, dtype=dt)
    gamma = (1 + 0.1 * torch.randn(cin, generator=gen)).to(device=device, dtype=dt)
    # Wan caches the conv's input after norm + SiLU; the op caches the raw input. Timing is the same;
    # feeding Wan the activated cache makes the two outputs comparable for the sanity check.
    cache_act = F.silu(reference.rms_norm(cache, gamma, 1e-6)).to(dt)
    shape = f"1x{cin}x{T}x{H}x{W} k3x3x3 cout={cout}"
    flops = 2 * cout * cin * k**3 * T * H * W

    def plain():
        return ops.causal_conv3d(x, weight, bias, cache=cache)[0]

    def block():
        return ops.causal_conv3d(x, weight, bias, cache=cache, norm_weight=gamma, prologue_silu=True)[0]

    cases = []
    for name, fn, torch_fn in (
            ("causal_conv3d.fwd", plain, lambda: wan_causal_conv(x, cache, weight, bias)[0]),
            ("causal_conv3d.block", block,
             lambda: wan_causal_conv(F.silu(wan_rms_norm(x, gamma)), cache_act, weight, bias)[0])):
        fns = {b: _with_backend(b, fn) for b in ["reference"] + fast_backends("causal_conv3d", device)}
        fns[TORCH_SEQUENCE] = torch_fn
        cases.append(OpCase(name, shape, dtype, fns, flops=flops))
    return cases


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


def make_plan(quick: bool, device: torch.device) -> Plan:
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


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def check_case(case: OpCase) -> list[dict]:
    """Run every backend once and compare its output with the reference's: a fast path that computes
    something else must not be reported as fast."""
    ref = _first(case.fns["reference"]())
    ref = ref.float() if isinstance(ref, torch.Tensor) else ref
    checks = []
    for backend, fn in case.fns.items():
        if backend == "reference" or backend in YARDSTICKS:
            continue
        out = _first(fn())
        err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        checks.append({"name": case.name, "shape": case.shape, "dtype": case.dtype, "backend": backend,
                       "max_rel_err": float(f"{err:.3g}"), "ok": err <= CHECK_TOL[case.dtype]})
    return checks


def run_op_case(case: OpCase, ceilings: dict, timing: Timing, device: torch.device) -> list[dict]:
    times = interleaved(case.fns, device, timing)
    medians = {b: statistics.median(t) for b, t in times.items()}
    ref_ms = medians["reference"]
    rows = []
    for backend, ms in medians.items():
        gbps = case.bytes / (ms * 1e-3) / 1e9 if case.bytes else None
        gflops = case.flops / (ms * 1e-3) / 1e9 if case.flops else None
        if gflops is not None:
            frac = gflops / ceilings["matmul_gflops"][case.dtype]
        else:
            frac = gbps / ceilings["copy_gbps"] if gbps is not None else None
        rows.append(row(name=case.name, shape=case.shape, dtype=case.dtype, backend=backend,
                        median_ms=_r(ms), reference_ms=_r(ref_ms), speedup=_r(ref_ms / ms, 3),
                        gbps=_r(gbps, 3), gflops=_r(gflops, 2), ceiling_fraction=_r(frac, 4)))
    return rows


def _r(x, digits: int = 3):
    return None if x is None else float(f"{x:.{digits + 3}g}") if abs(x) >= 1 else float(f"{x:.{digits}g}")


# ---- the run ------------------------------------------------------------------------------------

def run_suite(plan: Plan, *, ops: bool = True, pipeline: bool = True, peers: bool = True,
              training: bool = True, log=lambda msg: None) -> dict:
    """Measure everything the plan asks for and return the result document."""
    device = plan.device
    t0 = time.perf_counter()
    result = context(device)
    result["quick"] = plan.quick
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
        from decovae_fast import bench_pipeline

        prows, notes = bench_pipeline.run_pipeline(plan, peers=peers, log=log)
        rows += prows
        result["pipeline_notes"] = notes
    if training and device.type == "cpu":  # (a GPU trains with torchrun: no CPU rows beside it)
        from decovae_fast import bench_training

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


def validate(result: dict) -> None:
    """Raise ValueError when `result` does not follow the JSON contract of DESIGN.md."""
    for key in ("device", "torch", "threads", "ceilings", "rows"):
        if key not in result:
            raise ValueError(f"missing key {key!r}")
    c = result["ceilings"]
    if not isinstance(c.get("copy_gbps"), (int, float)) or not isinstance(c.get("matmul_gflops"), dict):
        raise ValueError("ceilings must hold copy_gbps (number) and matmul_gflops ({dtype: number})")
    for i, r in enumerate(result["rows"]):
        if tuple(r) != ROW_KEYS:
            raise ValueError(f"row {i} has keys {list(r)}, expected {list(ROW_KEYS)}")
        for k in ("name", "shape", "dtype", "backend"):
            if not isinstance(r[k], str):
                raise ValueError(f"row {i}: {k} must be a string")
        for k in ROW_KEYS[4:]:
            if r[k] is not None and not isinstance(r[k], (int, float)):
                raise ValueError(f"row {i}: {k} must be a number or null")


def reproduce_command(result: dict, json_path: str | None = None) -> str:
    parts = []
    tun = result.get("allocator", {}).get("GLIBC_TUNABLES")
    if tun:
        parts.append(f"GLIBC_TUNABLES={tun}")
    parts.append("decovae bench" + (" --quick" if result.get("quick") else ""))
    parts += [f"--skip {s}" for s in result.get("skipped_parts", [])]
    if not result.get("device", "").startswith("cpu"):
        parts.append("--device cuda")
    if json_path:
        parts.append(f"--json {json_path}")
    return " ".join(parts)


# ---- the markdown table -------------------------------------------------------------------------

def _fmt(x, spec: str = "") -> str:
    """Three significant digits without exponents (2593 -> "2593", 0.0164 -> "0.0164")."""
    if x is None:
        return ""
    if spec:
        return format(x, spec)
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.1e}"


def _ratio(a, b, spec=".2f") -> str:
    return "" if a is None or b in (None, 0) else format(a / b, spec) + "x"


def format_table(result: dict, json_path: str | None = None) -> str:
    """The README's benchmark section, generated from one result document."""
    rows = result["rows"]
    c = result["ceilings"]
    samples = [x["copy_gbps"] for x in result.get("ceiling_samples", [])] or [c["copy_gbps"]]
    tun = result.get("allocator", {}).get("GLIBC_TUNABLES")
    lines = [
        f"Measured on {result['device']}, torch {result['torch']}, {result['threads']} threads, "
        f"allocator: {'GLIBC_TUNABLES=' + tun if tun else 'glibc default'}, load average "
        f"{result.get('loadavg_start')} at start, {result.get('loadavg_end')} at end"
        f"{'' if not result.get('quick') else ' (--quick)'}.",
        f"Ceilings measured in the same run: copy {c['copy_gbps']:.1f} GB/s (read + write; the best of "
        f"{len(samples)} samples: {', '.join(f'{x:.1f}' for x in samples)}), matmul "
        + ", ".join(f"{d} {v:.0f}" for d, v in c["matmul_gflops"].items()) + " GFLOP/s.",
        "",
    ]
    op_rows = [r for r in rows if r["fps"] is None]
    if op_rows:
        lines += ["| op | shape | dtype | backend | median ms | vs reference | vs PyTorch way | GB/s | GFLOP/s "
                  "| of ceiling |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        torch_ms = {(r["name"], r["shape"], r["dtype"]): r["median_ms"] for r in op_rows
                    if r["backend"] in (TORCH_GRID_SAMPLE, TORCH_SEQUENCE)}
        for r in op_rows:
            t = torch_ms.get((r["name"], r["shape"], r["dtype"]))
            frac = "" if r["ceiling_fraction"] is None else f"{100 * r['ceiling_fraction']:.1f}%"
            lines.append(f"| {r['name']} | {r['shape']} | {r['dtype']} | {r['backend']} | {_fmt(r['median_ms'])} "
                         f"| {_fmt(r['speedup'], '.2f')}x | {_ratio(t, r['median_ms'])} | {_fmt(r['gbps'])} "
                         f"| {_fmt(r['gflops'])} | {frac} |")
        lines += ["", "vs reference: time of the pure-PyTorch oracle / this time; vs PyTorch way: time of "
                  f"`{TORCH_GRID_SAMPLE}` (5-D grid_sample + add/sub) or `{TORCH_SEQUENCE}` (Wan 2.1's RMSNorm, "
                  "SiLU, cat cache, F.pad, conv3d) / this time; all backends of a row group timed interleaved "
                  "in the same run. Ceiling: copy bandwidth for the warp and blur ops (GB/s of ideal traffic: each "
                  "input read once, each output written once; for a warp forward only the frames and motion "
                  "read and the output written, as issue 3 counts them), matmul throughput of the dtype for the "
                  "convolutions (GFLOP/s counts a direct convolution's multiply-adds, so a kernel that does "
                  "fewer of them, e.g. Winograd, can pass 100%; so can any row when other work on the machine "
                  f"depressed the ceiling measurements). `{COPY_SAME_BYTES}`: a plain copy moving the warp's ideal "
                  "bytes, timed interleaved with it: the copy bandwidth at the same moment.", ""]
    pipe = [r for r in rows if r["fps"] is not None and not r["name"].startswith(("stream.", "train."))]
    if pipe:
        lines += pipeline_table(pipe)
    stream = [r for r in rows if r["name"].startswith("stream.")]
    if stream:
        lines += stream_table(stream, result.get("pipeline_notes", {}))
    train = [r for r in rows if r["name"].startswith("train.")]
    if train:
        from decovae_fast.bench_training import training_table

        lines += training_table(train)
    targets = target_lines(result)
    if targets:
        lines += ["Targets:", ""] + [f"- {t}" for t in targets] + [""]
    lines.append(f"Reproduce: `{reproduce_command(result, json_path)}`")
    return "\n".join(lines) + "\n"


def _model_of(name: str) -> str:
    return name.split(".", 1)[1]


def pipeline_table(pipe: list[dict]) -> list[str]:
    by = {}
    for r in pipe:
        phase, model = r["name"].split(".", 1)
        by.setdefault((model, r["shape"], r["backend"]), {})[phase] = r
    wan = {shape: v for (m, shape, _), v in by.items() if m == "wan2.1"}
    lines = ["| model | video | backend | encode frames/s | decode frames/s | encode peak MB | decode peak MB "
             "| latent elements | latent vs Wan 2.1 | encode vs Wan 2.1 | decode vs Wan 2.1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, shape, backend), v in by.items():
        e, d = v.get("encode", {}), v.get("decode", {})
        w = wan.get(shape, {})
        we, wd = w.get("encode", {}), w.get("decode", {})
        lat = e.get("latent_elements") or d.get("latent_elements")
        lines.append(f"| {model} | {shape} | {backend} | {_fmt(e.get('fps'))} | {_fmt(d.get('fps'))} "
                     f"| {_fmt(e.get('peak_mem_mb'), '.0f')} | {_fmt(d.get('peak_mem_mb'), '.0f')} | {_fmt(lat, 'd')} "
                     f"| {_ratio(lat, we.get('latent_elements'))} | {_ratio(e.get('fps'), we.get('fps'))} "
                     f"| {_ratio(d.get('fps'), wd.get('fps'))} |")
    lines += ["", "Peak MB: peak memory during one call above what was resident before it (weights and input "
              "excluded): peak RSS on a CPU (each model in its own process), torch.cuda.max_memory_allocated "
              "on a GPU. Peers use diffusers' default configs with random weights (same cost as trained).", ""]
    return lines


def _frames_and_size(shape: str) -> tuple[int, str]:
    """(T, "HxW") of a stream row's shape "1x3xTxHxW chunk=c"."""
    dims = shape.split()[0].split("x")
    return int(dims[2]), f"{dims[3]}x{dims[4]}"


def stream_table(stream: list[dict], notes: dict) -> list[str]:
    sn = notes.get("stream.tiny", {})
    fixed = sn.get("fixed_mmap_threshold", {})
    lines = ["| model | video | backend | encode + decode frames/s | peak MB | peak MB, fixed mmap threshold "
             "| latent elements |", "|---|---|---|---:|---:|---:|---:|"]
    for r in stream:
        f = fixed.get(r["shape"], {})
        lines.append(f"| {_model_of(r['name'])} | {r['shape']} | {r['backend']} | {_fmt(r['fps'])} "
                     f"| {_fmt(r['peak_mem_mb'], '.0f')} | {_fmt(f.get('peak_mem_mb'), '.0f')} "
                     f"| {_fmt(r['latent_elements'], 'd')} |")
    weights = sn.get("weights", "")
    lines += ["", "Streaming: the command line's path without the file I/O: frames made chunk by chunk (a moving "
              "texture), `encode_stream` -> `decode_stream`, decoded chunks dropped as they come; one process "
              "per frame size, peak RSS above the RSS before the call. `fixed mmap threshold`: the same run "
              f"in a process started with GLIBC_TUNABLES={fixed.get('GLIBC_TUNABLES', '...')}, which stops glibc's "
              "default malloc from keeping freed buffers in a fragmented heap (empty: not run)."
              + (f" Weights: {weights}." if weights else "")
              + (f" Adaptive keyframes {sn['adaptive_keyframes']}." if "adaptive_keyframes" in sn else ""), ""]
    return lines


def stream_target_lines(result: dict) -> list[str]:
    """Peak of the longest streamed clip over the peak of the shortest, per frame size and backend."""
    fixed = result.get("pipeline_notes", {}).get("stream.tiny", {}).get("fixed_mmap_threshold", {})
    groups = {}
    for r in result["rows"]:
        if r["name"] == "stream.tiny":
            T, size = _frames_and_size(r["shape"])
            groups.setdefault((size, r["backend"]), []).append((T, r))
    out = []
    for (size, backend), runs in groups.items():
        if len(runs) < 2:
            continue
        (t_lo, lo), (t_hi, hi) = min(runs, key=lambda x: x[0]), max(runs, key=lambda x: x[0])
        label = f"{t_hi}-frame streaming peak / {t_lo}-frame peak at {size} ({backend})"
        if not lo["peak_mem_mb"] or hi["peak_mem_mb"] is None:
            out.append(f"{label}: peak memory not measured")
            continue
        ratio = hi["peak_mem_mb"] / lo["peak_mem_mb"]
        line = (f"{label}: {ratio:.2f}x ({hi['peak_mem_mb']:.0f} / {lo['peak_mem_mb']:.0f} MB) (target <= 1.25x): "
                f"{'met' if ratio <= 1.25 else 'MISSED'}")
        f_lo, f_hi = fixed.get(lo["shape"], {}).get("peak_mem_mb"), fixed.get(hi["shape"], {}).get("peak_mem_mb")
        if f_lo and f_hi is not None:
            line += f"; with a fixed mmap threshold {f_hi / f_lo:.2f}x ({f_hi:.0f} / {f_lo:.0f} MB)"
        elif ratio > 1.25:
            line += " (under glibc's default malloc; the full suite also measures with a fixed mmap threshold)"
        out.append(line)
    return out


def _get(rows, name, backend=None, shape=None, dtype="fp32"):
    for r in rows:
        if r["name"] == name and r["dtype"] == dtype and (backend is None or r["backend"] == backend) \
                and (shape is None or r["shape"] == shape):
            yield r


def target_lines(result: dict) -> list[str]:
    """The project's targets, met or missed, from this run's rows (nothing is claimed without a row)."""
    rows = result["rows"]
    out = []

    def verdict(ok):
        return "met" if ok else "MISSED"

    for t in _get(rows, "encode.tiny"):
        if t["backend"] == "reference" and any(r["shape"] == t["shape"] and r["backend"] != "reference"
                                               for r in _get(rows, "encode.tiny")):
            continue
        for phase in ("encode", "decode"):
            mine = next(_get(rows, f"{phase}.tiny", t["backend"], t["shape"]), None)
            wan = next(_get(rows, f"{phase}.wan2.1", None, t["shape"]), None)
            if mine and wan and mine["fps"] and wan["fps"]:
                ratio = mine["fps"] / wan["fps"]
                out.append(f"tiny {phase} at {t['shape']}: {ratio:.2f}x the Wan 2.1 VAE's frames/s "
                           f"(target >= 3x): {verdict(ratio >= 3)}")
        wan = next(_get(rows, "encode.wan2.1", None, t["shape"]), None)
        if wan and t["latent_elements"] and wan["latent_elements"]:
            ratio = t["latent_elements"] / wan["latent_elements"]
            out.append(f"tiny latent at {t['shape']}: {ratio:.2f}x the Wan 2.1 VAE's elements (target <= 0.6x): "
                       f"{verdict(ratio <= 0.6)}")
    fast = [r for r in _get(rows, "warp_residual.fwd") if r["backend"] not in NOT_FAST]
    for r in fast:
        copy = next(_get(rows, "warp_residual.fwd", COPY_SAME_BYTES, r["shape"]), None)
        same = (f" ({100 * r['gbps'] / copy['gbps']:.0f}% of the same-size copy timed interleaved with it)"
                if copy and copy["gbps"] else "")
        out.append(f"warp_residual.fwd {r['backend']} {r['shape']}: {r['speedup']:.2f}x the reference (target >= 8x): "
                   f"{verdict(r['speedup'] >= 8)}; {100 * r['ceiling_fraction']:.1f}% of the run's copy bandwidth"
                   f"{same} (target >= 40%): {verdict(r['ceiling_fraction'] >= 0.4)}")
    for r in _get(rows, "warp_residual.fwd_bwd"):
        if r["backend"] not in NOT_FAST:
            out.append(f"warp_residual.fwd_bwd {r['backend']} {r['shape']}: {r['speedup']:.2f}x the reference "
                       f"(target >= 4x): {verdict(r['speedup'] >= 4)}")
    if not fast and any(_get(rows, "warp_residual.fwd")):
        out.append("warp_residual.fwd: no fast backend was available in this run: targets not measured")
    blocks = list(_get(rows, "causal_conv3d.block"))
    for r in blocks:
        if r["backend"] in NOT_FAST:
            continue
        t = next((s for s in blocks if s["shape"] == r["shape"] and s["backend"] == TORCH_SEQUENCE), None)
        if t:
            ratio = t["median_ms"] / r["median_ms"]
            out.append(f"causal_conv3d.block {r['backend']} {r['shape']}: {ratio:.2f}x the PyTorch sequence "
                       f"(target >= 1.3x): {verdict(ratio >= 1.3)}")
    if blocks and all(r["backend"] in NOT_FAST for r in blocks):
        out.append("causal_conv3d.block: no fast backend was available in this run: target not measured")
    return out + stream_target_lines(result)


# ---- command line -------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time every op against its reference and the pipeline against its peers")
    p.add_argument("--quick", action="store_true", help="fewer timed repeats, pipeline at 9x128x128, streaming at 64x64")
    p.add_argument("--json", metavar="OUT", help="write the results (bench/results/<device>.json)")
    p.add_argument("--table", metavar="OUT", help="also write the markdown table")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--skip", action="append", choices=("ops", "pipeline", "peers", "training"), default=[],
                   help="leave a part out (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run)


def run(args) -> int:
    from decovae_fast.cli import UserError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    for out in (args.json, args.table):
        if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise UserError(f"{out}: the folder does not exist")
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    plan = make_plan(args.quick, device)
    result = run_suite(plan, ops="ops" not in args.skip, pipeline="pipeline" not in args.skip,
                       peers="peers" not in args.skip, training="training" not in args.skip, log=log)
    result["skipped_parts"] = sorted(set(args.skip))
    result["command"] = reproduce_command(result, args.json)
    validate(result)
    table = format_table(result, args.json)
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    if args.table:
        write_atomic(args.table, table)
    print(table)
    return 0


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

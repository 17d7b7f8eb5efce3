"""The op cases of the benchmark: each op at each shape and dtype as callables per backend (every
fast backend, the reference, and the plain PyTorch way of writing it), checked against the
reference before they are timed interleaved."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from decovae_fast.benchmark.harness import (COPY_SAME_BYTES, TORCH_GRID_SAMPLE, TORCH_SEQUENCE, YARDSTICKS, Timing,
                                            _r, copy_of_bytes, interleaved, row)
from decovae_fast.dtypes import DTYPES


# max |fast - reference| / max |reference| accepted by the sanity check of each timed path; loose
# because it only guards against timing a wrong computation (the tests hold the real tolerances):
# fp16/bf16 carry 11/8 significant bits and the conv sums ~3500 products.
CHECK_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}


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
    The Triton interpreter on a CPU is not timed: it is a correctness tool, not a backend.
    The CPU backend appears once per instruction set this CPU runs, as "cpu@<isa>", the one chosen
    at run time first (csrc/cpu/capability.h)."""
    from decovae_fast import _ext
    from decovae_fast.ops import backends, implements

    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    avail = backends()
    names = [b for b in order if avail[b]["usable"] and implements(b, op)]
    if "cpu" in names:
        chosen = _ext.cpu_capability()
        isas = [chosen] + [i for i in reversed(_ext.supported_cpu_capabilities()) if i != chosen]
        names = [n for n in names if n != "cpu"] + [f"cpu@{i}" for i in isas]
    return names


def _with_backend(backend: str, fn: Callable) -> Callable:
    """fn run with `backend` forced; "cpu@avx2" is the CPU backend with its AVX2 kernels."""
    from decovae_fast import _ext
    from decovae_fast.ops import use_backend

    name, _, isa = backend.partition("@")

    def call():
        with use_backend(name), (_ext.forced_cpu_capability(isa) if isa else contextlib.nullcontext()):
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



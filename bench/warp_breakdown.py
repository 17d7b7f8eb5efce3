"""Where the CPU warp forward's time goes: the same op on motion fields of growing irregularity.

    python bench/warp_breakdown.py [--size 256] [--frames 16] [--rounds 15]

Rows, fp32, L = 5, best and median of interleaved rounds (ns per output pixel, GB/s of ideal traffic):
zero motion; constant motion (all four corners, the same rows for every pixel); the benchmark's
smooth flow with a constant scale; the benchmark's smooth flow and scale (decovae bench's input);
a plain copy of the same bytes; and the benchmark's copy ceiling (256 MiB to 256 MiB, beyond the
cache). Each warp row also gives its GB/s as a share of the ceiling copy's in the same rounds (the
median over rounds): issue 3's fraction measured at one moment, so a busy or quiet spell of a
shared machine moves numerator and denominator alike.

On the 2-core dev VM (2 threads, warm caches, 16x256^2) it gave 1.7 / 1.7 / 1.8 / 1.9 ns per pixel
beside a 1.06 ns copy, and at 16x128^2 (everything in cache) still 1.7 ns for every motion: since
the forward packs the volume rows it needs just before sampling them (a ring per thread), the
arithmetic, not the gather, is the gap to the copy. Before that (one packing pass over the whole
volume) the bench motion cost 2.65 ns at 256^2 and 2.85 at 512^2 against 1.9 / 1.7 for zero motion.
The warp is compute-bound (about 16-21 GB/s on most days; 10-18 GB/s on 2026-11-25, when the VM's
cores themselves ran slower), so its share of the ceiling copy swings with the VM's memory: the
bench motion gave 50% (256^2) and 56% (512^2) while the ceiling copy ran at 40 and 32 GB/s; the
same day, a warp call's median against the best of 3 back-to-back ceiling copies gave 27% and 28%
while those ran at 57-61 GB/s.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from decovae_fast import ops
from decovae_fast.benchmark.cases import smooth_motion, warp_fwd_bytes
from decovae_fast.benchmark.harness import COPY_MIB, Timing, copy_of_bytes, interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    T, H, W, L = args.frames, args.size, args.size, 5
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(1, 3, L + 1, H, W, generator=gen)
    frames = torch.rand(1, 3, T, H, W, generator=gen)
    smooth = smooth_motion(1, T, H, W, L, "cpu", torch.float32, gen)
    constant = torch.zeros_like(smooth)
    constant[:, 0], constant[:, 1], constant[:, 2] = 2.3, 1.6, 2.5
    scale_fixed = smooth.clone()
    scale_fixed[:, 2] = 2.5
    ideal = warp_fwd_bytes(smooth, frames)
    cases = {"zero motion": torch.zeros_like(smooth), "constant motion": constant,
             "smooth flow, constant scale": scale_fixed, "smooth flow and scale (bench)": smooth}
    fns = {name: (lambda m: lambda: ops.warp_residual(volume, m, frames))(m) for name, m in cases.items()}
    fns["copy of the same bytes"] = copy_of_bytes(ideal, "cpu")
    ceiling_name, ceiling_bytes = f"copy ceiling ({COPY_MIB} MiB)", 2 * COPY_MIB << 20
    fns[ceiling_name] = copy_of_bytes(ceiling_bytes, "cpu")
    with ops.use_backend("cpu"):
        times = interleaved(fns, torch.device("cpu"), Timing(warmup=1, min_rounds=args.rounds,
                                                              max_rounds=args.rounds, budget_s=0.0))
    px = T * H * W
    print(f"warp_residual fwd, fp32, 1x3x{T}x{H}x{W} L={L}, {torch.get_num_threads()} threads")
    ceiling_ms = times.pop(ceiling_name)
    print(f"  {ceiling_name:30s} median {ceiling_bytes / statistics.median(ceiling_ms) / 1e6:6.1f} GB/s")
    for name, ts in times.items():
        best, med = min(ts), statistics.median(ts)  # ms
        share = statistics.median((ideal / t) / (ceiling_bytes / c) for t, c in zip(ts, ceiling_ms))
        print(f"  {name:30s} best {best * 1e6 / px:6.2f} ns/px  median {med * 1e6 / px:6.2f} ns/px  "
              f"{ideal / med / 1e6:6.1f} GB/s  {share:6.1%} of the ceiling copy")


if __name__ == "__main__":
    main()

"""The CPU warp once per kernel variant this CPU runs (cpu@avx512, cpu@avx2, cpu@default): the
forward beside a plain copy of the same bytes, the backward (warp_sample_backward, both gradients)
beside the same copy and the reference's autograd backward; all timed interleaved in one run (the
VM's bandwidth drifts by a third and more, so only same-run ratios mean something).

    python bench/isa_warp.py [threads] [--backward-only]
"""
import statistics
import sys

import torch

from decovae_fast import _ext, ops
from decovae_fast.benchmark.cases import smooth_motion, warp_cases
from decovae_fast.benchmark.harness import COPY_SAME_BYTES, Timing, copy_of_bytes, device_name, interleaved

CPU = torch.device("cpu")


def forward_table():
    print(f"warp_residual forward, fp32, L = 5")
    print("| shape | " + " | ".join(b for b in warp_cases(2, 16, 16, 5, "fp32", CPU)[0].fns
                                   if b.startswith("cpu")) + f" | {COPY_SAME_BYTES} |")
    for shape in [(16, 256, 256), (16, 512, 512)]:
        case = warp_cases(*shape, 5, "fp32", CPU)[0]
        fns = {k: v for k, v in case.fns.items() if k.startswith("cpu") or k == COPY_SAME_BYTES}
        med = {k: statistics.median(v) for k, v in interleaved(fns, CPU, Timing(1, 10, 60, 4.0)).items()}
        copy = med.pop(COPY_SAME_BYTES)
        cells = [f"{ms:.2f} ms ({100 * copy / ms:.0f}% of the copy)" for ms in med.values()]
        print(f"| 1x3x{'x'.join(map(str, shape))} | " + " | ".join(cells) + f" | {copy:.2f} ms |")


def backward_fns(B, C, T, H, W, D):
    """warp_sample_backward (both gradients) per variant, the reference's autograd, and the copy."""
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(B, C, D, H, W, generator=gen)
    motion = smooth_motion(B, T, H, W, D - 1, CPU, torch.float32, gen)
    grad = torch.rand(B, C, T, H, W, generator=gen)
    fns = {}
    for isa in _ext.supported_cpu_capabilities()[::-1]:
        def call(isa=isa):
            with _ext.forced_cpu_capability(isa):
                return torch.ops.decovae.warp_sample_backward(grad, volume, motion, True, True)
        fns[f"cpu@{isa}"] = call
    vol_g, mot_g = volume.clone().requires_grad_(True), motion.clone().requires_grad_(True)

    def reference():
        with ops.use_backend("reference"):
            out = ops.warp_residual(vol_g, mot_g, torch.zeros_like(grad))
        return torch.autograd.grad(out, (vol_g, mot_g), grad)
    fns["reference"] = reference
    fns[COPY_SAME_BYTES] = copy_of_bytes(4 * (grad.numel() + 2 * volume.numel() + 2 * motion.numel()), CPU)
    return fns


def backward_table():
    print("warp_sample_backward (volume and motion gradients), fp32")
    rows = [("RGB warp, 1x3x16x256x256 L=5", (1, 3, 16, 256, 256, 6)),
            ("RGB warp, 1x3x16x512x512 L=5", (1, 3, 16, 512, 512, 6)),
            ("motion features, 2x32x8x64x64 L=0", (2, 32, 8, 64, 64, 1))]
    header = None
    for name, shape in rows:
        fns = backward_fns(*shape)
        if header is None:
            header = [k for k in fns if k != COPY_SAME_BYTES]
            print("| case | " + " | ".join(header) + f" | {COPY_SAME_BYTES} |")
        med = {k: statistics.median(v) for k, v in interleaved(fns, CPU, Timing(1, 5, 30, 4.0)).items()}
        copy, ref = med.pop(COPY_SAME_BYTES), med["reference"]
        cells = [f"{ms:.2f} ms" + ("" if k == "reference" else f" ({ref / ms:.1f}x ref, {100 * copy / ms:.0f}% of copy)")
                 for k, ms in med.items()]
        print(f"| {name} | " + " | ".join(cells) + f" | {copy:.2f} ms |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    torch.set_num_threads(int(args[0]) if args else torch.get_num_threads())
    print(f"{device_name(CPU)}, {torch.get_num_threads()} threads")
    if "--backward-only" not in sys.argv:
        forward_table()
    backward_table()

"""The CPU warp forward once per kernel variant this CPU runs (cpu@avx512, cpu@avx2, cpu@default),
each beside a plain copy of the same bytes, all timed interleaved in one run (the VM's bandwidth
drifts by a third and more, so only same-run ratios mean something).

    python bench/isa_warp.py [threads]
"""
import statistics
import sys

import torch

from decovae_fast.benchmark.cases import warp_cases
from decovae_fast.benchmark.harness import COPY_SAME_BYTES, Timing, interleaved, device_name

if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    cpu = torch.device("cpu")
    print(f"{device_name(cpu)}, {torch.get_num_threads()} threads; warp_residual forward, fp32, L = 5")
    print("| shape | " + " | ".join(b for b in warp_cases(2, 16, 16, 5, "fp32", cpu)[0].fns
                                   if b.startswith("cpu")) + f" | {COPY_SAME_BYTES} |")
    for shape in [(16, 256, 256), (16, 512, 512)]:
        case = warp_cases(*shape, 5, "fp32", cpu)[0]
        fns = {k: v for k, v in case.fns.items() if k.startswith("cpu") or k == COPY_SAME_BYTES}
        med = {k: statistics.median(v) for k, v in interleaved(fns, cpu, Timing(1, 10, 60, 4.0)).items()}
        copy = med.pop(COPY_SAME_BYTES)
        cells = [f"{ms:.2f} ms ({100 * copy / ms:.0f}% of the copy)" for ms in med.values()]
        print(f"| 1x3x{'x'.join(map(str, shape))} | " + " | ".join(cells) + f" | {copy:.2f} ms |")

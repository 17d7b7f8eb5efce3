"""DTYPES: the compute dtypes by the names the command line, the benchmark and its JSON use; and
whether this CPU runs bf16 natively."""
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (avx512_bf16 or AMX). Without it PyTorch's bf16
    convolutions crawl (issue 21, an AVX2-only EPYC: a 128-channel conv3d did not finish in 120 s
    where fp32 took 0.54 s), so bf16 is used on a CPU only where this holds."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

"""The benchmark harness: result rows, machine context, interleaved timing, ceilings, validation.

Every op is timed for each fast backend beside the pure-PyTorch reference (and, where a PyTorch user
would write it differently, the plain PyTorch way) in the same run, interleaved call by call,
because this kind of machine drifts by +-30% over minutes: only ratios measured side by side mean
something. The machine's own ceilings (copy bandwidth, matmul throughput per dtype) are measured in
the same run, before and after the ops. The op cases live in benchmark.cases, pipeline and streaming
rows in benchmark.pipeline, training rows in benchmark.training, the run in benchmark.suite and the
markdown table in benchmark.table; `decovae bench` is cli/bench.py.

JSON (DESIGN.md, "Benchmarks"): {"device", "torch", "threads", "ceilings": {"copy_gbps",
"matmul_gflops": {dtype: value}}, "rows": [...]}, plus context keys (allocator, loadavg, checks,
...). Row keys are ROW_KEYS, null where a key does not apply.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import time
from typing import Callable

import torch

from decovae_fast.dtypes import DTYPES


ROW_KEYS = ("name", "shape", "dtype", "backend", "median_ms", "reference_ms", "speedup", "gbps", "gflops",
            "ceiling_fraction", "fps", "peak_mem_mb", "latent_elements", "pixel_frames_per_s", "steps_per_hour")
# Baselines that are not backends of decovae_fast.ops: the way a PyTorch user writes the op.
TORCH_GRID_SAMPLE = "torch_grid_sample"   # warp ops: 5-D grid_sample (border, align_corners) + add/sub
TORCH_SEQUENCE = "torch_sequence"         # conv ops: Wan's RMSNorm -> SiLU -> cat cache -> F.pad -> conv3d
# warp ops: dst.copy_(src) moving the op's ideal bytes (read + write), timed interleaved with the op:
# the machine's copy bandwidth at the same moment, a yardstick beside the run's best copy sample
COPY_SAME_BYTES = "copy_same_bytes"
YARDSTICKS = (COPY_SAME_BYTES,)
NOT_FAST = ("reference", TORCH_GRID_SAMPLE, TORCH_SEQUENCE) + YARDSTICKS  # rows that are no fast backend
def row(**kw) -> dict:
    """A result row with every key of ROW_KEYS (null where not given)."""
    unknown = set(kw) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row keys {sorted(unknown)}")
    return {k: kw.get(k) for k in ROW_KEYS}


def _r(x, digits: int = 3):
    return None if x is None else float(f"{x:.{digits + 3}g}") if abs(x) >= 1 else float(f"{x:.{digits}g}")


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


def copy_of_bytes(nbytes: int, device) -> Callable:
    """dst.copy_(src) moving nbytes in all (half read, half written): the copy yardstick."""
    src = torch.full((nbytes // 2,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)



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



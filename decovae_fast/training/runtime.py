"""Where and how training runs: the device, bf16 autocast, torchrun's process group and the ops
backend."""
from __future__ import annotations

import contextlib
import os

import torch

from decovae_fast.dtypes import cpu_has_native_bf16
from decovae_fast.errors import UserError
from decovae_fast.training.config import TrainConfig


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {cfg.device!r}: CUDA is not available (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu, cuda, cuda:N or auto, got {cfg.device!r}")
    return dev


def distributed(cuda: bool | None = None) -> tuple[int, int]:
    """(rank, world size): from torchrun's environment, joining the process group on first use
    (NCCL when training on CUDA, gloo on the CPU); (0, 1) in a plain process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def autocast(enabled: bool, device: str = "cpu"):
    return torch.autocast(device, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def amp_enabled(cfg: TrainConfig, device: torch.device | None = None) -> bool:
    if cfg.amp == "none":
        return False
    if cfg.amp == "bf16":
        return True
    if device is not None and device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # On a CPU without native bf16 (AVX2 only) autocast's bf16 convolutions crawl (issue 21: a
    # 128-channel conv3d did not finish in 120 s where fp32 took 0.54 s), so auto means fp32 there.
    # auto: measured on this machine's EPYC (avx512_bf16), bf16 autocast made a tiny step faster
    return torch.backends.mkldnn.is_available() and cpu_has_native_bf16()


def backend_context(cfg: TrainConfig):
    from decovae_fast.ops import use_backend

    return contextlib.nullcontext() if cfg.backend == "auto" else use_backend(cfg.backend)

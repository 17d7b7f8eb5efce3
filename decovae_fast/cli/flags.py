"""What the command families share: the model and video flags, and the device, model and
progress bar those flags name."""
from __future__ import annotations

import sys

import torch

from decovae_fast.dtypes import DTYPES, cpu_has_native_bf16
from decovae_fast.errors import UserError


def model_flags(p) -> None:
    p.add_argument("--weights", metavar="DIR", help="model folder (config.json + model.safetensors); "
                                                    "default: the weights bundled with the package")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--chunk-frames", type=int, metavar="N",
                   help="frames per chunk through the model (bounds memory; default: one GOP)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def video_flags(p) -> None:
    p.add_argument("--size", metavar="HxW", help="resize frames to HEIGHTxWIDTH")
    p.add_argument("--frames", type=int, metavar="N", help="use at most the first N frames")


def output_video_flags(p) -> None:
    p.add_argument("--crf", type=int, default=10, help="H.264 quality of the output (0: lossless 4:4:4; default 10)")


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype that --device and --dtype name (model_flags)."""
    device = resolve_device(args.device)
    return device, compute_dtype(args.dtype, device)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype --dtype names; bf16 on a CPU without native bf16 crawls (dtypes.cpu_has_native_bf16),
    so there it is fp32, with a one-line note."""
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print("decovae: note: this CPU has no native bf16 (avx512_bf16 or AMX); computing in fp32",
              file=sys.stderr)
        return torch.float32
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def load_model(weights, device: torch.device, dtype: torch.dtype):
    """The model in `weights` (either type; config.json says which), or the bundled one."""
    from decovae_fast.models import load_pretrained

    try:
        model = load_pretrained(weights)
    except FileNotFoundError as exc:
        hint = "pass --weights DIR" if weights is None else "expected config.json and model.safetensors"
        raise UserError(f"{exc}; {hint}") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return model.to(device=device, dtype=dtype).eval()


def progress(args, total, desc):
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc=desc, leave=False,
                disable=args.quiet or not sys.stderr.isatty())

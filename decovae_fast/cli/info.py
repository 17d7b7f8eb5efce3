"""`decovae info`: versions, which backends are compiled and usable here, the CPU kernels' instruction
set and why it was chosen, and the device."""
from __future__ import annotations

import json
import platform

import torch

import decovae_fast
from decovae_fast import _ext
from decovae_fast.ops import backends


def collect() -> dict:
    cuda = torch.cuda.is_available()
    info = {
        "decovae_fast": decovae_fast.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()}, "
                                                                f"{torch.get_num_threads()} threads)",
        "extension": "built" if _ext.cpu_compiled() else f"not built ({_ext.LOAD_ERROR})",
        "cpu_kernels": _ext.cpu_capability_reason(),
        "backends": backends(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, compiled and usable backends, device")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key != "backends":
            print(f"{key:14s} {value}")
    print("backends:")
    for name, b in info["backends"].items():
        state = "usable" if b["usable"] else ("compiled, not usable" if b["compiled"] else "not available")
        print(f"  {name:10s} {state:22s} {b['reason']}")
    return 0

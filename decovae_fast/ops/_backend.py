"""Which backend runs an op: the fastest available for the tensors' device, unless one is forced.

Backends: reference (pure PyTorch), cpu (C++ in the extension), cuda (CUDA in the extension, or
the Triton kernel registered under the CUDA key), triton (the Triton kernels called directly; on a
CPU tensor only under TRITON_INTERPRET=1, which is how the tests run them).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading

import torch

from decovae_fast import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "DECOVAE_BACKEND"
_local = threading.local()


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _availability() -> dict:
    """{name: {"compiled": bool, "usable": bool, "reason": str}} for every backend."""
    cuda_dev = torch.cuda.is_available()
    info = {"reference": (True, True, "pure PyTorch")}
    cpu = _ext.cpu_compiled()
    info["cpu"] = (cpu, cpu, "C++ extension" if cpu else f"extension not built: {_ext.LOAD_ERROR}")
    cuda = _ext.cuda_compiled()
    info["cuda"] = (cuda, cuda and cuda_dev,
                    "CUDA kernels" + ("" if cuda_dev else "; no CUDA device") if cuda
                    else "extension built without CUDA")
    tri = _triton_installed()
    info["triton"] = (tri, tri and (cuda_dev or _triton_interpret()),
                      ("Triton kernels" + ("" if cuda_dev else
                                           " (interpreter)" if _triton_interpret()
                                           else "; no CUDA device (TRITON_INTERPRET=1 runs them on CPU)"))
                      if tri else "triton not installed")
    return {k: {"compiled": c, "usable": u, "reason": r} for k, (c, u, r) in info.items()}


def backends() -> dict:
    """{name: {"compiled": bool, "usable": bool, "reason": str}} for every backend."""
    return {k: dict(v) for k, v in _availability().items()}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _check_usable(name: str) -> None:
    b = _availability()[name]
    if not b["usable"]:
        raise RuntimeError(f"backend {name!r} is not usable here: {b['reason']}")


@contextlib.contextmanager
def use_backend(name: str):
    """Force `name` for every op called in this block (this thread)."""
    _check_name(name)
    _check_usable(name)
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def forced_backend() -> str | None:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            _check_name(env)
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR}: {exc}") from None
        _check_usable(env)
        return env
    return None


def _has_kernel(op: str, key: str) -> bool:
    if not _ext.cpu_compiled():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"decovae::{op}", key)


def _triton_has(op: str) -> bool:
    if not _triton_installed():
        return False
    from decovae_fast.ops.triton import TRITON_OPS

    return op in TRITON_OPS


def implements(backend: str, op: str) -> bool:
    """Whether `backend` has its own kernel for `op`."""
    if backend == "reference":
        return True
    if backend == "cpu":
        return _has_kernel(op, "CPU")
    if backend == "cuda":
        return _has_kernel(op, "CUDA")
    return _triton_has(op)


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and _triton_interpret())


def backend_for(op: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device`.

    A forced backend runs every op it implements and the reference runs the others, so forcing
    never silently swaps one fast backend for another. A forced backend that cannot run on the
    tensors' device is an error.
    """
    forced = forced_backend()
    if forced is not None:
        if not _device_ok(forced, device):
            raise RuntimeError(f"backend {forced!r} cannot run {op} on {device.type} tensors")
        return forced if implements(forced, op) else "reference"
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in order:
        if _availability()[name]["usable"] and implements(name, op):
            return name
    return "reference"

"""The latent file: a safetensors file holding a video's latent (the means the decoder needs) and
string metadata that makes it self-sufficient: format and version, the model's type and config
hash, the original frames, height, width and fps, the GOP boundaries and the dtype.

A checksum over the metadata and the tensors (name, dtype, shape, bytes) catches a tampered header
or a damaged body that still parses; a truncated file fails to parse. Every problem is a UserError
naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from fractions import Fraction

import torch

from decovae_fast.errors import UserError
from decovae_fast.io.outputs import save_safetensors

FORMAT = "decovae-latent"
FORMAT_VERSION = 1
_OWN_KEYS = ("format", "format_version", "model_type", "config_hash", "fps", "dtype", "latent_elements")


@dataclass
class LatentFile:
    latent: object          # decovae_fast.models.DeCoLatent
    model_type: str
    config_hash: str
    fps: Fraction

    @property
    def frames(self) -> int:
        return self.latent.frames

    @property
    def height(self) -> int:
        return self.latent.height

    @property
    def width(self) -> int:
        return self.latent.width

    @property
    def gop_starts(self) -> list[int]:
        return list(self.latent.gop_starts)


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_latent(path, latent, *, model_type: str, config_hash: str, fps: Fraction) -> None:
    """Writes `latent` (a DeCoLatent, batch of 1) to `path` atomically."""
    tensors, meta = latent.to_tensors()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    clash = set(meta) & set(_OWN_KEYS)
    if clash:
        raise RuntimeError(f"latent metadata keys {sorted(clash)} clash with the file's own keys")
    dtype = next(iter(tensors.values())).dtype
    meta = dict(meta, format=FORMAT, format_version=str(FORMAT_VERSION), model_type=model_type,
                config_hash=config_hash, fps=str(Fraction(fps)), dtype=str(dtype).replace("torch.", ""),
                latent_elements=str(latent.numel()))
    meta["checksum"] = _checksum(tensors, meta)
    save_safetensors(path, tensors, meta)


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise UserError(f"{path}: not a readable latent file (truncated or corrupt: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return tensors, meta


def load_latent(path, *, expect_config_hash: str | None = None) -> LatentFile:
    """Reads and checks a latent file; with expect_config_hash, also that it fits that model."""
    from decovae_fast.models.latent import DeCoLatent

    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected a latent file")
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a decovae latent file (no '{FORMAT}' format tag)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise UserError(f"{path}: latent format version {meta.get('format_version')!r} is not supported "
                        f"(this decovae reads version {FORMAT_VERSION})")
    if meta.get("checksum") != _checksum(tensors, meta):
        raise UserError(f"{path}: checksum mismatch: the header or the data was modified or damaged")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{path}: latent tensor '{name}' contains NaN or infinite values")
    try:
        fps = Fraction(meta["fps"])
        if fps <= 0:
            raise ValueError("fps must be positive")
        latent = DeCoLatent.from_tensors(tensors, meta)
    except (KeyError, ValueError, ZeroDivisionError) as exc:
        raise UserError(f"{path}: malformed latent metadata ({exc})") from None
    if latent.frames < 1 or latent.height < 1 or latent.width < 1:
        raise UserError(f"{path}: malformed latent metadata (size {latent.frames}x{latent.height}x{latent.width})")
    if expect_config_hash is not None and meta.get("config_hash") != expect_config_hash:
        raise UserError(f"{path}: written by a {meta.get('model_type')} model with config hash "
                        f"{meta.get('config_hash')}, but the loaded model's config hash is {expect_config_hash}; "
                        f"pass --weights with the model that encoded it")
    return LatentFile(latent, meta.get("model_type", "?"), meta.get("config_hash", "?"), fps)

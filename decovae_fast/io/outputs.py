"""Output files that appear whole or not at all: each is written under a temporary name in its
own folder (same filesystem, so the final rename is atomic) and renamed once complete. This is the
one implementation: videos, latent files, reports, weights, checkpoints and benchmark JSON all go
through atomic_output."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from decovae_fast.errors import UserError


def check_writable(path: str | os.PathLike) -> Path:
    """Fails fast, before any heavy work, when `path` cannot be written as an output file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected an output file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{path}: output folder {folder} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{path}: output file exists and is not writable")
    return path


def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden sibling of `path` that keeps its extension (muxers pick the format from it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


# errors of the storage rather than of the program: a full disk, a file-size limit, a quota, a
# read-only file system, a permission taken away midway
STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def cannot_write(path, reason: str) -> UserError:
    return UserError(f"{path}: cannot write the output ({reason}); nothing was left behind")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yields a temporary path; renames it to `path` on success, removes it on any failure. A
    storage error (STORAGE_ERRNOS) while writing becomes a one-line UserError."""
    path = check_writable(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            raise cannot_write(path, exc.strerror or str(exc)) from None
        raise


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors' save_file, atomically; a storage error becomes a one-line UserError."""
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as exc:  # safetensors reports I/O errors as its own type, with the OS's words
            if "I/O error" in str(exc):
                raise cannot_write(path, str(exc).split("I/O error:")[-1].strip()) from None
            raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` to `path`, atomically."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)

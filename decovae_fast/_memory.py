"""Hands freed heap memory back to the OS between GOPs: glibc keeps freed blocks below its
(dynamic) mmap threshold in the heap, so a long stream's resident size creeps up with
fragmentation; bounded memory whatever the video's length is a promise of the streaming API."""
from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

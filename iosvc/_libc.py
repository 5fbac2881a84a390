"""libc's memory-mapping calls through ctypes, on Linux: what the ``mmap`` module lacks
(mapping at a chosen address, ``madvise`` of a range not mapped by it)."""

from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["MAP_FAILED", "libc"]

MAP_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def libc() -> ctypes.CDLL | None:
    """libc with ``mmap``, ``munmap`` and ``madvise`` typed; None off Linux."""
    if sys.platform != "linux":
        return None
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.madvise.restype = ctypes.c_int
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return lib

"""glibc malloc tuning shared by servers and clients.

Every chunk passes through fresh 1-4 MiB buffers (gRPC receive and send slices, the ``bytes``
of each message). With glibc's defaults many of those are ``mmap``-ed and unmapped again, or
trimmed off the top of the heap, and every new page then faults and is zeroed by the kernel:
page faults are expensive in VMs. Raising the mmap and trim thresholds keeps freed buffers in the
heap for reuse: a raw grpc stream here went from ~0.85 to ~1.3 GB/s (4 MiB messages), and a
client reading a large file spent ~0.35 fewer CPU-seconds per GiB in the kernel
(bench/README.md). glibc only; elsewhere a no-op.
"""

from __future__ import annotations

import os

__all__ = ["tune_client_malloc", "tune_malloc"]

_client_tuned: bool | None = None


def tune_malloc(
    *, mmap_threshold: int = 64 << 20, trim_threshold: int = 1 << 30, top_pad: int = 64 << 20
) -> bool:
    """Set glibc's mmap threshold, trim threshold and top pad; True if glibc took them."""
    import ctypes

    try:
        # The symbols already loaded (libc's among them): ctypes.util.find_library("c")
        # ran `ldconfig -p` in a subprocess, ~2 ms on every client's way to its first read
        # (each DataLoader worker's, each CLI command's).
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, mmap_threshold)
        ok &= libc.mallopt(m_trim_threshold, trim_threshold)
        ok &= libc.mallopt(m_top_pad, top_pad)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def tune_client_malloc() -> bool:
    """Tune malloc once per client process, unless ``IOSVC_TUNE_MALLOC=0``.

    Lighter than the servers' setting: freed buffers stay in the heap up to 256 MiB above its top
    (instead of 1 GiB), so a client process gives memory back to the OS once it is idle.
    """
    global _client_tuned
    if _client_tuned is None:
        if os.environ.get("IOSVC_TUNE_MALLOC", "1") == "0":
            _client_tuned = False
        else:
            _client_tuned = tune_malloc(trim_threshold=256 << 20, top_pad=16 << 20)
    return _client_tuned

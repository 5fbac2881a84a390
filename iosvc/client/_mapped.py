"""One contiguous read-only view of a file whose chunks lie in other files: mapped, not copied.

A server on the reader's host keeps each chunk of a file in a file of its own (``--dir``
store). :class:`MappedFile` reserves address space for the whole file and maps each chunk file
over its part with ``MAP_FIXED``, so the reader gets one ``memoryview`` of the file with no
copy and no fresh memory: its pages are the chunk files' page-cache (or tmpfs) pages, shared
with the server, as a local file's ``mmap`` is. Parts that came another way (through gRPC) are
copied into the anonymous memory underneath.

Safe because a server never changes a chunk file in place: it writes a new version to a
temporary file and renames it over, and removing a chunk unlinks the file, which leaves a
mapping of it intact (the pages live until the mapping goes). The mapping is released
(``munmap``) when the last view of it is gone.

Linux only (``MAP_FIXED`` over a reservation); :func:`can_map` says whether a file can be.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

from dataloaders._huge import HUGE_PAGE, MAP_FAILED, libc

__all__ = ["MappedFile", "can_map"]

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # the same on every Linux architecture; not exported by the mmap module
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_libc = libc()


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def can_map(chunk_size: int) -> bool:
    """True if files of ``chunk_size`` chunks can be mapped here (Linux, page-aligned chunks)."""
    return _libc is not None and chunk_size > 0 and chunk_size % PAGE == 0


def _checked(address: int | None, what: str) -> int:
    if address is None or address == MAP_FAILED:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return address


def _munmap(address: int, length: int) -> None:
    assert _libc is not None
    _libc.munmap(address, length)


class MappedFile:
    """Address space for ``size`` bytes, filled chunk by chunk by mapping or by copying.

    Parameters
    ----------
    size
        Bytes of the file (> 0).
    """

    def __init__(self, size: int) -> None:
        if _libc is None:
            raise OSError("mapping chunk files needs Linux")
        if size <= 0:
            raise ValueError("nothing to map")
        self.size = size
        self._length = _pages(size)
        # Anonymous, private and unreserved: untouched pages cost nothing, and a chunk that is
        # copied in (not mapped) lands here. 2 MiB more than needed, trimmed to start at a
        # 2 MiB boundary: the kernel maps a chunk file's huge pages (a server's collapsed
        # tmpfs files, iosvc.server._stores) whole only where address and file offset agree
        # modulo 2 MiB, and chunks of 2 MiB multiples start at such offsets.
        reserved = _libc.mmap(
            None,
            self._length + HUGE_PAGE,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            -1,
            0,
        )
        reserved = _checked(reserved, f"mmap of {size} bytes")
        address = -(-reserved // HUGE_PAGE) * HUGE_PAGE
        if address > reserved:
            _libc.munmap(reserved, address - reserved)
        _libc.munmap(address + self._length, reserved + HUGE_PAGE - address)  # the rest
        self._address = address
        array = (ctypes.c_char * size).from_address(address)
        # The views below refer to ``array``; the array keeps this object (and so the mapping)
        # alive, and the mapping goes when the last of them does.
        array._owner = self  # type: ignore[attr-defined]
        self._writable: memoryview | None = memoryview(array).cast("B")
        self._finalizer = weakref.finalize(self, _munmap, address, self._length)

    def map_chunk(self, offset: int, fd: int, length: int) -> memoryview:
        """Map ``length`` bytes from the start of ``fd`` at ``offset``; return them.

        ``offset`` must be page-aligned, and the file must hold ``length`` bytes (checked:
        pages past a file's end would fault with SIGBUS when read).
        """
        assert _libc is not None and self._writable is not None
        if offset % PAGE or offset < 0 or offset + length > self.size:
            raise ValueError(f"cannot map {length} bytes at {offset} of {self.size}")
        if os.fstat(fd).st_size < length:
            raise OSError(f"chunk file holds fewer than {length} bytes")
        address = _libc.mmap(
            self._address + offset,
            _pages(length),
            mmap.PROT_READ,
            mmap.MAP_SHARED | _MAP_FIXED,
            fd,
            0,
        )
        _checked(address, "mmap of a chunk file")
        return self._writable[offset : offset + length].toreadonly()

    def copy(self, offset: int, data: memoryview | bytes) -> None:
        """Copy a chunk piece that did not come from a file into place."""
        assert self._writable is not None
        self._writable[offset : offset + len(data)] = data

    def view(self) -> memoryview:
        """The whole file, read-only; this object is done (only the views remain)."""
        assert self._writable is not None
        view = self._writable.toreadonly()
        self._writable = None  # pages mapped read-only must not be written through a view
        return view

"""Chunk stores: where a server keeps bytes.

An async ABC with capability flags (after zarr-python v3's ``abc/store.py``) and two
implementations: :class:`MemoryStore` (DRAM, the burst buffer proper) and :class:`LocalDirStore`
(node-local disk; survives a server restart). Both enforce a capacity and answer
:class:`~iosvc.errors.QuotaExceeded` (ENOSPC) when full, never crash.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from dataloaders._huge import HUGE_PAGE, collapse_new_range, collapses_new_files
from iosvc.errors import NotFound, QuotaExceeded

__all__ = ["ByteRange", "ChunkStore", "LocalDirStore", "MemoryStore"]

# Chunk bigger than this are read/written in a worker thread so the event loop keeps serving.
_THREAD_THRESHOLD = 256 * 1024


@dataclass(frozen=True, slots=True)
class ByteRange:
    """``length`` bytes starting at ``start`` of a stored value."""

    start: int
    length: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 0:
            raise ValueError("byte range start and length must be >= 0")


class ChunkStore(ABC):
    """Async key -> bytes store with a capacity.

    Keys are internal (``c/<home>/<uid>/<i>`` chunks, ``m/<hash>`` metadata records), never user
    paths, so a store needs no path validation of its own.
    """

    #: Data survives a restart of the server process.
    supports_persistence: bool = False
    #: Values lie in files a client on this host may read itself (see :meth:`local_path`).
    keeps_files: bool = False

    def __init__(self, capacity: int | None) -> None:
        if capacity is not None and capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.used_bytes = 0

    def free_bytes(self) -> int | None:
        """Bytes that can still be stored, or None when unbounded."""
        return None if self.capacity is None else max(0, self.capacity - self.used_bytes)

    def local_path(self, key: str) -> str | None:
        """A file holding ``key``'s value that a client on this host may read itself, or
        None if this store keeps values where no other process can read them (memory).
        ``NotFound`` if the key is absent."""
        return None

    def _check_room(self, extra: int) -> None:
        if self.capacity is not None and self.used_bytes + extra > self.capacity:
            raise QuotaExceeded(
                f"server storage full: {self.used_bytes} of {self.capacity} bytes used, "
                f"{extra} more requested"
            )

    @abstractmethod
    async def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | bytearray:
        """Return the value (or a range of it); ``NotFound`` if absent."""

    @abstractmethod
    async def set(self, key: str, value: bytes | bytearray) -> None:
        """Store ``value`` under ``key``, replacing any old value; ``QuotaExceeded`` if full."""

    @abstractmethod
    async def delete(self, key: str) -> int:
        """Remove ``key``; return the bytes freed (0 if it was absent)."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""

    @abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[str]:
        """Iterate the keys starting with ``prefix``."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class MemoryStore(ChunkStore):
    """Values in a dict in DRAM: the burst buffer proper. Lost when the server stops."""

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self._data: dict[str, bytes | bytearray] = {}

    async def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | bytearray:
        try:
            value = self._data[key]
        except KeyError:
            raise NotFound(f"no chunk {key}") from None
        if byte_range is None:
            return value
        return value[byte_range.start : byte_range.start + byte_range.length]

    async def set(self, key: str, value: bytes | bytearray) -> None:
        old = self._data.get(key)
        self._check_room(len(value) - (len(old) if old is not None else 0))
        # A bytearray is kept as it is: the server builds it for this store and drops it.
        self._data[key] = value if isinstance(value, bytes | bytearray) else bytes(value)
        self.used_bytes += len(value) - (len(old) if old is not None else 0)

    async def delete(self, key: str) -> int:
        old = self._data.pop(key, None)
        if old is None:
            return 0
        self.used_bytes -= len(old)
        return len(old)

    async def exists(self, key: str) -> bool:
        return key in self._data

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        for key in list(self._data):
            if key.startswith(prefix):
                yield key


class LocalDirStore(ChunkStore):
    """Values as files under a directory on node-local disk.

    Writes go to a temporary file and are renamed into place, so a crash never leaves a
    half-written value under a key. A full disk (``ENOSPC`` from the OS) is answered as
    ``QuotaExceeded`` like a full configured capacity.
    """

    supports_persistence = True
    keeps_files = True

    def __init__(self, root: str | os.PathLike[str], capacity: int | None = None) -> None:
        super().__init__(capacity)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)
        # Only the server's user (and so same-user clients reading chunks in place) may look
        # inside: other users go through the server, which checks what they may read.
        self.root.chmod(0o700)
        self._tmp = self.root / ".tmp"
        shutil.rmtree(self._tmp, ignore_errors=True)  # leftovers of a crash mid-write
        self._tmp.mkdir()
        # On a tmpfs without ``huge=`` (/dev/shm), chunks of 2 MiB and more are written into
        # huge pages: a client on this host maps the chunk files in place (``iosvc.client.
        # _mapped``) and then reads them like a local file in 2 MiB pages, not 4 KiB ones.
        # Where fresh huge pages are dear (a VM whose host takes free memory back: a first
        # fill ran at ~0.2x here, bench/results/store_fill.json), IOSVC_HUGE_PAGES=0.
        self._collapse = os.environ.get("IOSVC_HUGE_PAGES") != "0" and collapses_new_files(
            str(self.root)
        )
        self._sizes: dict[str, int] = {}
        for path in self.root.glob("*/*"):
            if path.is_file() and path.parent != self._tmp:
                key = f"{path.parent.name}/{path.name.replace('!', '/')}"
                size = path.stat().st_size
                self._sizes[key] = size
                self.used_bytes += size

    def local_path(self, key: str) -> str | None:
        if key not in self._sizes:
            raise NotFound(f"no chunk {key}")
        return self._path(key)

    def _path(self, key: str) -> str:
        # Two levels only (kind/flattened-rest) so deleting values never leaves empty dirs.
        # A string, not a Path: asked once per chunk read in place, where pathlib's joins
        # were a tenth of the server's CPU.
        kind, _, rest = key.partition("/")
        if not rest:
            return f"{self._root}/{kind}"
        return f"{self._root}/{kind}/{rest.replace('/', '!')}"

    async def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | bytearray:
        size = self._sizes.get(key)
        if size is None:
            raise NotFound(f"no chunk {key}")
        if size >= _THREAD_THRESHOLD and (
            byte_range is None or byte_range.length >= _THREAD_THRESHOLD
        ):
            return await asyncio.to_thread(self._read, key, byte_range)
        return self._read(key, byte_range)

    def _read(self, key: str, byte_range: ByteRange | None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                if byte_range is None:
                    return f.read()
                f.seek(byte_range.start)
                return f.read(byte_range.length)
        except FileNotFoundError:
            raise NotFound(f"no chunk {key}") from None

    async def set(self, key: str, value: bytes | bytearray) -> None:
        old = self._sizes.get(key, 0)
        self._check_room(len(value) - old)
        if len(value) >= _THREAD_THRESHOLD:
            await asyncio.to_thread(self._write, key, value)
        else:
            self._write(key, value)
        self._sizes[key] = len(value)
        self.used_bytes += len(value) - old

    def _write(self, key: str, value: bytes | bytearray) -> None:
        target = Path(self._path(key))
        tmp = self._tmp / uuid.uuid4().hex
        try:
            with open(tmp, "w+b") as f:  # readable too: the collapse maps it
                whole = len(value) // HUGE_PAGE * HUGE_PAGE
                if self._collapse and whole:
                    os.ftruncate(f.fileno(), len(value))
                    collapse_new_range(f.fileno(), 0, whole)  # or 4 KiB pages, as before
                f.write(value)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise QuotaExceeded(f"server disk full writing {len(value)} bytes: {exc}") from None
            raise

    async def delete(self, key: str) -> int:
        size = self._sizes.pop(key, None)
        if size is None:
            return 0
        Path(self._path(key)).unlink(missing_ok=True)
        self.used_bytes -= size
        return size

    async def exists(self, key: str) -> bool:
        return key in self._sizes

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        for key in list(self._sizes):
            if key.startswith(prefix):
                yield key

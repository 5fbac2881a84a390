"""Server-side stage-in: a server reads chunks of files straight from a file system it mounts.

A burst buffer's stage-in is done by its servers, not pushed through a client: DataWarp and
DDN IME pull from the parallel file system that every node mounts, so the data crosses the
network once and no client process sits in the middle. Here a client names, for each server,
the chunks of the files that server holds (path, byte range, the xxh3-64 the client computed
from its own read of the same file); the server reads them with ``pread`` into the buffer it
stores, checks the checksum, and stores the chunk. A chunk the server reads differently from
the client (a file that changed, a non-coherent cache) is refused, never stored.

What a server may read is bounded by its ``--pull-root`` directories (none: pulling is off);
symlinks are resolved before the check, so a link cannot lead outside a root. In secure mode
only admins may pull (they publish ``datasets/``): a user's token says nothing about which
files of the shared file system that user may read.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import xxhash

from iosvc.errors import DataCorruption, InvalidArgument, NotFound, PermissionDenied
from iosvc.server._records import CHECKSUM_TRAILER as _CK
from iosvc.server._records import parse_chunk_key
from iosvc.wire import MAX_CHUNK_SIZE

__all__ = ["PullChunk", "PullFile", "PullSource", "parse_pull_files"]


@dataclass(frozen=True, slots=True)
class PullChunk:
    """Chunk ``index`` of a file, to store under ``key`` (of version ``uid`` homed on
    ``home``) if its bytes hash to ``checksum``."""

    index: int
    key: str
    checksum: int
    home: int
    uid: str


@dataclass(frozen=True, slots=True)
class PullFile:
    """A source file as the client saw it, and the chunks of it this server is to store."""

    source: str
    size: int
    mtime_ns: int
    chunk_size: int
    chunks: tuple[PullChunk, ...]


class PullSource:
    """Reads chunk ranges of files under allowed roots into stored values.

    Parameters
    ----------
    roots
        Directories the server may read from; empty: pulling is refused.
    """

    def __init__(self, roots: list[str] | tuple[str, ...] = ()) -> None:
        self.roots = tuple(os.path.realpath(r) for r in roots)

    def _open(self, path: str) -> int:
        """An open descriptor of ``path``, checked to lie under the roots once opened."""
        if not self.roots:
            raise PermissionDenied(
                "this server does not stage in from its file system (start it with "
                "--pull-root DIR to allow reads under DIR)"
            )
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise InvalidArgument(f"pull source must be an absolute path, not {path!r:.200}")
        try:
            # O_NOFOLLOW: the file itself must not be a link.
            fd = os.open(os.path.normpath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"pull source {path} not found on this server") from None
        except PermissionError:
            raise PermissionDenied(f"pull source {path}: permission denied") from None
        except OSError as exc:
            raise NotFound(f"pull source {path}: {exc.strerror}") from None
        # Where the descriptor really points, links in the directories resolved: checked
        # after the open, so a directory swapped for a link meanwhile cannot lead outside.
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: resolve the path instead
            real = os.path.realpath(path)
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots):
            os.close(fd)
            raise PermissionDenied(f"{path} is outside this server's pull roots {self.roots}")
        return fd

    def read(self, file: PullFile) -> list[bytearray]:
        """The stored values (chunk bytes + xxh3-64 trailer) of ``file.chunks``, in order.

        Raises ``NotFound`` if the server cannot see the file as the client described it
        (absent, another size or modification time: not the same file system), and
        ``DataCorruption`` if a chunk's bytes do not hash to the client's checksum.
        """
        fd = self._open(file.source)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"pull source {file.source} is not a regular file")
            if st.st_size != file.size or st.st_mtime_ns != file.mtime_ns:
                raise NotFound(
                    f"pull source {file.source} differs here (size {st.st_size}, mtime "
                    f"{st.st_mtime_ns}) from what the client read (size {file.size}, mtime "
                    f"{file.mtime_ns}): not the same file system, or the file changed"
                )
            values = []
            for chunk in file.chunks:
                offset = chunk.index * file.chunk_size
                length = min(file.chunk_size, file.size - offset)
                if length <= 0:
                    raise InvalidArgument(f"{file.source}: chunk {chunk.index} past the end")
                value = bytearray(length + _CK)
                view = memoryview(value)
                got = os.preadv(fd, [view[:length]], offset)
                if got != length:
                    raise NotFound(f"pull source {file.source} shrank while it was read")
                if xxhash.xxh3_64_intdigest(view[:length]) != chunk.checksum:
                    raise DataCorruption(
                        f"pull source {file.source} chunk {chunk.index} reads differently here "
                        "than at the client (the file changed or caches disagree); not stored"
                    )
                view[length:] = chunk.checksum.to_bytes(_CK, "little")
                values.append(value)
            return values
        finally:
            os.close(fd)


def parse_pull_files(entries: list[object], max_bytes: int) -> tuple[list[PullFile], int]:
    """Validate the ``files`` of a ``pull`` request; return them and the bytes they ask for.

    ``InvalidArgument`` if malformed.
    """
    files = []
    total = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidArgument("each pull file must be a map")
        try:
            source, size, mtime_ns = entry["src"], entry["s"], entry["mt"]
            chunk_size, chunks = entry["cs"], entry.get("chunks", [])
        except KeyError as exc:
            raise InvalidArgument(f"pull file without {exc}") from None
        ints = (size, mtime_ns, chunk_size)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise InvalidArgument("pull file size, mtime and chunk size must be integers")
        if size < 0 or not 4096 <= chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidArgument("pull file size or chunk size out of range")
        if not isinstance(chunks, list):
            raise InvalidArgument("pull file 'chunks' must be a list")
        parsed = []
        for chunk in chunks:
            if (
                not isinstance(chunk, list)
                or len(chunk) != 3
                or not isinstance(chunk[0], int)
                or not isinstance(chunk[1], str)
                or not isinstance(chunk[2], int)
                or chunk[0] < 0
            ):
                raise InvalidArgument("each pull chunk must be [index, key, checksum]")
            home, uid, index = parse_chunk_key(chunk[1])
            if index != chunk[0]:
                raise InvalidArgument(f"chunk key {chunk[1]} is not chunk {chunk[0]}")
            parsed.append(PullChunk(chunk[0], chunk[1], chunk[2], home, uid))
            total += min(chunk_size, max(0, size - chunk[0] * chunk_size))
        if not isinstance(source, str):
            raise InvalidArgument("pull file 'src' must be a path")
        files.append(PullFile(source, size, mtime_ns, chunk_size, tuple(parsed)))
    if total > max_bytes:
        raise InvalidArgument(f"pull of {total} bytes in one call is over the {max_bytes} limit")
    return files, total

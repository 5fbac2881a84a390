"""Where things live: path validation, home servers, chunk striping.

A file's **home server** is chosen by rendezvous (highest-random-weight) hashing of its path
with xxh3: each server gets score ``xxh3(path, seed=server)`` and the highest wins, so adding a
server moves ~1/N of the files. Chunk *i* of a file lives on ``(home + i) mod N``: round-robin
striping as in ThemisIO, so a large read pulls from every server at once.
"""

from __future__ import annotations

import xxhash

from iosvc.errors import InvalidArgument

__all__ = ["MAX_PATH_BYTES", "MAX_SEGMENT_BYTES", "Placement", "normalize_path", "validate_path"]

MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255


def normalize_path(path: str) -> str:
    """Client-side: turn a user path into the canonical key ``a/b/c``.

    A leading ``/`` or ``iosvc://`` names the namespace root and is dropped; a trailing ``/``
    is dropped. Everything :func:`validate_path` rejects is rejected here too, with the same
    message, so bad paths fail before any bytes move.
    """
    if not isinstance(path, str):
        raise InvalidArgument(f"path must be a string, got {type(path).__name__}")
    if path.startswith("iosvc://"):
        path = path[len("iosvc://") :]
    path = path.strip("/")
    validate_path(path)
    return path


def validate_path(path: object, *, allow_root: bool = False) -> str:
    """Server-side: accept only canonical keys; raise ``InvalidArgument`` otherwise."""
    if not isinstance(path, str):
        raise InvalidArgument("path must be a string")
    if path == "":
        if allow_root:
            return path
        raise InvalidArgument("empty path")
    if "\x00" in path:
        raise InvalidArgument(f"path contains a NUL byte: {path!r}")
    encoded = path.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidArgument(f"path is {len(encoded)} bytes, over the {MAX_PATH_BYTES} limit")
    if path.startswith("/"):
        raise InvalidArgument(f"path must be relative to the namespace root: {path!r}")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument(f"path has an empty, '.' or '..' segment: {path!r}")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise InvalidArgument(
                f"path segment over {MAX_SEGMENT_BYTES} bytes in {path[:80]!r}..."
            )
    return path


class Placement:
    """Maps paths to home servers and chunks to servers for a cluster of ``n_servers``."""

    __slots__ = ("n_servers",)

    def __init__(self, n_servers: int) -> None:
        if n_servers < 1:
            raise ValueError("a cluster needs at least one server")
        self.n_servers = n_servers

    def home(self, path: str) -> int:
        """Index of the server holding ``path``'s metadata and chunk 0."""
        if self.n_servers == 1:
            return 0
        data = path.encode("utf-8", "surrogatepass")
        hash_ = xxhash.xxh3_64_intdigest
        best, best_score = 0, -1
        for index in range(self.n_servers):
            score = hash_(data, seed=index)
            if score > best_score:
                best, best_score = index, score
        return best

    def chunk_server(self, home: int, chunk_index: int) -> int:
        """Index of the server holding chunk ``chunk_index`` of a file homed on ``home``."""
        return (home + chunk_index) % self.n_servers

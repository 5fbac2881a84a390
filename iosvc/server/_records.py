"""File records: the metadata a home server keeps for each file or directory marker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from iosvc.errors import InvalidArgument
from iosvc.placement import validate_path
from iosvc.wire import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE

__all__ = ["CHECKSUM_TRAILER", "FileRecord", "chunk_key", "parse_chunk_key"]

KIND_FILE = "f"
KIND_DIR = "d"
#: Bytes of the xxh3-64 trailer stored after each chunk's data.
CHECKSUM_TRAILER = 8


def chunk_key(home: int, uid: str, index: int) -> str:
    """Store key of chunk ``index`` of version ``uid`` of a file homed on ``home``.

    The home index is part of the key so a data server knows whom to ask whether the version
    it holds is still live (garbage collection of crashed writers and replaced files).
    """
    return f"c/{home}/{uid}/{index}"


def parse_chunk_key(key: Any) -> tuple[int, str, int]:
    """Inverse of :func:`chunk_key`; ``InvalidArgument`` for anything else."""
    if not isinstance(key, str):
        raise InvalidArgument("chunk key must be a string")
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "c" or not parts[1].isdigit() or not parts[3].isdigit():
        raise InvalidArgument(f"malformed chunk key {key[:80]!r}")
    uid = parts[2]
    if not (8 <= len(uid) <= 64) or not uid.isalnum():
        raise InvalidArgument(f"malformed version id in chunk key {key[:80]!r}")
    return int(parts[1]), uid, int(parts[3])


@dataclass(slots=True)
class FileRecord:
    """One file (or directory marker) in the namespace.

    ``checksums[i]`` is the xxh3-64 of chunk ``i`` as the writer computed it.
    """

    path: str
    kind: str = KIND_FILE
    size: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    uid: str = ""
    checksums: list[int] = field(default_factory=list)
    mtime: float = 0.0
    owner: list[Any] = field(default_factory=list)

    @property
    def n_chunks(self) -> int:
        return len(self.checksums)

    def to_wire(self) -> dict[str, Any]:
        return {
            "p": self.path,
            "k": self.kind,
            "s": self.size,
            "cs": self.chunk_size,
            "u": self.uid,
            "ck": self.checksums,
            "mt": self.mtime,
            "o": self.owner,
        }

    @classmethod
    def from_wire(cls, data: Any) -> FileRecord:
        """Parse and validate a record sent by a client; ``InvalidArgument`` if inconsistent."""
        if not isinstance(data, dict):
            raise InvalidArgument("file record must be a map")
        try:
            rec = cls(
                path=validate_path(data["p"]),
                kind=data.get("k", KIND_FILE),
                size=int(data.get("s", 0)),
                chunk_size=int(data.get("cs", DEFAULT_CHUNK_SIZE)),
                uid=str(data.get("u", "")),
                checksums=[int(c) for c in data.get("ck", [])],
                mtime=float(data.get("mt", 0.0)),
                owner=list(data.get("o", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed file record: {exc}") from None
        if rec.kind not in (KIND_FILE, KIND_DIR):
            raise InvalidArgument(f"unknown record kind {rec.kind!r}")
        if rec.kind == KIND_FILE:
            if not 4096 <= rec.chunk_size <= MAX_CHUNK_SIZE:
                raise InvalidArgument(
                    f"chunk size {rec.chunk_size} outside [4096, {MAX_CHUNK_SIZE}]"
                )
            if rec.size < 0:
                raise InvalidArgument("negative file size")
            expected = -(-rec.size // rec.chunk_size)
            if len(rec.checksums) != expected:
                raise InvalidArgument(
                    f"{rec.path}: {len(rec.checksums)} checksums for {expected} chunks"
                )
            if not (8 <= len(rec.uid) <= 64) or not rec.uid.isalnum():
                raise InvalidArgument("file record needs an alphanumeric version id")
        return rec

"""The part of the namespace a server is home for.

Flat keys with ``/``; directories are implied by prefixes (plus optional directory markers made
by ``mkdir``). Records are persisted in the server's chunk store under ``m/<hash>`` so a
:class:`~iosvc.server.LocalDirStore` server comes back with every committed file.
"""

from __future__ import annotations

import msgpack
import xxhash
from sortedcontainers import SortedList

from iosvc.server._records import KIND_DIR, FileRecord
from iosvc.server._stores import ChunkStore

__all__ = ["Namespace"]


def owner_user(rec: FileRecord) -> str | None:
    """The user who owns a file (its writer's identity), if recorded."""
    owner = rec.owner
    if isinstance(owner, list) and len(owner) >= 2 and isinstance(owner[1], str):
        return owner[1]
    return None


def _meta_key(path: str) -> str:
    return "m/" + xxhash.xxh3_128_hexdigest(path.encode("utf-8", "surrogatepass"))


class Namespace:
    """Committed records of the files homed on this server."""

    def __init__(self, store: ChunkStore) -> None:
        self._store = store
        self._records: dict[str, FileRecord] = {}
        self._paths: SortedList = SortedList()
        self._by_uid: dict[str, str] = {}
        #: bytes of committed files homed here, by owning user (what quotas count)
        self.usage: dict[str, int] = {}

    async def load(self) -> int:
        """Read persisted records back (after a restart); returns how many."""
        async for key in self._store.list("m/"):
            rec = FileRecord(**msgpack.unpackb(await self._store.get(key), raw=False))
            self._install(rec)
        return len(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, path: str) -> FileRecord | None:
        return self._records.get(path)

    def is_live(self, uid: str) -> bool:
        """Whether a committed record still points at version ``uid``."""
        return uid in self._by_uid

    def _account(self, rec: FileRecord, sign: int) -> None:
        user = owner_user(rec)
        if user is not None:
            left = self.usage.get(user, 0) + sign * rec.size
            if left:
                self.usage[user] = left
            else:
                self.usage.pop(user, None)

    def _install(self, rec: FileRecord) -> FileRecord | None:
        old = self._records.get(rec.path)
        self._account(rec, +1)
        if old is not None:
            self._account(old, -1)
        if old is None:
            self._paths.add(rec.path)
        elif old.uid:
            self._by_uid.pop(old.uid, None)
        self._records[rec.path] = rec
        if rec.uid:
            self._by_uid[rec.uid] = rec.path
        return old

    async def commit(self, rec: FileRecord) -> FileRecord | None:
        """Make ``rec`` the visible version of its path; return the version it replaced.

        The record is persisted before it is installed, so a crash in between leaves the old
        version visible, never a half state. Commits of one path serialise on the event loop:
        the last commit wins.
        """
        if self._store.supports_persistence:
            await self._store.set(_meta_key(rec.path), _pack(rec))
        return self._install(rec)

    async def remove(self, path: str) -> FileRecord | None:
        rec = self._records.pop(path, None)
        if rec is None:
            return None
        self._account(rec, -1)
        self._paths.remove(path)
        if rec.uid:
            self._by_uid.pop(rec.uid, None)
        if self._store.supports_persistence:
            await self._store.delete(_meta_key(path))
        return rec

    def list_prefix(self, prefix: str, recursive: bool) -> tuple[list[FileRecord], list[str]]:
        """Records under ``prefix`` and, when not recursive, the implied child directories.

        ``prefix`` "" is the root. Runs in O(log n + k) with k entries returned: after a child
        directory is seen, the scan jumps past all of its descendants.
        """
        start = f"{prefix}/" if prefix else ""
        files: list[FileRecord] = []
        dirs: list[str] = []
        paths = self._paths
        i = paths.bisect_left(start)
        n = len(paths)
        while i < n:
            path = paths[i]
            if not path.startswith(start):
                break
            rest = path[len(start) :]
            slash = rest.find("/")
            if slash >= 0 and not recursive:
                child = start + rest[:slash]
                dirs.append(child)
                i = paths.bisect_left(child + "0")  # '0' follows '/' in code-point order
                continue
            rec = self._records[path]
            if rec.kind == KIND_DIR and not recursive:
                dirs.append(path)
            else:
                files.append(rec)
            i += 1
        return files, dirs

    def has_prefix(self, prefix: str) -> bool:
        start = f"{prefix}/"
        i = self._paths.bisect_left(start)
        return bool(i < len(self._paths) and self._paths[i].startswith(start))


def _pack(rec: FileRecord) -> bytes:
    return msgpack.packb(
        {
            "path": rec.path,
            "kind": rec.kind,
            "size": rec.size,
            "chunk_size": rec.chunk_size,
            "uid": rec.uid,
            "checksums": rec.checksums,
            "mtime": rec.mtime,
            "owner": rec.owner,
        },
        use_bin_type=True,
    )

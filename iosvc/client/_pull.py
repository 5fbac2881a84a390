"""Server-side stage-in, the client's half: ``AsyncClient.pull_files``.

The client reads each source file once to checksum it (xxh3-64 per chunk, plus the caller's
own hash for a manifest check) and tells every server which chunks of which file to read
itself (``pull``, see ``iosvc/server/_pull.py``). No data passes through the client or gRPC;
each server checks that what it read hashes to the client's checksum before storing it, so
what lands in the buffer is exactly what the client read. A file becomes visible only when
all its chunks are stored and the caller's ``accept`` has passed it: small files (one chunk)
are committed by their home server in the same call, large ones with one ``commit``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from iosvc.errors import Cancelled, IosvcError, NotFound
from iosvc.placement import normalize_path

if TYPE_CHECKING:
    from iosvc.client._async import AsyncClient

__all__ = ["Hasher", "pull_files", "pull_probe"]

#: Files per small-file batch (read and hashed in one worker-thread call).
_BATCH_FILES = 256
#: Chunks of a large file read and hashed before their pulls are sent.
_SEGMENT_CHUNKS = 16
#: Concurrent pull calls per server: enough to keep its reads and its loop busy.
_PER_SERVER = 3
#: Concurrent batches / large files in flight.
_WORKERS = 4


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...


@dataclass(slots=True)
class _Source:
    dest: str
    local: str
    size: int = 0
    mtime_ns: int = 0
    checksums: list[int] = field(default_factory=list)
    hasher: Hasher | None = None
    error: IosvcError | None = None

    def wire(self, chunk_size: int, chunks: list[list[Any]]) -> dict[str, Any]:
        return {
            "src": self.local,
            "s": self.size,
            "mt": self.mtime_ns,
            "cs": chunk_size,
            "chunks": chunks,
        }

    def record(self, chunk_size: int, uid: str) -> dict[str, Any]:
        """The file record to commit once every chunk of version ``uid`` is stored."""
        return {"p": self.dest, "s": self.size, "cs": chunk_size, "u": uid, "ck": self.checksums}


def _open(src: _Source) -> int:
    try:
        fd = os.open(src.local, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no such local file: {src.local}") from None
    except OSError as exc:
        raise NotFound(f"{src.local}: {exc.strerror}") from None
    st = os.fstat(fd)
    src.size, src.mtime_ns = st.st_size, st.st_mtime_ns
    return fd


def _hash_small(
    batch: list[_Source], make_hasher: Callable[[], Hasher] | None, chunk_size: int
) -> None:
    """Read and checksum whole small files (worker thread)."""
    for src in batch:
        try:
            fd = _open(src)
            try:
                data = os.read(fd, src.size + 1) if src.size else b""
            finally:
                os.close(fd)
            if len(data) != src.size or src.size > chunk_size:
                raise NotFound(f"{src.local} changed size while it was read")
            src.checksums = [xxhash.xxh3_64_intdigest(data)] if data else []
            if make_hasher is not None:
                src.hasher = make_hasher()
                src.hasher.update(data)
        except IosvcError as exc:
            src.error = exc


def _hash_segment(fd: int, src: _Source, first: int, count: int, chunk_size: int) -> list[int]:
    """Checksums of chunks ``first .. first+count`` of an open large file (worker thread)."""
    out = []
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    for index in range(first, first + count):
        length = min(chunk_size, src.size - index * chunk_size)
        got = os.preadv(fd, [view[:length]], index * chunk_size)
        if got != length:
            raise NotFound(f"{src.local} shrank while it was read")
        out.append(xxhash.xxh3_64_intdigest(view[:length]))
        if src.hasher is not None:
            src.hasher.update(view[:length])
    return out


async def pull_probe(client: AsyncClient, local_path: str | os.PathLike[str]) -> str | None:
    """None if every server can pull ``local_path`` (sees it as this client does), else why
    not (pulling off, outside a server's roots, not the same file system)."""
    src = _Source("", os.path.abspath(local_path))
    try:
        os.close(_open(src))
    except IosvcError as exc:
        return str(exc)
    entry = src.wire(client.chunk_size, [])
    try:
        replies = await client.call_all({"op": "pull", "files": [entry]})
    except IosvcError as exc:
        return str(exc)
    for server, reply in enumerate(replies):
        for error in reply.get("errors", []):
            if error:
                return f"server {client.spec.servers[server]}: {error[1]}"
    return None


async def pull_files(
    client: AsyncClient,
    files: Sequence[tuple[str | os.PathLike[str], str]],
    *,
    hasher: Callable[[], Hasher] | None = None,
    accept: Callable[[str, Hasher | None], None] | None = None,
    on_done: Callable[[str, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict[str, IosvcError]:
    """Stage local files in by having the servers read them (server-side stage-in).

    For ``(local_path, path)`` pairs on a file system every server mounts (the parallel file
    system; the same machine for a local cluster), this client reads each file once to
    checksum it and each server reads and stores its own chunks: no data goes through this
    process or gRPC. The servers must allow the directory (``iosvc serve --pull-root``);
    :meth:`AsyncClient.pull_probe` says whether they see a file as this client does.

    Parameters
    ----------
    files
        ``(local_path, path)`` pairs: the source and the iosvc path to create.
    hasher
        Factory of a hash object (e.g. ``xxhash.xxh3_128``) fed every byte of a file as this
        client reads it, for a check against a manifest.
    accept
        Called with ``(path, hash object)`` before a file is committed; raise an
        :class:`~iosvc.errors.IosvcError` to refuse the file (nothing becomes visible).
    on_done
        Called with ``(path, size)`` as each file becomes visible.
    cancelled
        Asked between batches and segments; True stops with
        :class:`~iosvc.errors.Cancelled` (committed files stay, the rest is freed).

    Returns
    -------
    dict
        The files that failed, ``path -> error`` (empty when all are in).
    """
    chunk_size = client.chunk_size
    sources = [_Source(normalize_path(dest), os.path.abspath(local)) for local, dest in files]
    failures: dict[str, IosvcError] = {}
    limits: defaultdict[int, asyncio.Semaphore] = defaultdict(
        lambda: asyncio.Semaphore(_PER_SERVER)
    )

    async def pull(server: int, entries: list[dict[str, Any]]) -> list[Any]:
        async with limits[server]:
            reply, _ = await client.call(server, {"op": "pull", "files": entries})
        errors: list[Any] = reply["errors"]
        return errors

    def accepted(src: _Source) -> bool:
        if src.error is None and accept is not None:
            try:
                accept(src.dest, src.hasher)
            except IosvcError as exc:
                src.error = exc
        if src.error is not None:
            failures[src.dest] = src.error
            return False
        return True

    async def small_batch(batch: list[_Source]) -> None:
        await asyncio.to_thread(_hash_small, batch, hasher, chunk_size)
        by_home: dict[int, list[tuple[_Source, dict[str, Any]]]] = defaultdict(list)
        for src in batch:
            if not accepted(src):
                continue
            home = client.placement.home(src.dest)
            uid = uuid.uuid4().hex
            chunks = [[0, f"c/{home}/{uid}/0", src.checksums[0]]] if src.checksums else []
            entry = src.wire(chunk_size, chunks)
            entry["rec"] = src.record(chunk_size, uid)
            by_home[home].append((src, entry))

        async def send(home: int, group: list[tuple[_Source, dict[str, Any]]]) -> None:
            from iosvc.client._async import _raise_entry

            try:
                errors = await pull(home, [entry for _, entry in group])
            except IosvcError as exc:  # the whole call failed: so did each of its files
                failures.update((src.dest, exc) for src, _ in group)
                return
            for (src, _), error in zip(group, errors, strict=True):
                if error:
                    failures[src.dest] = _raise_entry(error, src.dest)
                elif on_done is not None:
                    on_done(src.dest, src.size)

        await asyncio.gather(*(send(h, g) for h, g in by_home.items()))

    async def large_file(src: _Source, fd: int) -> None:
        from iosvc.client._async import _raise_entry

        home = client.placement.home(src.dest)
        uid = uuid.uuid4().hex
        n_chunks = -(-src.size // chunk_size)
        pending: list[asyncio.Task[None]] = []
        servers: set[int] = set()

        async def send(server: int, entry: dict[str, Any]) -> None:
            errors = await pull(server, [entry])
            if errors[0]:
                raise _raise_entry(errors[0], src.dest)

        try:
            for first in range(0, n_chunks, _SEGMENT_CHUNKS):
                if cancelled is not None and cancelled():
                    raise Cancelled("transfer cancelled")
                count = min(_SEGMENT_CHUNKS, n_chunks - first)
                sums = await asyncio.to_thread(_hash_segment, fd, src, first, count, chunk_size)
                src.checksums += sums
                per_server: dict[int, list[list[Any]]] = defaultdict(list)
                for index, ck in enumerate(sums, first):
                    server = client.placement.chunk_server(home, index)
                    per_server[server].append([index, f"c/{home}/{uid}/{index}", ck])
                for server, chunks in per_server.items():
                    servers.add(server)
                    entry = src.wire(chunk_size, chunks)
                    pending.append(asyncio.ensure_future(send(server, entry)))
                # Keep a bounded number of segments in flight (memory is only checksums, but
                # the servers' budgets are not infinite).
                while len(pending) > 4 * client.n_servers:
                    await pending.pop(0)
            await asyncio.gather(*pending)
            if not accepted(src):
                raise src.error or IosvcError(f"{src.dest} refused")
            await client.call(home, {"op": "commit", "rec": src.record(chunk_size, uid)})
        except BaseException as exc:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if servers:  # free what was stored; nothing of this version became visible
                await asyncio.gather(
                    *(client.call(s, {"op": "drop", "uids": [uid]}) for s in servers),
                    return_exceptions=True,
                )
            if isinstance(exc, IosvcError) and not isinstance(exc, Cancelled):
                failures.setdefault(src.dest, exc)
                return
            raise
        if on_done is not None:
            on_done(src.dest, src.size)

    async def large(src: _Source) -> None:
        try:
            fd = await asyncio.to_thread(_open, src)
        except IosvcError as exc:
            failures[src.dest] = exc
            return
        try:
            src.hasher = hasher() if hasher is not None else None
            await large_file(src, fd)
        finally:
            os.close(fd)

    # Sizes decide small vs large; a file that grows past a chunk between this stat and its
    # read is caught by the size check of the read.
    work: list[Callable[[], Awaitable[None]]] = []
    batch: list[_Source] = []
    for src in sources:
        try:
            size = os.stat(src.local).st_size
        except OSError as exc:
            failures[src.dest] = NotFound(f"{src.local}: {exc.strerror}")
            continue
        if size > chunk_size:
            work.append(functools.partial(large, src))
            continue
        batch.append(src)
        if len(batch) >= _BATCH_FILES:
            work.append(functools.partial(small_batch, batch))
            batch = []
    if batch:
        work.append(functools.partial(small_batch, batch))

    queue = iter(work)

    async def worker() -> None:
        for job in queue:
            if cancelled is not None and cancelled():
                return
            await job()

    await asyncio.gather(*(worker() for _ in range(_WORKERS)))
    if cancelled is not None and cancelled():
        raise Cancelled("transfer cancelled")
    return failures

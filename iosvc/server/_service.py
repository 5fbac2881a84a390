"""The grpc.aio service: one burst-buffer server.

Holds a :class:`ChunkStore`, the :class:`Namespace` of the files it is home for, and an
:class:`IoGate` every request passes with its identity and byte count. Speaks the frames of
:mod:`iosvc.wire` through generic handlers (raw bytes, no protobuf).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import msgpack
import xxhash

from iosvc import dataplane, wire
from iosvc.errors import (
    AlreadyExists,
    Cancelled,
    DataCorruption,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    IosvcError,
    IsADirectory,
    NotFound,
    QuotaExceeded,
    Unavailable,
)
from iosvc.identity import JobIdentity
from iosvc.placement import Placement, validate_path
from iosvc.server._auth import Authorizer, Caller
from iosvc.server._budget import ByteBudget
from iosvc.server._gate import IoGate
from iosvc.server._namespace import Namespace, owner_user
from iosvc.server._pull import PullFile, PullSource, parse_pull_files
from iosvc.server._records import (
    CHECKSUM_TRAILER,
    KIND_DIR,
    KIND_FILE,
    FileRecord,
    chunk_key,
    parse_chunk_key,
)
from iosvc.server._stores import ByteRange, ChunkStore

__all__ = ["IoService"]

log = logging.getLogger("iosvc.server")

_CK = CHECKSUM_TRAILER
_MAX_BATCH = 4096
#: Chunks of one read stream queued at the gate at once.
READ_AHEAD = 4
#: Chunks read in place admitted at once (see IoService._answer_in_place).
IN_PLACE_RUN = 32
#: Default bytes of write requests a server holds at once (``--inflight-limit``).
DEFAULT_INFLIGHT_LIMIT = 256 * 1024 * 1024
#: Bytes one ``pull`` call may ask a server to read and store.
MAX_PULL_BYTES = 64 * 1024 * 1024

#: Operations that change how the server treats everyone (admin only once tokens are signed).
ADMIN_OPS = frozenset({"configure", "policy_set", "quota_set"})
#: Bytes of small files one ``read_small`` reply carries; the rest of the batch is answered
#: with records the client reads by chunks (a batch of 256 files of 2 MiB was 512 MiB: over
#: the message limit, so the whole batch failed).
INLINE_BYTES = wire.MAX_MESSAGE_SIZE // 2
#: Where a server keeps the per-user quotas an admin set (persistent stores keep them).
QUOTA_KEY = "q/quotas"
#: How stale the peers' usage may be when a commit is checked against a quota.
USAGE_MAX_AGE = 1.0

Handler = Callable[[dict[str, Any], memoryview, Caller], Awaitable[tuple[dict[str, Any], Any]]]


def _list_arg(header: dict[str, Any], name: str) -> list[Any]:
    value = header.get(name)
    if not isinstance(value, list):
        raise InvalidArgument(f"'{name}' must be a list")
    if len(value) > _MAX_BATCH:
        raise InvalidArgument(f"batch of {len(value)} is over the {_MAX_BATCH} limit")
    return value


def _error_entry(exc: IosvcError) -> list[str]:
    return [type(exc).__name__, str(exc)]


class IoService:
    """Handlers of one server.

    Parameters
    ----------
    store
        Where chunks and persisted metadata live.
    gate
        Admission in front of the I/O slots.
    index, peers
        This server's position and the ``host:port`` of every server, in placement order.
        May be given later with the ``configure`` call (``iosvc up`` binds port 0 first).
    gc_ttl
        Age (s) after which an unreferenced chunk version is checked with its home and
        reclaimed if no committed file uses it (crashed writers, missed deletes).
    auth
        Authentication and authorisation (open mode when omitted).
    drop_grace
        Seconds a replaced or removed version's chunks stay readable for readers that
        opened it before the change.
    tls_ca
        CA file to trust when calling peer servers over TLS (None: plaintext).
    inflight_limit
        Bytes of write requests held at once (back-pressure; None: unbounded).
    stream_idle_timeout
        Seconds a write stream may send nothing before it is cut (a stuck or dead client).
    pull_roots
        Directories of this server's file system that ``pull`` (server-side stage-in) may
        read; empty: pulling is refused.
    """

    def __init__(
        self,
        store: ChunkStore,
        gate: IoGate | None = None,
        *,
        index: int | None = None,
        peers: list[str] | None = None,
        gc_ttl: float = 600.0,
        drop_grace: float = 5.0,
        auth: Authorizer | None = None,
        tls_ca: str | None = None,
        inflight_limit: int | None = DEFAULT_INFLIGHT_LIMIT,
        stream_idle_timeout: float = 60.0,
        pull_roots: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.pull_source = PullSource(pull_roots)
        #: bytes stored from this server's own reads of its file system (``pull``)
        self.pulled_bytes = 0
        #: chunk pieces same-host clients were told to read in place
        self.in_place_reads = 0
        self.budget = ByteBudget(inflight_limit)
        #: per-user quotas in bytes, cluster-wide (every server holds the same table)
        self.quotas: dict[str, int] = {}
        self._peer_usage: tuple[float, dict[str, int]] = (-math.inf, {})
        self._usage_refresh: asyncio.Future[dict[str, int]] | None = None
        self.stream_idle_timeout = stream_idle_timeout
        self.auth = auth or Authorizer()
        self.tls_ca = tls_ca
        self.gate = gate or IoGate()
        self.namespace = Namespace(store)
        self.index: int | None = None
        self.peers: list[str] = []
        self.placement: Placement | None = None
        self.gc_ttl = gc_ttl
        self.drop_grace = drop_grace
        self.metrics_port: int | None = None
        #: the data port serving bulk transfers beside gRPC, if started (``iosvc.server._main``)
        self.data_plane: Any = None
        self.started = time.time()
        #: this process's identity for data-port clients: a port number a restarted server
        #: left may be bound by another process since (see ``endpoints`` and ``hello``)
        self.instance = uuid.uuid4().hex
        # Cluster-wide fairness: each peer's cumulative service per job at the last exchange,
        # and this server's own total then (its service per interval sizes the horizon).
        self._peer_served: dict[int, dict[JobIdentity, tuple[int, int]]] = {}
        self._own_served = 0
        # Versions held here: uid -> (home, first-seen time, chunk keys, last confirmed live).
        self._versions: dict[str, _Version] = {}
        # Versions dropped (aborted writers, freed versions) -> when: their late chunks are
        # refused, not stored as orphans for the garbage collector to find.
        self._dropped: dict[str, float] = {}
        self._peer_channels: dict[int, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[Any]] = set()
        if index is not None and peers is not None:
            self.configure(index, peers)
        self._ops: dict[str, Handler] = {
            "stat": self._op_stat,
            "commit": self._op_commit,
            "put_small": self._op_put_small,
            "read_small": self._op_read_small,
            "ls": self._op_ls,
            "rm": self._op_rm,
            "mkdir": self._op_mkdir,
            "status": self._op_status,
            "configure": self._op_configure,
            "policy_set": self._op_policy_set,
            "policy_show": self._op_policy_show,
            "stats": self._op_stats,
            "live_uids": self._op_live_uids,
            "drop": self._op_drop,
            "quota_set": self._op_quota_set,
            "quota_show": self._op_quota_show,
            "usage": self._op_usage,
            "pull": self._op_pull,
            "endpoints": self._op_endpoints,
        }

    # ----------------------------------------------------------------- set-up
    def configure(self, index: int, peers: list[str]) -> None:
        if not peers or not 0 <= index < len(peers):
            raise InvalidArgument(f"server index {index} outside the peer list of {len(peers)}")
        if self.placement is not None and (index != self.index or peers != self.peers):
            raise InvalidArgument("server already configured with another peer list")
        self.index, self.peers, self.placement = index, list(peers), Placement(len(peers))

    async def load(self) -> None:
        """Recover committed records and held chunk versions from a persistent store."""
        n = await self.namespace.load()
        if self.store.supports_persistence and await self.store.exists(QUOTA_KEY):
            self.quotas = dict(msgpack.unpackb(await self.store.get(QUOTA_KEY), raw=False))
        now = time.monotonic()
        async for key in self.store.list("c/"):
            home, uid, _ = parse_chunk_key(key)
            self._track(uid, home, key, now)
        if n or self._versions:
            log.info("recovered %d records and %d chunk versions", n, len(self._versions))

    def _track(self, uid: str, home: int, key: str, now: float) -> None:
        version = self._versions.get(uid)
        if version is None:
            version = self._versions[uid] = _Version(home, now)
        version.keys.add(key)

    def _require_configured(self) -> Placement:
        if self.placement is None:
            raise Unavailable("server is starting: it has no peer list yet")
        return self.placement

    def _check_write(self, who: Caller, path: str) -> None:
        """A write of ``path`` must come to its home server from someone allowed to write it."""
        self._check_home(path)
        self.auth.may_write(who, path)

    def _check_home(self, path: str) -> None:
        placement = self._require_configured()
        if placement.home(path) != self.index:
            raise InvalidArgument(f"{path} is not homed on server {self.index}")

    # --------------------------------------------------------------- handlers
    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "Call": grpc.unary_unary_rpc_method_handler(self._call),
                "ReadChunks": grpc.unary_stream_rpc_method_handler(self._read_chunks),
                "WriteChunks": grpc.stream_unary_rpc_method_handler(self._write_chunks),
            },
        )

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if not isinstance(exc, IosvcError):
            log.exception("internal error", exc_info=exc)
            exc = InternalError(f"internal server error: {type(exc).__name__}: {exc}")
        await context.abort(
            grpc.StatusCode[exc.grpc_code],
            str(exc),
            trailing_metadata=((wire.ERROR_METADATA_KEY, type(exc).__name__),),
        )

    async def call(self, header: dict[str, Any], payload: memoryview) -> bytes:
        """Answer one operation (a gRPC ``Call``, or a read's on the data port): the reply
        frame (:func:`iosvc.wire.pack`); raises what the operation raises."""
        op = header.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            raise InvalidArgument(f"unknown operation {op!r}; known: {sorted(self._ops)}")
        caller = self.auth.caller(header)
        if op in ADMIN_OPS:
            self.auth.require_admin(caller, f"'{op}'")
        reply, body = await handler(header, payload, caller)
        return wire.pack(reply, body or b"")

    async def _call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self.call(*wire.unpack(request))
        except Exception as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def _read_chunks(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            header, _ = wire.unpack(request)
            async for reply, payload in self.read_stream(header):
                yield wire.pack(reply, payload)
        except Exception as exc:
            await self._abort(context, exc)

    async def read_stream(
        self, header: dict[str, Any]
    ) -> AsyncGenerator[tuple[dict[str, Any], bytes | bytearray | memoryview], None]:
        """Serve a read request (gRPC ``ReadChunks`` or the data port alike).

        Yields ``(reply header, payload)`` per chunk piece, in the order the scheduler
        admits them: ``{"i": k}`` with the bytes of piece ``k`` (and ``"ck"``, the stored
        checksum, for whole chunks), or ``{"i": k, "path": ...}`` for a client on this host
        told to read the chunk file in place.
        """
        identity = self.auth.caller(header).identity
        chunks = _list_arg(header, "chunks")
        parsed = []
        for entry in chunks:
            if not isinstance(entry, list) or len(entry) != 4:
                raise InvalidArgument("each chunk must be [key, start, length, whole]")
            key, start, length, whole = entry
            parse_chunk_key(key)
            if not isinstance(start, int) or not isinstance(length, int) or start < 0:
                raise InvalidArgument("chunk start and length must be integers >= 0")
            if not 0 <= length <= wire.MAX_CHUNK_SIZE:
                raise InvalidArgument(f"chunk length {length} out of range")
            parsed.append((key, start, length, bool(whole)))
        # A client on this host (same boot id) may read chunk files in place: the server
        # still admits the chunks in policy order, then answers with where they lie.
        in_place = wire.host_id() is not None and header.get("host") == wire.host_id()
        replies = (
            self._answer_in_place(identity, parsed)
            if in_place and self.store.keeps_files
            else self._answer_with_bytes(identity, parsed)
        )
        try:
            async with contextlib.aclosing(replies):
                async for reply in replies:
                    yield reply
        except NotFound as exc:
            raise NotFound(f"{exc} (file removed or replaced during read?)") from None

    async def _answer_with_bytes(
        self, identity: JobIdentity, chunks: list[tuple[str, int, int, bool]]
    ) -> AsyncGenerator[tuple[dict[str, Any], bytes | bytearray | memoryview], None]:
        """Each chunk piece's bytes, in the order the gate admits them."""
        # Keep READ_AHEAD chunks of this stream queued at the gate: a stream is then
        # backlogged like a client with several requests in flight, so the policy can give
        # it its share, and the device never idles between two chunks.
        pending: deque[asyncio.Task[tuple[dict[str, Any], bytes | bytearray | memoryview]]] = (
            deque()
        )
        todo = iter(enumerate(chunks))
        try:
            while True:
                while len(pending) < READ_AHEAD and (item := next(todo, None)) is not None:
                    pending.append(asyncio.ensure_future(self._read_one(identity, *item)))
                if not pending:
                    break
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()

    async def _answer_in_place(
        self, identity: JobIdentity, chunks: list[tuple[str, int, int, bool]]
    ) -> AsyncGenerator[tuple[dict[str, Any], bytes], None]:
        """Where each chunk's file lies, for a client on this host that reads them itself.

        The gate admits them in runs of up to ``IN_PLACE_RUN`` chunks, each run one request
        that stands for its chunks: the policy charges the job their bytes and an
        ``op_cost`` per chunk, the device model their latency per chunk, and both count
        them, as for chunks admitted one by one; but a shard's 20 chunks cost the server one
        admission instead of 20 (per chunk, the admission, its task and its reply frame were
        most of a server's CPU per shard mapped in place). The device model still books a
        run in ``max_io`` pieces, so other jobs' requests are interleaved between them.
        """
        for first in range(0, len(chunks), IN_PLACE_RUN):
            run = chunks[first : first + IN_PLACE_RUN]
            async with self.gate.admit(identity, sum(c[2] for c in run), len(run)):
                paths = [self.store.local_path(c[0]) for c in run]
            self.in_place_reads += len(run)
            for i, path in enumerate(paths, first):
                yield {"i": i, "path": path}, b""

    async def _read_one(
        self, identity: JobIdentity, i: int, chunk: tuple[str, int, int, bool]
    ) -> tuple[dict[str, Any], bytes | bytearray | memoryview]:
        key, start, length, whole = chunk
        async with self.gate.admit(identity, length):
            if not whole:
                return {"i": i}, await self.store.get(key, ByteRange(start, length))
            value = await self.store.get(key)
            data = memoryview(value)[:-_CK]
            checksum = int.from_bytes(value[-_CK:], "little")
            if self.store.supports_persistence and xxhash.xxh3_64_intdigest(data) != checksum:
                raise DataCorruption(f"chunk {key} on server {self.index} is corrupt")
            return {"i": i, "ck": checksum}, data

    async def _write_chunks(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        # Errors are answered in the reply after the request stream is drained: aborting while
        # the client still sends makes gRPC report a bare INTERNAL instead of our status.
        count = total = 0
        failure: IosvcError | None = None
        frames = request_iterator.__aiter__()
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: no task per frame on the hot path.
                    async with asyncio.timeout(self.stream_idle_timeout):
                        frame = await anext(frames)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"write stream sent nothing for {self.stream_idle_timeout:g} s; closed "
                        "(a stuck or dead client); nothing of it was committed"
                    ) from None
                if failure is not None:
                    continue
                try:
                    header, payload = wire.unpack(frame)

                    async def fill(view: memoryview, payload: memoryview = payload) -> None:
                        view[:] = payload

                    await self.write_chunk(header, len(payload), fill)
                    count += 1
                    total += len(payload)
                except IosvcError as exc:
                    failure = exc
        except Exception as exc:
            await self._abort(context, exc)
        reply: dict[str, Any] = {"n": count, "bytes": total}
        if failure is not None:
            reply["error"] = _error_entry(failure)
        return wire.pack(reply)

    async def write_chunk(
        self,
        header: dict[str, Any],
        size: int,
        fill: Callable[[memoryview], Awaitable[None]],
    ) -> None:
        """Store one chunk a writer sends (gRPC ``WriteChunks`` or the data port alike).

        ``header`` names the chunk (``key``), its xxh3-64 (``ck``) and the caller; ``fill``
        puts its ``size`` bytes into the buffer it is given. As on a gRPC stream, the bytes
        are taken in first, then the chunk waits for room in the in-flight budget (while it
        waits, its sender sends nothing more: back-pressure) and for the scheduler, is
        verified, and is stored with its checksum trailer, with no copy beyond the one
        ``fill`` makes. Taking the budget only once the bytes are here means a sender that
        stalls mid-chunk holds its own buffer, not a share of everyone's budget.
        """
        self._require_configured()
        identity = self.auth.caller(header).identity
        key = str(header.get("key"))
        home, uid, _ = parse_chunk_key(header.get("key"))
        checksum = header.get("ck")
        if not isinstance(checksum, int):
            raise InvalidArgument("a written chunk needs its xxh3-64 checksum 'ck'")
        if not 0 <= size <= wire.MAX_CHUNK_SIZE:
            raise InvalidArgument(f"chunk of {size} bytes over the limit")
        value = bytearray(size + _CK)
        data = memoryview(value)[:size]
        await fill(data)
        async with self.budget.hold(size), self.gate.admit(identity, size):
            if xxhash.xxh3_64_intdigest(data) != checksum:
                raise DataCorruption(f"chunk {key} arrived corrupt (checksum mismatch)")
            value[size:] = checksum.to_bytes(_CK, "little")
            data.release()
            await self._store_chunk(home, uid, key, value)

    async def _put_chunk(
        self, home: int, uid: str, key: str, payload: memoryview | bytes, checksum: int
    ) -> None:
        await self._store_chunk(
            home, uid, key, b"".join((payload, checksum.to_bytes(_CK, "little")))
        )

    async def _store_chunk(self, home: int, uid: str, key: str, value: bytes | bytearray) -> None:
        """Store a chunk value (bytes + xxh3-64 trailer) of version ``uid``."""
        if uid in self._dropped:
            # Its writer aborted (or the version was freed) while this chunk was on its way,
            # e.g. received on a data connection before the abort's drop arrived over gRPC.
            raise Cancelled(f"version {uid} was dropped; chunk {key} not stored")
        if uid in self._versions and await self.store.exists(key):
            # Chunks are write-once: a retry may resend the same bytes, but nobody may swap
            # the contents of a chunk a committed file (say, a published dataset) points at.
            if (await self.store.get(key))[-_CK:] != value[-_CK:]:
                raise AlreadyExists(f"chunk {key} exists with other contents")
            return
        await self.store.set(key, value)
        self._track(uid, home, key, time.monotonic())

    # -------------------------------------------------------------- metadata
    async def _op_stat(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        paths = _list_arg(header, "paths")
        async with self.gate.admit(who.identity, 0):
            out: list[Any] = []
            for path in paths:
                self.auth.may_read(who, validate_path(path))
                rec = self.namespace.get(path)
                if rec is not None:
                    out.append(rec.to_wire())
                elif self.namespace.has_prefix(path):
                    out.append({"p": path, "k": KIND_DIR})
                else:
                    out.append(None)
        return {"recs": out}, None

    async def _op_commit(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        rec = FileRecord.from_wire(header.get("rec"))
        self._check_write(who, rec.path)
        async with self.gate.admit(who.identity, 0):
            old = await self._commit(rec, who)
        return {"old": old.uid if old else None}, None

    async def _commit(self, rec: FileRecord, who: Caller) -> FileRecord | None:
        """Install a new file version owned by ``who``; free the one it replaces; never
        replace a directory."""
        rec.owner = who.identity.to_wire()
        rec.mtime = time.time()
        existing = self.namespace.get(rec.path)
        if existing is not None and existing.kind == KIND_DIR:
            raise IsADirectory(f"{rec.path} is a directory")
        await self._check_quota(rec, existing)
        old = await self.namespace.commit(rec)
        if old is not None and old.uid and old.uid != rec.uid:
            self._drop_version(old)
        return old

    async def _op_put_small(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        """Store and commit many single-chunk files homed here, in one call."""
        files = _list_arg(header, "files")
        assert self.index is not None or self._require_configured()
        errors: list[Any] = []
        offset = 0
        async with self.budget.hold(len(payload)), self.gate.admit(who.identity, len(payload)):
            for entry in files:
                try:
                    rec = FileRecord.from_wire(entry)
                    if rec.n_chunks > 1:
                        raise InvalidArgument(f"{rec.path}: put_small takes single-chunk files")
                    self._check_write(who, rec.path)
                    data = payload[offset : offset + rec.size]
                    if len(data) != rec.size:
                        raise InvalidArgument(f"{rec.path}: payload shorter than its size")
                    if rec.n_chunks:
                        if xxhash.xxh3_64_intdigest(data) != rec.checksums[0]:
                            raise DataCorruption(f"{rec.path} arrived corrupt (checksum mismatch)")
                        assert self.index is not None
                        key = chunk_key(self.index, rec.uid, 0)
                        await self._put_chunk(self.index, rec.uid, key, data, rec.checksums[0])
                    await self._commit(rec, who)
                    errors.append(None)
                except IosvcError as exc:
                    errors.append(_error_entry(exc))
                offset += int(entry.get("s", 0)) if isinstance(entry, dict) else 0
        return {"errors": errors}, None

    async def _op_pull(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        """Server-side stage-in: read chunks of files from this server's file system.

        Each entry of ``files`` names a source file (absolute path, size and mtime in ns as the
        client saw it, chunk size), the chunks of it this server holds (``[index, key,
        xxh3-64]``) and optionally ``rec``, the record to commit here once they are stored (a
        file homed here whose chunks all live here). An entry without chunks only checks that
        this server sees the file as the client does. Reply: one error entry or None per file.
        """
        if self.auth.secure:
            self.auth.require_admin(who, "'pull' (stage-in from the server's file system)")
        entries = _list_arg(header, "files")
        files, nbytes = parse_pull_files(entries, MAX_PULL_BYTES)
        self._require_configured()
        # parse_pull_files checked that every entry is a map
        records = [
            FileRecord.from_wire(e["rec"]) if e.get("rec") is not None else None for e in entries
        ]
        errors: list[Any] = []
        async with self.budget.hold(nbytes), self.gate.admit(who.identity, nbytes):
            # The reads (pread from the page cache or the parallel file system) and their
            # checksums run in a worker thread so the loop keeps serving other clients.
            read = await asyncio.to_thread(self._pull_read, files)
            for file, rec, values in zip(files, records, read, strict=True):
                try:
                    if isinstance(values, IosvcError):
                        raise values
                    if rec is not None:
                        self._check_write(who, rec.path)
                    for chunk, value in zip(file.chunks, values, strict=True):
                        await self._store_chunk(chunk.home, chunk.uid, chunk.key, value)
                        self.pulled_bytes += len(value) - _CK
                    if rec is not None:
                        await self._commit(rec, who)
                    errors.append(None)
                except IosvcError as exc:
                    errors.append(_error_entry(exc))
        return {"errors": errors}, None

    def _pull_read(self, files: list[PullFile]) -> list[list[bytearray] | IosvcError]:
        out: list[list[bytearray] | IosvcError] = []
        for file in files:
            try:
                out.append(self.pull_source.read(file))
            except IosvcError as exc:
                out.append(exc)
        return out

    async def _op_read_small(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        """Read many files homed here; single-chunk files come back inline (up to
        ``INLINE_BYTES`` in all).

        Each entry of the reply is ``[size, checksum]`` (inline data), ``{"rec": record}`` (a
        file the client must fetch by chunks: several chunks, or past the inline bytes) or
        ``[error class, message]``.
        """
        paths = _list_arg(header, "paths")
        assert self.index is not None or self._require_configured()
        entries: list[Any] = []
        parts: list[Any] = []
        nbytes = 0
        records = []
        inline: set[int] = set()  # single-chunk files sent in the reply, up to INLINE_BYTES
        for n, path in enumerate(paths):
            rec = self.namespace.get(path) if isinstance(path, str) else None
            if rec is not None and not self.auth.visible(who, path):
                rec = None  # answered below as PermissionDenied
            records.append(rec)
            if rec is not None and rec.n_chunks == 1 and nbytes + rec.size <= INLINE_BYTES:
                nbytes += rec.size
                inline.add(n)
        async with self.gate.admit(who.identity, nbytes):
            get = self.store.get
            for n, (path, rec) in enumerate(zip(paths, records, strict=True)):
                if rec is None:
                    try:
                        self.auth.may_read(who, validate_path(path))
                        exc: IosvcError = (
                            IsADirectory(f"{path} is a directory")
                            if self.namespace.has_prefix(path)
                            else NotFound(f"no such file: {path}")
                        )
                    except IosvcError as err:
                        exc = err
                    entries.append(_error_entry(exc))
                elif rec.kind != KIND_FILE:
                    entries.append(_error_entry(IsADirectory(f"{path} is a directory")))
                elif rec.n_chunks == 0:
                    entries.append([0, 0])
                elif n in inline:
                    try:
                        value = await get(f"c/{self.index}/{rec.uid}/0")
                    except NotFound:
                        entries.append(_error_entry(NotFound(f"{path}: chunk 0 missing")))
                        continue
                    entries.append([rec.size, rec.checksums[0]])
                    parts.append(memoryview(value)[:-_CK])
                else:
                    entries.append({"rec": rec.to_wire()})
        return {"files": entries}, b"".join(parts)

    async def _op_ls(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        prefix = validate_path(header.get("prefix", ""), allow_root=True)
        if prefix:
            self.auth.may_read(who, prefix)
        async with self.gate.admit(who.identity, 0):
            files, dirs = self.namespace.list_prefix(prefix, bool(header.get("recursive")))
            exact = self.namespace.get(prefix) if prefix else None
        if not prefix and not who.admin:  # the root lists only what the caller may read
            files = [r for r in files if self.auth.visible(who, r.path)]
            dirs = [d for d in dirs if self.auth.visible(who, d)]
        return {
            "files": [r.to_wire() for r in files],
            "dirs": dirs,
            "self": exact.to_wire() if exact else None,
        }, None

    async def _op_rm(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        paths = _list_arg(header, "paths")
        errors: list[Any] = []
        async with self.gate.admit(who.identity, 0):
            for path in paths:
                try:
                    self._check_write(who, validate_path(path))
                    rec = await self.namespace.remove(path)
                    if rec is None:
                        raise NotFound(f"no such file: {path}")
                    if rec.uid:
                        self._drop_version(rec)
                    errors.append(None)
                except IosvcError as exc:
                    errors.append(_error_entry(exc))
        return {"errors": errors}, None

    async def _op_mkdir(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        path = validate_path(header.get("path"))
        self._check_write(who, path)
        async with self.gate.admit(who.identity, 0):
            existing = self.namespace.get(path)
            if existing is not None and existing.kind == KIND_FILE:
                raise AlreadyExists(f"{path} exists and is a file")
            if existing is None:
                owner = who.identity.to_wire()
                rec = FileRecord(path=path, kind=KIND_DIR, mtime=time.time(), owner=owner)
                await self.namespace.commit(rec)
        return {}, None

    async def _op_status(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        return {
            "index": self.index,
            "peers": self.peers,
            "pid": os.getpid(),
            "capacity": self.store.capacity,
            "used": self.store.used_bytes,
            "files": len(self.namespace),
            "versions": len(self._versions),
            "storage": type(self.store).__name__,
            "secure": self.auth.secure,
            "persistent": self.store.supports_persistence,
            "uptime": time.time() - self.started,
            "queued": self.gate.queued,
            "policy": self.gate.scheduler.policy.describe(),
            "metrics_port": self.metrics_port,
            "busy_slots": self.gate.busy,
            "slots": self.gate.slots,
            "inflight_bytes": self.budget.held,
            "inflight_peak": self.budget.peak,
            "inflight_limit": self.budget.limit,
            "inflight_waiting": self.budget.waiting,
            "pull_roots": list(self.pull_source.roots),
            "pulled_bytes": self.pulled_bytes,
            "in_place_reads": self.in_place_reads,
            "data_port": self.data_plane.port if self.data_plane is not None else None,
            "data_connections": self.data_plane.connections if self.data_plane else 0,
            "data_bytes_sent": self.data_plane.bytes_sent if self.data_plane else 0,
            "data_bytes_received": self.data_plane.bytes_received if self.data_plane else 0,
        }, None

    async def _op_endpoints(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        return self.endpoints(), None

    def endpoints(self) -> dict[str, Any]:
        """Where else this server listens: the data port for bulk transfers (None: off),
        this process's instance id, which data connections name in their ``hello``, and
        the host a client must share to read chunks in place (None: this store keeps none
        in files), so a client knows before its first read whether mapping can work.
        Cluster files list them too (:attr:`iosvc.config.ClusterSpec.endpoints`)."""
        port = self.data_plane.port if self.data_plane is not None else None
        in_place = wire.host_id() if self.store.keeps_files else None
        return {
            "data_port": port,
            "instance": self.instance,
            "in_place_host": in_place,
            "calls": sorted(dataplane.CALLS) if port is not None else [],
        }

    async def _op_configure(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        index, peers = header.get("index"), header.get("peers")
        if not isinstance(index, int) or not isinstance(peers, list):
            raise InvalidArgument("configure needs 'index' (int) and 'peers' (list)")
        self.configure(index, [str(p) for p in peers])
        return {}, None

    # ----------------------------------------------------------------- quotas
    async def _check_quota(self, rec: FileRecord, existing: FileRecord | None) -> None:
        """Refuse a commit that would take its owner past their quota, cluster-wide.

        Usage is counted on each file's home server; a commit adds the peers' usage, at most
        ``USAGE_MAX_AGE`` old. Concurrent commits of one user on several servers can so
        overshoot by what they commit within that second: a soft bound, like most HPC
        quotas, that costs no cross-server round trip per commit.
        """
        user = owner_user(rec)
        quota = self.quotas.get(user) if user is not None else None
        if quota is None or user is None:
            return
        local = self.namespace.usage.get(user, 0)
        if existing is not None and owner_user(existing) == user:
            local -= existing.size  # replacing a file of one's own frees its old size
        used = local + (await self._peers_usage()).get(user, 0)
        if used + rec.size > quota:
            raise QuotaExceeded(
                f"{rec.path}: user {user} would use {used + rec.size} bytes, over the quota of "
                f"{quota} bytes ({used} used); remove files or ask an admin "
                "(iosvc quota set)"
            )

    async def _peers_usage(self) -> dict[str, int]:
        stamp, usage = self._peer_usage
        if time.monotonic() - stamp <= USAGE_MAX_AGE:
            return usage
        if self._usage_refresh is None:
            self._usage_refresh = asyncio.ensure_future(self._fetch_peers_usage())
        refresh = self._usage_refresh
        try:
            return await asyncio.shield(refresh)
        finally:
            if refresh.done() and self._usage_refresh is refresh:
                self._usage_refresh = None

    async def _fetch_peers_usage(self) -> dict[str, int]:
        peers = [i for i in range(len(self.peers)) if i != self.index]
        replies = await asyncio.gather(*(self._peer_call(i, {"op": "usage"}) for i in peers))
        total: dict[str, int] = {}
        for reply in replies:
            for user, nbytes in ((reply or {}).get("usage") or {}).items():
                total[user] = total.get(user, 0) + int(nbytes)
        self._peer_usage = (time.monotonic(), total)
        return total

    async def _op_usage(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        """Bytes of files homed here, by owning user."""
        return {"usage": dict(self.namespace.usage)}, None

    async def _op_quota_set(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        user, nbytes = header.get("user"), header.get("bytes")
        if not isinstance(user, str) or not user:
            raise InvalidArgument("quota_set needs 'user' (a user name)")
        if nbytes is not None and (
            not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0
        ):
            raise InvalidArgument("quota_set 'bytes' must be an integer >= 0, or None to remove")
        quotas = dict(self.quotas)
        if nbytes is None:
            quotas.pop(user, None)
        else:
            quotas[user] = nbytes
        if self.store.supports_persistence:
            await self.store.set(QUOTA_KEY, msgpack.packb(quotas))
        self.quotas = quotas
        log.info("quota of %s set to %s by %s", user, nbytes, who)
        return {"quotas": quotas}, None

    async def _op_quota_show(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        return {"quotas": dict(self.quotas), "usage": dict(self.namespace.usage)}, None

    # ----------------------------------------------------------------- admin
    async def _op_policy_set(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        spec = header.get("policy")
        if not isinstance(spec, dict | str):
            raise InvalidArgument("'policy' must be a policy dict or a preset name")
        policy = self.gate.set_policy(spec)
        log.info("policy set by %s: %s", who, policy.describe())
        return {"policy": policy.to_dict(), "description": policy.describe()}, None

    async def _op_policy_show(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        return self.gate.scheduler.snapshot().to_dict(), None

    async def _op_stats(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        """Cumulative per-job service, for ``iosvc top`` and benchmarks."""
        jobs = [
            [*ident.to_wire(), st.served_bytes, st.served_ops, st.wait_seconds]
            for ident, st in self.gate.jobs.items()
        ]
        return {
            "time": time.monotonic(),
            "jobs": jobs,
            "queued": self.gate.queued,
            "busy": self.gate.busy,
            "slots": self.gate.slots,
        }, None

    # -------------------------------------------------- cluster-wide fairness
    @property
    def cluster_wide(self) -> bool:
        """Whether the policy in force asks for shares of the cluster's aggregate."""
        return getattr(self.gate.scheduler.policy, "scope", "server") == "cluster"

    async def exchange_service(self) -> int:
        """One round of cluster-wide fairness; returns the bytes charged.

        Asks every peer what it granted each job so far (``stats``) and charges this server's
        scheduler with the growth since the last round, so a job that other servers serve
        well waits here behind jobs they do not serve. The horizon (how far a charge may put a
        job behind) is twice what this server itself granted in the last round, at least
        4 MiB: enough to absorb one round of charges, small enough that a job whose remote
        service stopped is back within about a round.
        """
        if self.placement is None or len(self.peers) < 2:
            return 0
        peers = [i for i in range(len(self.peers)) if i != self.index]
        replies = await asyncio.gather(
            # A peer slower than this is skipped this round (a vanished host must not stall
            # the exchange with the others).
            *(self._peer_call(i, {"op": "stats"}, quiet=True, timeout=1.0) for i in peers)
        )
        total = sum(st.served_bytes for st in self.gate.jobs.values())
        horizon = max(4 << 20, 2 * (total - self._own_served))
        self._own_served = total
        charged = 0
        scheduler = self.gate.scheduler
        for peer, reply in zip(peers, replies, strict=True):
            if reply is None:
                continue  # down or unreachable: no news is no charge
            last = self._peer_served.get(peer, {})
            now: dict[JobIdentity, tuple[int, int]] = {}
            for row in reply.get("jobs") or ():
                try:
                    identity = JobIdentity.from_wire(row[:4])
                    nbytes, ops = int(row[4]), int(row[5])
                except (TypeError, ValueError, IndexError):
                    continue
                now[identity] = (nbytes, ops)
                old_bytes, old_ops = last.get(identity, (0, 0))
                if nbytes > old_bytes and peer in self._peer_served:
                    scheduler.charge(
                        identity, nbytes - old_bytes, max(0, ops - old_ops), horizon=horizon
                    )
                    charged += nbytes - old_bytes
            # A peer seen for the first time (or restarted) is a baseline, not a charge.
            self._peer_served[peer] = now
        return charged

    # ------------------------------------------------- garbage of old versions
    async def _op_live_uids(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        uids = _list_arg(header, "uids")
        if not all(isinstance(u, str) for u in uids):
            raise InvalidArgument("'uids' must be a list of version ids (strings)")
        return {"live": [u for u in uids if self.namespace.is_live(u)]}, None

    async def _op_drop(
        self, header: dict[str, Any], payload: memoryview, who: Caller
    ) -> tuple[dict[str, Any], Any]:
        uids = _list_arg(header, "uids")
        freed = 0
        now = time.monotonic()
        for uid in uids:
            if isinstance(uid, str) and not self.namespace.is_live(uid):
                self._dropped[uid] = now
                freed += await self._delete_version(uid)
        # Forget tombstones once no chunk of theirs can still be on its way.
        for uid in [u for u, t in self._dropped.items() if now - t > self.gc_ttl]:
            del self._dropped[uid]
        return {"freed": freed}, None

    async def _delete_version(self, uid: str) -> int:
        version = self._versions.pop(uid, None)
        freed = 0
        for key in version.keys if version else ():
            freed += await self.store.delete(key)
        return freed

    def _drop_version(self, rec: FileRecord) -> None:
        """Free the chunks of a replaced or removed version after ``drop_grace`` seconds.

        The grace lets readers that opened the old version finish it; peers free their
        chunks when told (a peer that misses it finds out in its own garbage collection).
        """
        placement = self._require_configured()
        holders = {placement.chunk_server(self.index or 0, i) for i in range(rec.n_chunks)}

        async def drop() -> None:
            if self.drop_grace > 0:
                await asyncio.sleep(self.drop_grace)
            if self.namespace.is_live(rec.uid):
                return  # committed again meanwhile
            await self._delete_version(rec.uid)
            for peer in holders - {self.index}:
                await self._peer_call(peer, {"op": "drop", "uids": [rec.uid]})

        self._spawn(drop())

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _peer_call(
        self, peer: int, header: dict[str, Any], *, quiet: bool = False, timeout: float = 30
    ) -> dict[str, Any] | None:
        """Best effort server-to-server call; a down peer is caught up by its own GC.

        ``quiet``: a failure is logged at debug level (calls made every fraction of a second).
        """
        channel = self._peer_channels.get(peer)
        if channel is None:
            channel = wire.aio_channel(self.peers[peer], self.tls_ca)
            self._peer_channels[peer] = channel
        header = {**header, "id": ["iosvc-server", "root", "root", 1]}
        token = self.auth.server_token()
        if token is not None:
            header = {**header, "tok": token, "id": None}
        try:
            reply = await channel.unary_unary(wire.METHOD_CALL)(wire.pack(header), timeout=timeout)
        except grpc.RpcError as exc:
            (log.debug if quiet else log.warning)(
                "peer %s: %s", self.peers[peer], wire.error_from_rpc(exc)
            )
            return None
        return wire.unpack(reply)[0]

    async def collect_garbage(self) -> int:
        """Reclaim chunk versions older than ``gc_ttl`` that no committed file uses.

        The home of each version is asked (in one batched call per home) whether the version
        is live; versions confirmed live are not asked again for another ``gc_ttl``.
        Returns the bytes freed.
        """
        if self.placement is None:
            return 0
        now = time.monotonic()
        by_home: dict[int, list[str]] = {}
        for uid, version in list(self._versions.items()):
            if now - max(version.first_seen, version.confirmed) >= self.gc_ttl:
                by_home.setdefault(version.home, []).append(uid)
        freed = 0
        for home, uids in by_home.items():
            if home == self.index:
                live = {u for u in uids if self.namespace.is_live(u)}
            else:
                reply = await self._peer_call(home, {"op": "live_uids", "uids": uids})
                if reply is None:
                    continue  # home unreachable: decide later, never delete on doubt
                live = set(reply.get("live", []))
            for uid in uids:
                if uid in live:
                    self._versions[uid].confirmed = now
                else:
                    freed += await self._delete_version(uid)
        return freed

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for channel in self._peer_channels.values():
            await channel.close()
        await self.store.close()


class _Version:
    __slots__ = ("confirmed", "first_seen", "home", "keys")

    def __init__(self, home: int, first_seen: float) -> None:
        self.home = home
        self.first_seen = first_seen
        self.confirmed = 0.0
        self.keys: set[str] = set()

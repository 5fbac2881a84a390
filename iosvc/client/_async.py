"""``AsyncClient``: the real client implementation.

Reads pull chunks from every server at once (one ``ReadChunks`` stream per server); writes push
chunks to every server at once (one ``WriteChunks`` stream per server) and commit on the home
server at close, so a file appears whole or not at all. Small files go in batches (one call per
home server carries hundreds of files): a 4 KiB unary gRPC call costs ~0.2 ms of CPU here, so
one call per file caps near 5k files/s (shared/reference/machine_limits.md, section 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import uuid
import weakref
from collections import defaultdict
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, NamedTuple, TypeVar

import grpc
import xxhash

from iosvc import wire
from iosvc._malloc import tune_client_malloc
from iosvc.client import _dataplane, _pull
from iosvc.client._mapped import MappedFile, can_map
from iosvc.config import ClusterSpec, find_cluster_file
from iosvc.errors import (
    ERROR_BY_NAME,
    DataCorruption,
    DeadlineExceeded,
    ForkedAfterGrpc,
    InternalError,
    InvalidArgument,
    IosvcError,
    IsADirectory,
    NotFound,
    Unavailable,
)
from iosvc.identity import JobIdentity, read_claims, token_from_env
from iosvc.placement import Placement, normalize_path

__all__ = ["AsyncClient", "AsyncWriter", "FileInfo"]

T = TypeVar("T")
FileInfo = dict[str, Any]

#: Files per batched call: large enough to amortise a call, small enough to pipeline.
SMALL_BATCH = 256
#: Bytes per batched write call.
SMALL_BATCH_BYTES = 8 * 1024 * 1024
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
#: Longest pause between two attempts; with the default 10 attempts a client waits ~5.5 s
#: in all, enough for a killed server to be restarted on a loaded node.
_MAX_BACKOFF = 1.0
DEFAULT_RETRIES = 10


def _transport_failure(exc: grpc.RpcError) -> bool:
    """INTERNAL raised by gRPC's core (a connection cut mid-call), not by an iosvc server.

    Servers put their error class in trailing metadata; a bare INTERNAL without it comes from
    the transport, e.g. when a server is killed during a call, and is safe to retry for the
    idempotent operations this client retries.
    """
    if not hasattr(exc, "code") or exc.code() != grpc.StatusCode.INTERNAL:
        return False
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return not any(key == wire.ERROR_METADATA_KEY for key, _ in trailing or ())


#: Bytes fetched per step by streaming reads (get_file, iter_chunks).
_WINDOW = 64 * 1024 * 1024
#: Versions a read by name follows when a hot file keeps being replaced under it.
_READ_ATTEMPTS = 8
#: Chunk pieces asked of a server in one read request (servers refuse lists over 4096).
_MAX_PIECES = 1024
#: Chunks per write call to one server (kept for resending until acknowledged).
_SEGMENT = 16

_clients: weakref.WeakSet[AsyncClient] = weakref.WeakSet()


class _Read(NamedTuple):
    """One version's range read by a fetch, and where its pieces go."""

    info: FileInfo
    start: int  # negative: from the end
    end: int | None  # None: to the end; negative: from the end
    sink: Callable[[int, memoryview], None]  # (offset, payload) of pieces not put in target
    target: memoryview | MappedFile | None  # received, read or mapped into straight


class _Piece(NamedTuple):
    """A chunk piece in a read request: ``spec`` is what the server is asked."""

    chunk: int  # the chunk's index in its version
    offset: int  # where the piece goes, relative to its read's start
    spec: list[Any]  # [chunk key, start, length, whole]
    read: _Read


def _copier(out: memoryview) -> Callable[[int, memoryview], None]:
    """A fetch sink that copies each piece into ``out`` at its offset."""
    out = out.cast("B")

    def copy(offset: int, payload: memoryview) -> None:
        out[offset : offset + len(payload)] = payload

    return copy


_grpc_started = False  # this process has made a gRPC channel
_forked_after_grpc = False  # ...and this process is a fork of one that had
_inherited: list[Any] = []  # channels inherited across fork, never to be destroyed


def fork_safe() -> bool:
    """Whether a child forked now could use iosvc clients.

    gRPC's core does not survive ``fork()`` once it has started: False after this process (or
    the one it was forked from) has made a gRPC channel. Start worker processes with
    ``forkserver`` or ``spawn`` then; clients made before the fork keep working in the child
    only while this is True. Reads open no channel when the cluster file lists the servers'
    endpoints (they go over the data ports, see :mod:`iosvc.dataplane`); writes and admin
    operations do.
    """
    return not (_grpc_started or _forked_after_grpc)


def _reset_after_fork() -> None:
    global _forked_after_grpc
    # gRPC's core does not survive fork once its threads run: any call in the child hangs.
    # Clients made before the fork work in the child only if the parent never used gRPC.
    _forked_after_grpc = _forked_after_grpc or _grpc_started
    for client in list(_clients):
        # Keep the parent's channels referenced forever: their destructors would call into
        # gRPC's core, which crashes or hangs in a forked child.
        _inherited.extend(client._channels.values())
        client._channels = {}
        client._loop = None
        client._data.reset()  # the parent's data connections stay the parent's


os.register_at_fork(after_in_child=_reset_after_fork)


def _raise_entry(entry: list[Any], path: str) -> IosvcError:
    cls = ERROR_BY_NAME.get(entry[0], IosvcError)
    return cls(entry[1] if len(entry) > 1 else path)


def _info(rec: dict[str, Any]) -> FileInfo:
    if rec.get("k") == "d":
        return {"name": rec["p"], "size": 0, "type": "directory"}
    return {
        "name": rec["p"],
        "size": rec["s"],
        "type": "file",
        "mtime": rec.get("mt", 0.0),
        "chunk_size": rec.get("cs"),
        "version": rec.get("u"),
        "checksums": rec.get("ck"),
        "owner": rec.get("o"),
    }


class AsyncClient:
    """Async client of one iosvc cluster.

    Parameters
    ----------
    cluster
        A :class:`ClusterSpec`, the path of a cluster file, or None to find the cluster file
        (``$IOSVC_CLUSTER`` or the default written by ``iosvc up``).
    identity
        Who is asking; default :meth:`JobIdentity.from_env`.
    chunk_size
        Chunk size of files this client writes (default: the cluster file's ``chunk_size``,
        else 2 MiB).
    retries
        Attempts on ``UNAVAILABLE`` (server restarting or briefly unreachable), with
        exponential backoff from 50 ms up to 1 s (the default rides out ~5 s of restart).
    timeout
        Deadline in seconds of each call.
    token
        Job token for secure clusters (default: ``$IOSVC_TOKEN`` or the file
        ``$IOSVC_TOKEN_FILE``); the identity is then the token's.
    tls_ca
        PEM file of the CA (or self-signed certificate) of servers that use TLS (default:
        ``$IOSVC_TLS_CA``, then the cluster file's ``tls_ca``; none: plaintext).
    """

    def __init__(
        self,
        cluster: ClusterSpec | str | os.PathLike[str] | None = None,
        *,
        identity: JobIdentity | None = None,
        chunk_size: int | None = None,
        retries: int = DEFAULT_RETRIES,
        timeout: float = 120.0,
        token: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        self.spec = cluster if isinstance(cluster, ClusterSpec) else ClusterSpec.load(cluster)
        # Read again for a restarted server's endpoints (None: the caller gave a spec).
        self._spec_file = None if isinstance(cluster, ClusterSpec) else find_cluster_file(cluster)
        # Operations each server's data port answers (its endpoints say which).
        self._port_calls: dict[int, frozenset[str]] = {}
        # TLS: the argument, $IOSVC_TLS_CA, then the cluster file's tls_ca (None: plaintext).
        self.tls_ca: str | None = (
            tls_ca or os.environ.get("IOSVC_TLS_CA") or self.spec.extra.get("tls_ca") or None
        )
        self.token = token if token is not None else token_from_env()
        if self.token is not None:
            self.identity = read_claims(self.token).identity  # what the servers will see
        else:
            self.identity = identity or JobIdentity.from_env()
        self.chunk_size = chunk_size or self.spec.chunk_size
        if not 4096 <= self.chunk_size <= wire.MAX_CHUNK_SIZE:
            raise InvalidArgument(f"chunk_size must be in [4096, {wire.MAX_CHUNK_SIZE}]")
        self.placement = Placement(len(self.spec.servers))
        self.retries = retries
        self.timeout = timeout
        self._id = self.identity.to_wire()
        # Every header carries the declared identity and, in secure mode, the job token.
        self._auth: dict[str, Any] = {"id": self._id}
        if self.token is not None:
            self._auth["tok"] = self.token
        self._channels: dict[int, grpc.aio.Channel] = {}
        # Servers whose chunk files this client may not read in place (another user's).
        self._not_in_place: set[int] = set()
        # Servers that answered an offer to read in place with bytes, or said (endpoints)
        # they would: not on this host, or not keeping chunks in files (so mapping their
        # files is not worth trying). And servers that said they could be read in place.
        self._sends_bytes: set[int] = set()
        self._can_map: set[int] = set()
        self._asked_in_place: set[int] = set()  # asked, whatever (or whether) they said
        self._loop: asyncio.AbstractEventLoop | None = None
        # Bulk reads and writes go over the servers' data ports (plain TCP, see
        # iosvc.dataplane) unless the cluster uses TLS (then gRPC encrypts them) or
        # IOSVC_DATA_PLANE=0.
        self._data = _dataplane.DataConnections(
            self.spec.servers, self._ask_data_port, connect_timeout=min(timeout, 10.0)
        )
        self._use_data_plane = self.tls_ca is None and _dataplane.enabled()
        # Endpoints the cluster file lists: no gRPC call before the first read (a stale
        # one fails its hello; then the file is read again, see _ask_data_port).
        for server, reply in enumerate(self.spec.endpoints):
            endpoint = self._take_endpoints(server, reply)
            if endpoint is not None:
                self._data.know(server, endpoint)
        _clients.add(self)
        # Keep gRPC's per-message buffers in the heap: without it every chunk lands in
        # fresh pages, and a large read spent more CPU in page faults than in copying.
        tune_client_malloc()

    @property
    def n_servers(self) -> int:
        return len(self.spec.servers)

    # ------------------------------------------------------------- transport
    def _channel(self, server: int) -> grpc.aio.Channel:
        global _grpc_started
        if _forked_after_grpc:
            raise ForkedAfterGrpc(
                "this process was forked from one already using gRPC, which cannot work after "
                "fork; start workers with 'spawn' or 'forkserver' (e.g. DataLoader("
                "multiprocessing_context='forkserver')) or make the parent's first iosvc call "
                "after the fork"
            )
        _grpc_started = True
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._channels = {}  # channels belong to the loop they were made on
            self._loop = loop
        channel = self._channels.get(server)
        if channel is None:
            channel = wire.aio_channel(self.spec.servers[server], self.tls_ca)
            self._channels[server] = channel
        return channel

    async def _retry(self, server: int, attempt: Callable[[], Awaitable[T]]) -> T:
        delay = 0.05
        for n in range(self.retries):
            try:
                return await attempt()
            except (ConnectionError, TimeoutError) as exc:
                # The data plane: a cut or refused connection is retried like gRPC's
                # UNAVAILABLE (on a new connection, the port asked again); a deadline is not,
                # nor an iosvc error (a nested call, e.g. for the port, retried already).
                if isinstance(exc, IosvcError):
                    raise
                where = f"server {self.spec.servers[server]}"
                self._data.forget(server)
                if isinstance(exc, TimeoutError):
                    raise DeadlineExceeded(f"{where}: no reply within {self.timeout} s") from None
                if n + 1 < self.retries:
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, _MAX_BACKOFF)
                    continue
                raise Unavailable(f"{where}: {exc} (after {n + 1} attempts)") from None
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if (code in _RETRYABLE or _transport_failure(exc)) and n + 1 < self.retries:
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, _MAX_BACKOFF)
                    continue
                err = wire.error_from_rpc(exc, f"server {self.spec.servers[server]}")
                if isinstance(err, Unavailable):
                    err = Unavailable(f"{err} (after {n + 1} attempts)")
                raise err from None
        raise AssertionError("unreachable")

    async def call(
        self, server: int, header: dict[str, Any], payload: bytes | memoryview = b""
    ) -> tuple[dict[str, Any], memoryview]:
        """One ``Call`` to ``server``; returns (reply header, reply payload).

        A read's metadata operations go over the server's data port where the server said
        it answers them there (its ``endpoints``: ``calls``): a reader then never starts
        gRPC (see :mod:`iosvc.dataplane`). The rest, and every call to a server without
        a data port, go through gRPC."""
        request = {**header, **self._auth}
        by_port = (
            self._use_data_plane
            and not payload
            and header.get("op") in self._port_calls.get(server, ())
        )

        async def attempt() -> bytes | bytearray:
            if by_port:
                async with asyncio.timeout(self.timeout):
                    # (asks for the port again after a failure: the cluster file first)
                    sock = await self._data.acquire(server)
                    if sock is not None:
                        return await _dataplane.call(self._data, server, sock, request)
            return await self._grpc_call(server, request, payload)

        return wire.unpack(await self._retry(server, attempt))

    async def _grpc_call(
        self, server: int, request: dict[str, Any], payload: bytes | memoryview = b""
    ) -> bytes:
        method = self._channel(server).unary_unary(wire.METHOD_CALL)
        reply: bytes = await method(wire.pack(request, payload), timeout=self.timeout)
        return reply

    async def _ask_data_port(self, server: int) -> tuple[int, str] | None:
        """The server's data port and instance id (None: it has no data port); notes
        whether its chunks can be read in place from this host.

        From the cluster file when it lists endpoints other than those found stale (a
        restarted server's new ones: ``LocalCluster.restart`` rewrites the file), so a
        reader needs no gRPC even then; else asked of the server."""
        listed = self._listed_endpoints(server)
        if listed is not None:
            return self._take_endpoints(server, listed)
        try:
            reply, _ = wire.unpack(
                await self._retry(
                    server, lambda: self._grpc_call(server, {"op": "endpoints", **self._auth})
                )
            )
        except InvalidArgument:  # a server older than the data plane
            return None
        return self._take_endpoints(server, reply)

    def _listed_endpoints(self, server: int) -> dict[str, Any] | None:
        """``server``'s endpoints as the cluster file lists them now, unless this client
        found them stale (or the file is another cluster's, or gone)."""
        if self._spec_file is None:
            return None
        try:
            spec = ClusterSpec.load(self._spec_file)
        except IosvcError:
            return None
        if spec.servers != self.spec.servers or not spec.endpoints:
            return None
        listed = spec.endpoints[server]
        if listed.get("instance") in self._data.stale.get(server, ()):
            return None
        return listed

    def _take_endpoints(self, server: int, reply: dict[str, Any]) -> tuple[int, str] | None:
        """The data port and instance of an ``endpoints`` answer (asked, or listed in the
        cluster file); notes whether the server's chunks can be read in place from here,
        and which operations its data port answers (none from servers older than that)."""
        calls = reply.get("calls")
        self._port_calls[server] = frozenset(calls) if isinstance(calls, list) else frozenset()
        if "in_place_host" in reply:  # (older servers do not say: learnt from their reads)
            shares = reply["in_place_host"] is not None and reply["in_place_host"] == wire.host_id()
            self._note_in_place(server, shares)
        port, instance = reply.get("data_port"), reply.get("instance")
        if isinstance(port, int) and 0 < port < 65536 and isinstance(instance, str):
            return port, instance
        return None

    async def call_all(self, header: dict[str, Any]) -> list[dict[str, Any]]:
        """Send one operation to every server at once; their reply headers, in order."""
        replies = await asyncio.gather(*(self.call(i, header) for i in range(self.n_servers)))
        return [h for h, _ in replies]

    # -------------------------------------------------------------- metadata
    async def status(self) -> list[dict[str, Any]]:
        """Status of every server (capacity, usage, files, queue); raises if one is down."""
        out = []
        for i, reply in enumerate(await self.call_all({"op": "status"})):
            out.append({"address": self.spec.servers[i], **reply})
        return out

    async def info(self, path: str) -> FileInfo:
        """Metadata of a file or directory; ``NotFound`` if neither."""
        (got,) = await self.info_many([path])
        if isinstance(got, IosvcError):
            raise got
        return got

    async def info_many(self, paths: Iterable[str]) -> list[FileInfo | IosvcError]:
        """:meth:`info` of many paths, with one ``stat`` call per home server (and batch
        of 256 paths): each path's metadata, or the error :meth:`info` raises for it, in
        order.

        What a reader of many files (a shard's, a dataset's) needs before it reads them,
        in one round trip instead of one per file. A path its home server has no record
        of is asked of the other servers, together with the others such (a directory is
        implied by any file below it, on any server). A batch a server refuses as a
        whole (a path this job may not read) is asked again path by path, so that only
        those paths carry the error.
        """
        paths = list(paths)
        out: list[FileInfo | IosvcError | None] = [None] * len(paths)
        norm: dict[int, str] = {}
        for n, path in enumerate(paths):
            if path in ("", "/"):
                out[n] = {"name": "", "size": 0, "type": "directory"}
                continue
            try:
                norm[n] = normalize_path(path)
            except IosvcError as exc:
                out[n] = exc
        groups: dict[int, list[int]] = defaultdict(list)
        for n, path in norm.items():
            groups[self.placement.home(path)].append(n)
        absent: list[int] = []

        async def batch(home: int, idx: list[int]) -> None:
            try:
                reply, _ = await self.call(home, {"op": "stat", "paths": [norm[n] for n in idx]})
            except IosvcError as exc:
                if len(idx) == 1:
                    out[idx[0]] = exc
                else:
                    await asyncio.gather(*(batch(home, [n]) for n in idx))
                return
            for n, rec in zip(idx, reply["recs"], strict=True):
                if rec is None:
                    absent.append(n)
                else:
                    out[n] = _info(rec)

        await asyncio.gather(
            *(
                batch(home, idx[i : i + SMALL_BATCH])
                for home, idx in groups.items()
                for i in range(0, len(idx), SMALL_BATCH)
            )
        )

        async def elsewhere(server: int) -> None:
            """Marks the absent paths ``server`` (not their home) has files below."""
            asked = [n for n in absent if self.placement.home(norm[n]) != server]
            if not asked:
                return
            header = {"op": "stat", "paths": [norm[n] for n in asked]}
            try:
                reply, _ = await self.call(server, header)
            except IosvcError as exc:  # unless another server shows a directory: the error
                for n in asked:
                    out[n] = out[n] or exc
                return
            for n, rec in zip(asked, reply["recs"], strict=True):
                if rec is not None:
                    out[n] = {"name": norm[n], "size": 0, "type": "directory"}

        await asyncio.gather(*(elsewhere(s) for s in range(self.n_servers)))
        for n in absent:
            if out[n] is None:
                out[n] = NotFound(f"no such file or directory: {norm[n]}")
        assert all(entry is not None for entry in out)
        return out  # type: ignore[return-value]

    async def _record(self, path: str) -> dict[str, Any]:
        info = await self.info(path)
        if info["type"] != "file":
            raise IsADirectory(f"{path} is a directory")
        return info

    async def exists(self, path: str) -> bool:
        try:
            await self.info(path)
        except NotFound:
            return False
        return True

    async def ls(self, path: str = "", *, recursive: bool = False) -> list[FileInfo]:
        """Entries directly under ``path`` (every file below it if ``recursive``).

        Listing a file returns that file's entry; a path that is neither raises ``NotFound``.
        """
        prefix = normalize_path(path) if path not in ("", "/") else ""
        replies = await self.call_all({"op": "ls", "prefix": prefix, "recursive": recursive})
        entries: dict[str, FileInfo] = {}
        exact = None
        for reply in replies:
            for rec in reply["files"]:
                entries[rec["p"]] = _info(rec)
            for name in reply["dirs"]:
                entries.setdefault(name, {"name": name, "size": 0, "type": "directory"})
            if reply.get("self") is not None:
                exact = reply["self"]
        if not entries:
            if exact is not None and exact.get("k") == "f":
                return [_info(exact)]
            if exact is None and prefix:
                raise NotFound(f"no such file or directory: {prefix}")
        return sorted(entries.values(), key=lambda e: e["name"])

    async def mkdir(self, path: str) -> None:
        """Make a directory marker (directories also exist implicitly below files)."""
        path = normalize_path(path)
        await self.call(self.placement.home(path), {"op": "mkdir", "path": path})

    async def rm(self, paths: str | Iterable[str], *, recursive: bool = False) -> None:
        """Remove files (and with ``recursive`` everything under directories)."""
        targets = [normalize_path(p) for p in ([paths] if isinstance(paths, str) else paths)]
        if recursive:
            expanded: list[str] = []
            for target in targets:
                info = await self.info(target)
                if info["type"] == "directory":
                    expanded += [e["name"] for e in await self.ls(target, recursive=True)]
                    expanded.append(target)  # its marker, if any
                else:
                    expanded.append(target)
            targets = expanded
        errors = await self._per_home(targets, "rm")
        for path, entry in errors:
            if recursive and entry[0] == "NotFound":
                continue  # implied directories have no record of their own
            raise _raise_entry(entry, path)

    async def _per_home(self, paths: list[str], op: str) -> list[tuple[str, list[Any]]]:
        groups: dict[int, list[str]] = defaultdict(list)
        for path in paths:
            groups[self.placement.home(path)].append(path)
        calls = []
        for home, group in groups.items():
            for i in range(0, len(group), SMALL_BATCH * 4):
                batch = group[i : i + SMALL_BATCH * 4]
                calls.append((batch, self.call(home, {"op": op, "paths": batch})))
        failed = []
        for batch, (reply, _) in zip(
            [b for b, _ in calls], await asyncio.gather(*(c for _, c in calls)), strict=True
        ):
            failed += [(p, e) for p, e in zip(batch, reply["errors"], strict=True) if e]
        return failed

    # ----------------------------------------------------------------- reads
    async def read(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the current version of a file.

        Negative offsets count from the end. If the file is replaced while being read and the
        old version's chunks are freed, the read restarts on the new version (a reader that
        asks by name wants what is there now); ``NotFound`` only if the file itself is gone.
        """
        path = normalize_path(path)
        if start == 0 and end is None:
            # A whole file: one batched call returns a single-chunk file's bytes with its
            # record (a stat, then a chunk read, took 2-4 round trips and a data-port
            # connection: ~15 ms of a fresh DataLoader worker's way to its manifest), and
            # reads a larger file as after a stat.
            got: bytes | IosvcError | None = None
            with contextlib.suppress(NotFound):  # a larger file replaced while read
                (got,) = await self.read_many([path])
            if isinstance(got, bytes):
                return got
            if got is not None and not isinstance(got, NotFound):
                raise got
            # Else again below. NotFound on its home server: missing, or a directory whose
            # files live on other servers (the stat below asks every server).
        for attempt in range(_READ_ATTEMPTS):
            info = await self._record(path)
            try:
                return await self.read_version(info, start, end)
            except NotFound:
                current = await self._record(path)  # NotFound if the file was removed
                if attempt + 1 == _READ_ATTEMPTS or current["version"] == info["version"]:
                    raise
        raise AssertionError("unreachable")

    async def read_version(self, info: FileInfo, start: int = 0, end: int | None = None) -> bytes:
        """Read from the exact version ``info`` describes (an open file keeps reading it)."""
        parts: dict[int, memoryview] = {}

        def keep(offset: int, payload: memoryview) -> None:
            parts[offset] = payload

        await self._fetch(info, start, end, keep)
        if len(parts) == 1:
            (part,) = parts.values()
            whole = part.obj
            if isinstance(whole, bytes) and len(whole) == part.nbytes:
                return whole  # read in place: already its own bytes object, no copy
            return bytes(part)
        return b"".join(parts[k] for k in sorted(parts))

    async def read_into(
        self,
        info: FileInfo,
        buffer: bytearray | memoryview,
        start: int = 0,
        *,
        verify: bool = True,
    ) -> int:
        """Fill ``buffer`` with the version's bytes from ``start``; return the count read.

        The fast path for large reads: no bytes object per chunk survives, so a reused
        buffer avoids the page faults of fresh allocations (expensive in VMs); chunks from
        a server's data port are received straight into ``buffer``, and chunks a server on
        this host keeps in files are read straight into it.

        ``verify=False`` skips the chunk checksums, for a caller that checks the bytes end
        to end itself (the dataloaders' block checksums), as :meth:`map` does.
        """
        out = memoryview(buffer).cast("B")
        end: int = min(info["size"], start + len(out))
        await self._fetch(info, start, end, _copier(out), target=out, verify=verify)
        return max(0, end - start)

    async def map(self, info: FileInfo, *, verify: bool = True) -> memoryview | None:
        """The whole version as one read-only view mapped from the servers' chunk files.

        For a reader on the servers' host (a node-local burst buffer): the chunks are
        admitted by their servers' schedulers as for any read, then their files are mapped
        into place (``mmap``), so nothing is copied and no fresh memory is filled; the pages
        are the ones the servers keep (page cache or tmpfs), as with a local file's ``mmap``.
        Chunks that come through gRPC after all are copied into place, and the view is
        correct either way; whole chunks are verified against the writer's checksums.

        Returns None, so that the caller reads the ordinary way (:meth:`read_into`), when
        mapping cannot help: an empty file, not Linux, chunks that are not page-aligned,
        reads in place turned off, or a server of the file known not to be on this host.

        ``verify=False`` skips the chunk checksums (of chunks mapped or received alike):
        for a caller that checks the bytes itself, end to end, as
        it reads them (the dataloaders' block checksums), so the file is not read whole
        here first.
        """
        region = await self._map_target(info)
        if region is None:
            return None
        await self._fetch(info, 0, info["size"], region.copy, target=region, verify=verify)
        return region.view()

    async def _map_target(self, info: FileInfo) -> MappedFile | None:
        """Address space to map the version's chunk files into, or None where :meth:`map`
        would decline."""
        size = info["size"]
        if size == 0 or not can_map(info["chunk_size"]):
            return None
        home = self.placement.home(info["name"])
        n_chunks = -(-size // info["chunk_size"])
        servers = {self.placement.chunk_server(home, i) for i in range(n_chunks)}
        if any(self._in_place_host(s) is None for s in servers):
            return None
        # Ask first, where not yet known: a file mapped from servers that send bytes after
        # all is a copy in fresh anonymous memory, worse than a read into a reused buffer
        # (and, to the dataloaders, not a file to keep in their node cache).
        unknown = servers - self._sends_bytes - self._can_map - self._asked_in_place
        await asyncio.gather(*(self._learn_in_place(s) for s in unknown))
        if servers & self._sends_bytes:
            return None
        return MappedFile(size)

    async def read_files(
        self,
        infos: Sequence[FileInfo],
        buffer: Callable[[int], bytearray | mmap.mmap],
        *,
        map_from: int | None = None,
        verify: bool = True,
    ) -> list[memoryview | IosvcError]:
        """Several versions whole, with one read request per server for all of them (per
        1024 chunks).

        Files of ``map_from`` bytes or more are mapped in place where :meth:`map` would map
        them; the others are received into ``buffer(size)`` (as :meth:`read_into`). Returns
        each file's view (of its mapping, or of its buffer's first ``size`` bytes) or its
        error. The dataloaders read a shard's files so: a request per file cost the client
        and every server a request's overhead per file, most of a shard's cost in place.

        A version gone meanwhile (``NotFound``) is sorted out by reading each file on its
        own, so each gets its own answer; any other failure (a server down, a deadline, a
        corrupt chunk) is every file's.
        """
        outs: list[MappedFile | memoryview] = []
        reads: list[_Read] = []
        for info in infos:
            size = info["size"]
            mapped = None
            if map_from is not None and size >= map_from:
                mapped = await self._map_target(info)
            if mapped is not None:
                outs.append(mapped)
                reads.append(_Read(info, 0, size, mapped.copy, mapped))
                continue
            view = memoryview(buffer(size))[:size]
            outs.append(view)
            reads.append(_Read(info, 0, size, _copier(view), view))
        try:
            await self._fetch_many(reads, verify=verify)
        except NotFound as exc:
            if len(infos) == 1:
                return [exc]
            # Some version is gone (replaced or removed since its info): which one(s), each
            # file read on its own says.
            alone = await asyncio.gather(
                *(self.read_files([i], buffer, map_from=map_from, verify=verify) for i in infos)
            )
            return [got for (got,) in alone]
        except IosvcError as exc:
            # A server down, a deadline, a corrupt chunk: every file shares the failure (not
            # asked again one by one, which would multiply the retries), each with its own
            # exception object.
            return [type(exc)(str(exc)) for _ in infos]
        return [out.view() if isinstance(out, MappedFile) else out for out in outs]

    async def _fetch(
        self,
        info: FileInfo,
        start: int,
        end: int | None,
        sink: Callable[[int, memoryview], None],
        *,
        target: memoryview | MappedFile | None = None,
        verify: bool = True,
    ) -> None:
        """Fetch ``[start, end)`` of a version, one stream per server, in parallel.

        ``sink(offset, payload)`` gets each piece with its offset relative to ``start``.
        Whole chunks are verified against the writer's checksums (unless ``verify=False``).

        Reads in place: a server on this host (same kernel and mount namespace) that keeps
        chunks in files admits the chunks through its scheduler as usual, then answers with
        each chunk's path instead of its bytes, and this client reads the file itself (into
        ``target`` at the piece's offset when given, skipping ``sink``): no copy through
        gRPC; a :class:`MappedFile` target maps the file into place instead. A chunk it
        cannot read that way (removed meanwhile, no permission) is fetched again the
        ordinary way; ``IOSVC_READ_IN_PLACE=0`` turns reading in place off.
        """
        await self._fetch_many([_Read(info, start, end, sink, target)], verify=verify)

    async def _fetch_many(self, reads: Sequence[_Read], *, verify: bool = True) -> None:
        """:meth:`_fetch` for several reads at once: one stream per server for the pieces
        of all of them."""
        plans: dict[int, list[_Piece]] = defaultdict(list)
        for job in reads:
            info, start, end = job.info, job.start, job.end
            size = info["size"]
            if start < 0:
                start = max(0, size + start)
            end = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
            if start >= end:
                continue
            home = self.placement.home(info["name"])
            cs = info["chunk_size"]
            version = info["version"]
            for i in range(start // cs, (end - 1) // cs + 1):
                c0, c1 = i * cs, min((i + 1) * cs, size)
                lo, hi = max(start, c0) - c0, min(end, c1) - c0
                whole = lo == 0 and hi == c1 - c0
                plans[self.placement.chunk_server(home, i)].append(
                    _Piece(i, c0 + lo - start, [f"c/{home}/{version}/{i}", lo, hi - lo, whole], job)
                )

        async def fetch(server: int, plan: list[_Piece]) -> None:
            for at in range(0, len(plan), _MAX_PIECES):
                part = plan[at : at + _MAX_PIECES]
                host = self._in_place_host(server)
                while part:
                    part = await self._stream_chunks(server, part, host, verify)
                    host = None  # what could not be read in place comes through the server

        # One failed stream fails the fetch, and the others stop with it: they would
        # otherwise go on writing into buffers their caller has been told about.
        streams = [asyncio.ensure_future(fetch(s, p)) for s, p in plans.items()]
        try:
            await asyncio.gather(*streams)
        except BaseException:
            for stream in streams:
                stream.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            raise

    async def _stream_chunks(
        self, server: int, plan: list[_Piece], host: str | None, verify: bool = True
    ) -> list[_Piece]:
        """One ``ReadChunks`` stream (with retries); returns the pieces told to be read in
        place that could not be (to fetch again through the server, which answers NotFound
        if they are really gone)."""
        again: list[_Piece] = []

        async def attempt() -> None:
            again.clear()
            header = {**self._auth, "chunks": [p.spec for p in plan]}
            if host is not None:
                header["host"] = host
            frames = self._read_frames(server, header, plan)
            async with asyncio.timeout(self.timeout), contextlib.aclosing(frames):
                async for header, payload, received in frames:
                    piece = plan[header["i"]]
                    index, offset, spec, job = piece
                    target = job.target
                    direct = received
                    if "path" in header:
                        read = self._read_in_place(server, header["path"], spec, target, offset)
                        if read is None:
                            again.append(piece)
                            continue
                        payload, direct = read, target is not None
                        self._note_in_place(server, True)
                    elif host is not None:
                        self._note_in_place(server, False)
                    name = job.info["name"]
                    if len(payload) != spec[2]:
                        raise DataCorruption(f"{name}: chunk {index} is short")
                    if (
                        verify
                        and spec[3]
                        and xxhash.xxh3_64_intdigest(payload) != job.info["checksums"][index]
                    ):
                        raise DataCorruption(
                            f"{name}: chunk {index} from {self.spec.servers[server]} "
                            "failed its checksum"
                        )
                    if not direct:
                        job.sink(offset, payload)

        await self._retry(server, attempt)
        return again

    async def _read_frames(
        self, server: int, header: dict[str, Any], plan: list[_Piece]
    ) -> AsyncGenerator[tuple[dict[str, Any], memoryview, bool], None]:
        """One read request's replies: ``(header, payload, received into target)``.

        Over the server's data port when it has one (payloads for a piece whose read has a
        ``target`` buffer land there straight from the socket), else over a gRPC
        ``ReadChunks`` stream.
        """
        sock = await self._data.acquire(server) if self._use_data_plane else None
        if sock is None:
            method = self._channel(server).unary_stream(wire.METHOD_READ)
            async for reply in method(wire.pack(header), timeout=self.timeout):
                reply_header, payload = wire.unpack(reply)
                yield reply_header, payload, False
            return

        def destination(reply: dict[str, Any]) -> memoryview | None:
            piece = reply.get("i")
            if not isinstance(piece, int) or not 0 <= piece < len(plan):
                return None
            _, offset, spec, job = plan[piece]
            if not isinstance(job.target, memoryview):
                return None
            return job.target[offset : offset + spec[2]]

        frames = _dataplane.read_frames(self._data, server, sock, header, destination)
        async with contextlib.aclosing(frames):
            async for item in frames:
                yield item

    async def _learn_in_place(self, server: int) -> None:
        """Whether ``server`` can be read in place from here (its ``endpoints`` answer;
        asked once: a server that does not say is learnt from its replies)."""
        with contextlib.suppress(IosvcError):
            if self._use_data_plane:
                await self._data.port(server)  # asked once, for the data port as well
            else:
                await self._ask_data_port(server)
            self._asked_in_place.add(server)

    def _note_in_place(self, server: int, can: bool) -> None:
        """Record whether ``server``'s chunks can be read in place from here (it said so,
        or a reply showed it); the latest word wins (a restarted server may differ)."""
        (self._can_map if can else self._sends_bytes).add(server)
        (self._sends_bytes if can else self._can_map).discard(server)

    def _in_place_host(self, server: int) -> str | None:
        """This host's id to offer ``server`` for reads in place, or None not to."""
        if server in self._not_in_place or os.environ.get("IOSVC_READ_IN_PLACE") == "0":
            return None
        return wire.host_id()

    def _read_in_place(
        self,
        server: int,
        path: str,
        spec: list[Any],
        target: memoryview | MappedFile | None,
        offset: int,
    ) -> memoryview | None:
        """Read (or map) a chunk piece from the server's file; None if that cannot be done."""
        start, length = spec[1], spec[2]
        # A MappedFile target maps the whole chunk (map() asks for whole chunks only).
        view = target[offset : offset + length] if isinstance(target, memoryview) else None
        try:
            # Inline, not in a thread: a chunk from the page cache or tmpfs takes ~0.1 ms,
            # less than a hop to a worker thread and back.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            self._not_in_place.add(server)  # another user's server: always go through it
            return None
        except OSError:
            return None  # removed meanwhile (replaced file past its grace)
        try:
            if isinstance(target, MappedFile):
                return target.map_chunk(offset, fd, length)
            if view is None:  # a new bytes object, not zero-filled first as a bytearray is
                view = memoryview(os.pread(fd, length, start))
                got = len(view)
            else:
                got = os.preadv(fd, [view], start)
        except OSError:
            return None
        finally:
            os.close(fd)
        return view if got == length else None

    async def read_many(self, paths: Iterable[str]) -> list[bytes | IosvcError]:
        """Read many files in batched calls (one per home server and batch).

        Returns, in order, each file's bytes or the error for that file (so one missing
        file does not fail a batch of thousands).
        """
        norm = [normalize_path(p) for p in paths]
        out: list[bytes | IosvcError] = [b""] * len(norm)
        groups: dict[int, list[int]] = defaultdict(list)
        for n, path in enumerate(norm):
            groups[self.placement.home(path)].append(n)
        big: list[tuple[int, FileInfo]] = []

        async def batch(home: int, idx: list[int]) -> None:
            reply, payload = await self.call(
                home, {"op": "read_small", "paths": [norm[n] for n in idx]}
            )
            offset = 0
            for n, entry in zip(idx, reply["files"], strict=True):
                if isinstance(entry, dict):
                    big.append((n, _info(entry["rec"])))
                elif isinstance(entry[0], str):
                    out[n] = _raise_entry(entry, norm[n])
                else:
                    size, checksum = entry
                    data = payload[offset : offset + size]
                    offset += size
                    if size and xxhash.xxh3_64_intdigest(data) != checksum:
                        out[n] = DataCorruption(f"{norm[n]}: checksum mismatch")
                    else:
                        out[n] = bytes(data)

        await asyncio.gather(
            *(
                batch(home, idx[i : i + SMALL_BATCH])
                for home, idx in groups.items()
                for i in range(0, len(idx), SMALL_BATCH)
            )
        )
        if big:
            datas = await asyncio.gather(*(self.read_version(info) for _, info in big))
            for (n, _), data in zip(big, datas, strict=True):
                out[n] = data
        return out

    # ---------------------------------------------------------------- writes
    def open_writer(self, path: str, *, chunk_size: int | None = None) -> AsyncWriter:
        """A streaming writer; the file becomes visible when the writer is closed."""
        return AsyncWriter(self, normalize_path(path), chunk_size or self.chunk_size)

    async def write(self, path: str, data: bytes | bytearray | memoryview) -> None:
        """Write a whole file (replacing any old version atomically)."""
        writer = self.open_writer(path)
        try:
            await writer.write(data)
            await writer.close()
        except BaseException:
            await writer.abort()
            raise

    async def write_many(self, files: Mapping[str, bytes | bytearray | memoryview]) -> None:
        """Write many files; small ones go in batches per home server."""
        small: dict[int, list[tuple[dict[str, Any], bytes | bytearray | memoryview]]] = defaultdict(
            list
        )
        large = []
        # Check every path before making any coroutine, so a bad one strands nothing.
        normalized = [(normalize_path(p), d) for p, d in files.items()]
        for path, data in normalized:
            if len(data) > self.chunk_size:
                large.append(self.write(path, data))
                continue
            rec = _small_record(path, data, self.chunk_size)
            small[self.placement.home(path)].append((rec, data))

        async def put(home: int, group: list[tuple[dict[str, Any], Any]]) -> None:
            reply, _ = await self.call(
                home,
                {"op": "put_small", "files": [rec for rec, _ in group]},
                b"".join(data for _, data in group),
            )
            for (rec, _), entry in zip(group, reply["errors"], strict=True):
                if entry:
                    raise _raise_entry(entry, rec["p"])

        calls = []
        for home, group in small.items():
            start = nbytes = 0
            for n, (_, data) in enumerate(group):
                nbytes += len(data)
                if n + 1 - start >= SMALL_BATCH or nbytes >= SMALL_BATCH_BYTES:
                    calls.append(put(home, group[start : n + 1]))
                    start, nbytes = n + 1, 0
            if start < len(group):
                calls.append(put(home, group[start:]))
        await asyncio.gather(*calls, *large)

    async def put_file(
        self,
        local_path: str | os.PathLike[str],
        path: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload a local file chunk by chunk (bounded memory)."""
        writer = self.open_writer(path)
        try:
            with open(local_path, "rb") as f:
                while block := await asyncio.to_thread(f.read, writer.chunk_size):
                    await writer.write(block)
                    if progress is not None:
                        progress(len(block))
            await writer.close()
        except BaseException:
            await writer.abort()
            raise

    # Server-side stage-in: the servers read the files themselves (``iosvc/client/_pull.py``).
    pull_files = _pull.pull_files
    pull_probe = _pull.pull_probe

    async def get_file(
        self,
        path: str,
        local_path: str | os.PathLike[str],
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Download a file to local disk, a window of chunks at a time."""
        info = await self._record(normalize_path(path))
        window = bytearray(min(info["size"], _WINDOW) or 1)
        tmp = f"{os.fspath(local_path)}.iosvc-part"
        try:
            with open(tmp, "wb") as f:
                for start in range(0, info["size"], len(window)):
                    n = await self.read_into(info, window, start)
                    await asyncio.to_thread(f.write, memoryview(window)[:n])
                    if progress is not None:
                        progress(n)
            os.replace(tmp, local_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def iter_chunks(self, path: str) -> AsyncIterator[bytes]:
        """Yield a file's bytes a window at a time (for ``iosvc cat`` of large files)."""
        info = await self._record(normalize_path(path))
        for start in range(0, info["size"], _WINDOW):
            yield await self.read_version(info, start, start + _WINDOW)

    async def close(self) -> None:
        """Close channels (only valid on the loop that made them) and data connections."""
        self._data.reset()
        channels, self._channels = self._channels, {}
        if self._loop is not None and self._loop is asyncio.get_running_loop():
            for channel in channels.values():
                await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _small_record(
    path: str, data: bytes | bytearray | memoryview, chunk_size: int
) -> dict[str, Any]:
    return {
        "p": path,
        "s": len(data),
        "cs": chunk_size,
        "u": uuid.uuid4().hex,
        "ck": [xxhash.xxh3_64_intdigest(data)] if len(data) else [],
    }


#: One chunk of a writer on its way to a server: (frame header, bytes).
_Chunk = tuple[dict[str, Any], bytes]


class AsyncWriter:
    """Streams one file's chunks to their servers; :meth:`close` commits it.

    Chunks go out as soon as they are full, over one stream per server (its data port, or a
    gRPC ``WriteChunks`` call), so
    memory stays at about one chunk per server. Until :meth:`close` returns, readers see the
    previous version (or nothing); if the writer dies, its chunks are reclaimed by the servers.
    """

    def __init__(self, client: AsyncClient, path: str, chunk_size: int) -> None:
        self.client = client
        self.path = path
        self.chunk_size = chunk_size
        self.uid = uuid.uuid4().hex
        self.home = client.placement.home(path)
        self._buffer = bytearray()
        self._index = 0
        self._size = 0
        self._checksums: list[int] = []
        self._queues: dict[int, asyncio.Queue[_Chunk | None]] = {}
        self._streams: dict[int, asyncio.Task[Any]] = {}
        self._closed = False

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes."""
        if self._closed:
            raise InvalidArgument(f"writer of {self.path} is closed")
        view = memoryview(data).cast("B")
        # Whole chunks straight from the caller's buffer, no copy into ours.
        if not self._buffer:
            while len(view) >= self.chunk_size:
                await self._send(view[: self.chunk_size])
                view = view[self.chunk_size :]
        self._buffer += view
        while len(self._buffer) >= self.chunk_size:
            await self._send(bytes(self._buffer[: self.chunk_size]))
            del self._buffer[: self.chunk_size]

    async def _send(self, chunk: bytes | memoryview) -> None:
        self._raise_failed_stream()
        index = self._index
        self._index += 1
        self._size += len(chunk)
        checksum = xxhash.xxh3_64_intdigest(chunk)
        self._checksums.append(checksum)
        server = self.client.placement.chunk_server(self.home, index)
        queue = self._queues.get(server)
        if queue is None:
            queue = self._queues[server] = asyncio.Queue(maxsize=2)
            self._streams[server] = asyncio.ensure_future(self._stream(server, queue))
        key = f"c/{self.home}/{self.uid}/{index}"
        # Queued, not sent yet: a view of the caller's buffer is copied (the caller may
        # reuse the buffer once write() returns); our own chunks are bytes already.
        payload = chunk if isinstance(chunk, bytes) else bytes(chunk)
        await self._put(server, ({**self.client._auth, "key": key, "ck": checksum}, payload))

    async def _put(self, server: int, item: _Chunk | None) -> None:
        """Queue a chunk for a server's stream, or raise if that stream has failed."""
        stream = self._streams[server]
        put = asyncio.ensure_future(self._queues[server].put(item))
        await asyncio.wait((put, stream), return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            self._raise_failed_stream()

    async def _stream(self, server: int, queue: asyncio.Queue[_Chunk | None]) -> None:
        # One call per segment of chunks; a segment is kept until the server acknowledges it so
        # a retry after UNAVAILABLE can resend it, and memory stays bounded for huge files.
        while await self._segment(server, queue):
            pass

    async def _segment(self, server: int, queue: asyncio.Queue[_Chunk | None]) -> bool:
        """Send up to ``_SEGMENT`` chunks in one call (over the server's data port, or a
        gRPC ``WriteChunks`` stream); False once the end was reached.

        One task takes the segment's chunks off the queue into ``sent``; each attempt only
        reads ``sent``. (An attempt that took from the queue itself could lose a chunk: a
        failed gRPC call does not cancel the task reading its request iterator, which then
        took the next chunk for the dead call while the retry waited.)
        """
        sent: list[_Chunk] = []
        arrived = asyncio.Event()

        async def pull() -> bool:
            while len(sent) < _SEGMENT:
                item = await queue.get()
                if item is None:
                    return True
                sent.append(item)
                arrived.set()
            return False

        puller = asyncio.ensure_future(pull())

        async def chunks() -> AsyncIterator[_Chunk]:
            i = 0
            while True:
                if i < len(sent):
                    yield sent[i]
                    i += 1
                elif puller.done():
                    return
                else:
                    arrived.clear()
                    waiter = asyncio.ensure_future(arrived.wait())
                    await asyncio.wait((waiter, puller), return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()

        async def frames() -> AsyncIterator[bytes]:
            async for header, payload in chunks():
                yield wire.pack(header, payload)

        client = self.client

        async def attempt() -> dict[str, Any]:
            sock = await client._data.acquire(server) if client._use_data_plane else None
            if sock is not None:
                async with asyncio.timeout(client.timeout):
                    reply = await _dataplane.write_segment(client._data, server, sock, chunks())
                if reply.get("failed"):
                    return {"error": reply["failed"]}
                return {"n": reply.get("chunks")}
            method = client._channel(server).stream_unary(wire.METHOD_WRITE)
            header, _ = wire.unpack(await method(frames(), timeout=client.timeout))
            return header

        try:
            header = await client._retry(server, attempt)
        finally:
            puller.cancel()
        if header.get("error"):
            raise _raise_entry(header["error"], self.path)
        if header.get("n") != len(sent):  # never acknowledge what was not stored
            raise InternalError(
                f"{self.path}: server {client.spec.servers[server]} stored "
                f"{header.get('n')} of {len(sent)} chunks of a segment"
            )
        return not puller.result()  # done: the attempt read every chunk it pulled

    def _raise_failed_stream(self) -> None:
        for task in self._streams.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def close(self) -> None:
        """Flush, wait for every server to acknowledge, and commit on the home server."""
        if self._closed:
            return
        self._closed = True
        rec: dict[str, Any]
        if self._index == 0:
            # Fits one chunk: data and commit in a single call to the home server.
            rec = _small_record(self.path, self._buffer, self.chunk_size)
            reply, _ = await self.client.call(
                self.home, {"op": "put_small", "files": [rec]}, bytes(self._buffer)
            )
            if reply["errors"][0]:
                raise _raise_entry(reply["errors"][0], self.path)
            return
        if self._buffer:
            await self._send(bytes(self._buffer))
            self._buffer.clear()
        for server in self._queues:
            await self._put(server, None)
        await asyncio.gather(*self._streams.values())
        rec = {
            "p": self.path,
            "s": self._size,
            "cs": self.chunk_size,
            "u": self.uid,
            "ck": self._checksums,
        }
        await self.client.call(self.home, {"op": "commit", "rec": rec})

    async def abort(self) -> None:
        """Give up: nothing becomes visible; chunks already sent are freed."""
        self._closed = True
        for task in self._streams.values():
            task.cancel()
        await asyncio.gather(*self._streams.values(), return_exceptions=True)
        servers = list(self._streams)
        if servers:
            await asyncio.gather(
                *(self.client.call(s, {"op": "drop", "uids": [self.uid]}) for s in servers),
                return_exceptions=True,
            )

    async def __aenter__(self) -> AsyncWriter:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

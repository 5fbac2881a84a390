"""The data plane: chunk reads and writes over plain TCP, beside the gRPC control plane.

gRPC carries every operation; bulk chunk transfers and a read's metadata operations may
also go over a server's *data port*, a plain TCP listener. Each connection carries one
request at a time, as frames of ``[u32 header length][msgpack header]`` followed by ``n``
raw payload bytes where the header says ``"n": n``::

    hello     {"op": "hello", "to": instance}   (the instance id ``endpoints`` gave with the port)
      reply   {"end": true, "n": 0}, or {"error": "Unavailable", ...} and a close: the port
              now belongs to another process (the server restarted), ask for it again

    read      {"op": "read", "chunks": [[key, start, length, whole], ...], <identity>,
               "host": ...}   (optional: offers to read the chunk files in place, same host)
      reply   {"i": k, "n": n, "ck": ...} + n bytes   (or {"i": k, "path": ...}), one per piece
              (the pieces of one request may belong to several files; path replies are
              sent together, a run of them per send)
      last    {"end": true, "n": 0}   or   {"error": name, "msg": ..., "n": 0}

    call      {"op": "call", "call": {"op": ..., <identity>, ...}}   a read's metadata
              operation (one of ``CALLS``: ``stat``, ``ls``, ``read_small``, ``endpoints``)
      reply   {"end": true, "n": n} + n bytes: the operation's reply frame, as gRPC's
              ``Call`` returns it (``iosvc.wire.pack``), or an error frame

    write     {"op": "write", "key": ..., "ck": xxh3, "n": n, <identity>} + n bytes, repeated
    flush     {"op": "flush"}
      reply   {"end": true, "n": 0, "chunks": c, "bytes": b[, "failed": [name, msg]]}

A reader thus needs no gRPC at all when the cluster file lists the servers' ``endpoints``
(``iosvc.config.ClusterSpec``; each says which ``calls`` its port answers): a DataLoader
worker starts without a gRPC channel (each cost a worker ~5 ms of CPU and a first call of
5-13 ms), and a process that has only read may still fork (gRPC's core does not survive
``fork``). A stale endpoint (a restarted server) is looked up in the cluster file again,
and asked of the server over gRPC only if the file has nothing newer. Writes' metadata
(commits, removals), ``status`` and admin operations stay on gRPC.

A write segment (its chunks up to the ``flush``) is what a gRPC ``WriteChunks`` call is: after
a failed chunk the server reads and drops the rest of the segment, and its reply names the
failure; a client silent for ``--stream-idle-timeout`` inside a segment is cut off (its
client retries the segment on a new connection; chunks never flushed are never committed).
A malformed frame gets an ``InvalidArgument`` error frame, then the connection is closed
(the stream cannot be resynchronised); a server at its connection cap answers a new
connection with an ``Unavailable`` error frame and closes it.

Why a second transport: through grpc.aio a 1 GiB read cost ~1.4 CPU-s on this project's
2-core VM (client and servers together: gRPC copies every message into its own slices, then
into a ``bytes``, then into the caller's buffer); on a plain socket the kernel copies the
payload once, straight into the caller's buffer (``recv_into``), and the server sends the
stored bytes without a copy (``sendmsg``): ~0.9 CPU-s per GiB and 1.27x the throughput in
the same run (``bench/results/throughput.json``). Writes likewise land in the buffer the
store keeps. HPC storage splits its transports the same way (Mercury's RPC + bulk, DAOS,
ThemisIO's own sockets).

Every request carries the same identity or token as a gRPC call and every chunk is admitted
by the server's scheduler in the same way, so fair shares do not depend on the transport
(chunks read in place are admitted in runs, each one request charged the bytes and an
operation per chunk: ``IoService._answer_in_place``). Both sides read frames through a small buffer
(:class:`FrameReader`): a run of replies, or a request's header, takes one ``recv``.
The data port is off on servers with TLS (transfers then go through gRPC, which encrypts
them).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

import msgpack

from iosvc.errors import ERROR_BY_NAME, InvalidArgument, IosvcError
from iosvc.wire import MAX_CHUNK_SIZE, MAX_HEADER_SIZE

__all__ = [
    "CALLS",
    "MAX_DATA_HEADER",
    "FrameError",
    "FrameReader",
    "decode_header",
    "error_frame",
    "error_from_frame",
    "frame",
    "recv_exact",
    "recv_header",
    "send_frame",
    "tune_socket",
]

_LEN = struct.Struct("<I")
#: Largest header either side accepts on the data port (a request lists chunk keys).
MAX_DATA_HEADER = MAX_HEADER_SIZE
#: Largest payload of one reply frame.
MAX_PAYLOAD = MAX_CHUNK_SIZE
#: Operations a data port answers besides chunk reads and writes: what a reader needs.
CALLS = frozenset({"stat", "ls", "read_small", "endpoints"})
#: Socket buffers: a few chunks in flight per connection without waking the reader per
#: segment (the kernel caps them at net.core.[rw]mem_max).
_SOCKET_BUFFER = 4 * 1024 * 1024


_DEAD_PEER_OPTIONS = (
    ("TCP_KEEPIDLE", 10),
    ("TCP_KEEPINTVL", 5),
    ("TCP_KEEPCNT", 2),
    ("TCP_USER_TIMEOUT", 20_000),  # milliseconds
)


class FrameError(ConnectionError):
    """The byte stream of a data connection broke: closed, cut, or out of step."""


def tune_socket(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay (replies are sent whole), large buffers, and a dead
    peer noticed within ~20 s.

    A host that drops off the network sends no reset: without keepalive a reader would wait
    for its whole deadline. gRPC's channels ping every 10 s (``wire.CHANNEL_OPTIONS``); the
    data connections use TCP keepalive (idle 10 s, 2 probes 5 s apart) and
    ``TCP_USER_TIMEOUT`` (data unacknowledged for 20 s) to the same end.
    """
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _DEAD_PEER_OPTIONS:
            option = getattr(socket, name, None)
            if option is not None:  # Linux; other systems keep their defaults
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        # A kernel that refuses keeps its default.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)


def frame(header: dict[str, Any]) -> bytes:
    """The length prefix and msgpack header of one frame (its payload follows unframed)."""
    head = msgpack.packb(header, use_bin_type=True)
    if len(head) > MAX_DATA_HEADER:
        raise InvalidArgument(f"header of {len(head)} bytes is over {MAX_DATA_HEADER}")
    return _LEN.pack(len(head)) + head


def error_frame(exc: IosvcError) -> bytes:
    """The frame that ends a request with ``exc`` (the client raises the same class)."""
    return frame({"error": type(exc).__name__, "msg": str(exc), "n": 0})


def error_from_frame(header: dict[str, Any], where: str) -> IosvcError:
    """The :class:`IosvcError` an error frame names."""
    cls = ERROR_BY_NAME.get(str(header.get("error")), IosvcError)
    return cls(f"{where}: {header.get('msg', 'error')}")


async def send_frame(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    head: bytes,
    payload: bytes | bytearray | memoryview = b"",
) -> None:
    """Send a frame and its payload; the payload is not copied.

    One ``sendmsg`` of both parts usually takes them whole (socket buffers of several MiB);
    what it leaves is sent as the socket drains.
    """
    parts = [memoryview(head), memoryview(payload).cast("B")] if payload else [memoryview(head)]
    total = sum(p.nbytes for p in parts)
    try:
        sent = sock.sendmsg(parts)
    except (BlockingIOError, InterruptedError):
        sent = 0
    if sent == total:
        return
    for part in parts:
        if sent >= part.nbytes:
            sent -= part.nbytes
            continue
        await loop.sock_sendall(sock, part[sent:])
        sent = 0


async def recv_exact(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview
) -> None:
    """Fill ``view`` from the socket; :class:`FrameError` if it closes first."""
    while view:
        got = await loop.sock_recv_into(sock, view)
        if got == 0:
            raise FrameError("connection closed by the peer")
        view = view[got:]


async def recv_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, *, limit: int = MAX_DATA_HEADER
) -> dict[str, Any]:
    """Receive one frame's header; :class:`InvalidArgument` if it is malformed."""
    prefix = bytearray(4)
    await recv_exact(loop, sock, memoryview(prefix))
    (size,) = _LEN.unpack(prefix)
    if size > limit:
        raise InvalidArgument(f"header length {size} is over {limit}")
    raw = bytearray(size)
    await recv_exact(loop, sock, memoryview(raw))
    return decode_header(raw)


class FrameReader:
    """Receives frames from a connection through a small buffer.

    One ``recv`` takes whatever has arrived: the headers of a run of small frames (replies
    of chunks to read in place, sent together; a request's header) are parsed from it, not
    received two ``recv`` calls each. A payload's bytes past those already buffered are
    received straight into their destination. The buffer may hold bytes of the next frames
    too, so every read of the connection must go through the same reader (a client's
    reader lives for one request, whose replies are the only bytes a server sends it; see
    ``buffered``).

    Parameters
    ----------
    loop, sock
        The event loop and the connection.
    size
        Buffer bytes (headers larger than this are received into their own buffer).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int = 16 * 1024
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._buf = memoryview(bytearray(size))
        self._lo = self._hi = 0  # buffered bytes: _buf[_lo:_hi]

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out."""
        return self._hi - self._lo

    @property
    def has_header(self) -> bool:
        """Whether the next frame's whole header is buffered (``header()`` will not wait)."""
        have = self._hi - self._lo
        if have < _LEN.size:
            return False
        (size,) = _LEN.unpack_from(self._buf, self._lo)
        return bool(have - _LEN.size >= size)

    async def ready(self) -> bool:
        """Wait until some bytes are buffered; False if the peer closed the connection
        first (between frames: a clean end)."""
        if self._hi > self._lo:
            return True
        self._lo = self._hi = 0
        got = await self._loop.sock_recv_into(self._sock, self._buf)
        self._hi = got
        return bool(got)

    async def _fill(self, need: int) -> None:
        """Buffer at least ``need`` bytes (``need`` <= the buffer size)."""
        if self._hi - self._lo >= need:
            return
        if self._lo == self._hi:  # empty: offer the next recv the whole buffer
            self._lo = self._hi = 0
        if len(self._buf) - self._lo < need:  # move what is left to the front
            kept = self._hi - self._lo
            self._buf[:kept] = self._buf[self._lo : self._hi]
            self._lo, self._hi = 0, kept
        while self._hi - self._lo < need:
            got = await self._loop.sock_recv_into(self._sock, self._buf[self._hi :])
            if got == 0:
                raise FrameError("connection closed by the peer")
            self._hi += got

    async def into(self, view: memoryview) -> None:
        """Fill ``view`` with the next bytes: buffered ones first, then from the socket."""
        take = min(self._hi - self._lo, view.nbytes)
        if take:
            view[:take] = self._buf[self._lo : self._lo + take]
            self._lo += take
        if take < view.nbytes:
            await recv_exact(self._loop, self._sock, view[take:])

    async def header(self, *, limit: int = MAX_DATA_HEADER) -> dict[str, Any]:
        """The next frame's header; :class:`InvalidArgument` if it is malformed."""
        await self._fill(_LEN.size)
        (size,) = _LEN.unpack_from(self._buf, self._lo)
        if size > limit:
            raise InvalidArgument(f"header length {size} is over {limit}")
        self._lo += _LEN.size
        if size > len(self._buf):
            raw = bytearray(size)
            await self.into(memoryview(raw))
            return decode_header(raw)
        await self._fill(size)
        header = decode_header(self._buf[self._lo : self._lo + size])
        self._lo += size
        return header


def decode_header(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A frame's msgpack header; :class:`InvalidArgument` if it is not a map."""
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types; all mean "malformed"
        raise InvalidArgument(f"malformed header: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgument("header must be a map")
    return header

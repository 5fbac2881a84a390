"""The client side of the data plane (see :mod:`iosvc.dataplane`): pooled plain-TCP
connections to the servers' data ports, and the read and write streams over one."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import Any

from iosvc import dataplane
from iosvc.errors import DataCorruption, InvalidArgument, IosvcError
from iosvc.wire import MAX_MESSAGE_SIZE

__all__ = ["DataConnections", "call", "read_frames", "write_segment"]

#: Idle connections kept per server (one per concurrent read stream is enough).
_KEEP_PER_SERVER = 8


def enabled() -> bool:
    """``IOSVC_DATA_PLANE=0`` sends every transfer through gRPC (e.g. behind a firewall
    that opens the gRPC ports only)."""
    return os.environ.get("IOSVC_DATA_PLANE", "1") != "0"


class DataConnections:
    """Idle data connections per server, and each server's data port.

    Parameters
    ----------
    servers
        ``host:port`` of each server's gRPC endpoint (the data port is on the same host).
    ask_port
        Coroutine asking server ``i`` for its data port and instance id (a gRPC
        ``endpoints`` call); None means the server has none.
    connect_timeout
        Seconds a new connection may take (a port behind a firewall that drops packets
        would otherwise hold a read for the kernel's connect timeout).
    """

    def __init__(
        self,
        servers: tuple[str, ...],
        ask_port: Callable[[int], Awaitable[tuple[int, str] | None]],
        connect_timeout: float = 10.0,
    ) -> None:
        self.servers = servers
        self._ask_port = ask_port
        self.connect_timeout = connect_timeout
        self._ports: dict[int, tuple[int, str] | None] = {}
        #: Instances whose port failed to connect or to name that instance, per server.
        self.stale: dict[int, set[str]] = {}
        # One question per server at a time: a worker's first reads all ask at once.
        self._asking: dict[int, asyncio.Future[tuple[int, str] | None]] = {}
        # Idle connections as bare descriptors: a client dropped without close() then
        # neither leaks them (the finalizer closes them) nor warns of unclosed sockets.
        self._idle: dict[int, list[int]] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._idle)
        self._loop: asyncio.AbstractEventLoop | None = None

    def know(self, server: int, endpoint: tuple[int, str]) -> None:
        """Take ``server``'s data port and instance as known (from the cluster file)."""
        self._ports[server] = endpoint

    def _drop_port(self, server: int) -> None:
        """The port did not answer as the server: ask it again (a restarted server
        listens elsewhere), and never take that instance's again."""
        endpoint = self._ports.pop(server, None)
        if endpoint is not None:
            self.stale.setdefault(server, set()).add(endpoint[1])

    async def port(self, server: int) -> tuple[int, str] | None:
        """The server's data port and instance (asked once, until a connection fails;
        callers that want it while it is being asked wait for that answer)."""
        if server in self._ports:
            return self._ports[server]
        asking = self._asking.get(server)
        if asking is None or asking.done() or asking.get_loop() is not asyncio.get_running_loop():
            asking = asyncio.ensure_future(self._ask_port(server))
            # Retrieved here too, so a failure whose waiters were all cancelled is no warning.
            asking.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._asking[server] = asking
        try:
            # Shielded: a caller cancelled while waiting does not cancel the others' answer.
            got = await asyncio.shield(asking)
        except IosvcError as exc:  # each caller its own (a shared one gathers tracebacks)
            raise type(exc)(str(exc)) from exc
        finally:
            if asking.done() and self._asking.get(server) is asking:
                del self._asking[server]
        self._ports[server] = got
        return got

    async def acquire(self, server: int) -> socket.socket | None:
        """An open connection to ``server``'s data port; None if it has none."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.reset()  # sockets are used from the loop that opened them
            self._loop = loop
        idle = self._idle.get(server)
        if idle:
            sock = socket.socket(fileno=idle.pop())
            sock.setblocking(False)
            return sock
        endpoint = await self.port(server)
        if endpoint is None:
            return None
        port, instance = endpoint
        host = self.servers[server].rpartition(":")[0].strip("[]")
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await _connect(loop, host, port)
                try:
                    # The port may have passed to another process since it was asked (a
                    # restarted server binds a new one): check it is the same server.
                    await loop.sock_sendall(sock, dataplane.frame({"op": "hello", "to": instance}))
                    reply = await dataplane.recv_header(loop, sock)
                except BaseException:
                    sock.close()
                    raise
        except (OSError, TimeoutError, IosvcError) as exc:
            self._drop_port(server)
            raise dataplane.FrameError(
                f"cannot use the data port {host}:{port} of server {self.servers[server]}: "
                f"{exc or type(exc).__name__}"
            ) from exc
        if "error" in reply or not reply.get("end"):
            sock.close()
            self._drop_port(server)
            raise dataplane.FrameError(
                f"data port {host}:{port} is not server {self.servers[server]} any more: "
                f"{reply.get('msg', reply)}"
            )
        return sock

    def release(self, server: int, sock: socket.socket) -> None:
        """Give back a connection whose last request ended cleanly."""
        idle = self._idle.setdefault(server, [])
        if len(idle) < _KEEP_PER_SERVER:
            idle.append(sock.detach())
        else:
            sock.close()

    def forget(self, server: int) -> None:
        """After a connection to ``server`` broke: close its idle ones (they may be as dead,
        e.g. the server restarted). The port is kept: the next connection checks it (a
        pooled connection the server closed after its idle time is no reason to ask)."""
        _close_all({server: self._idle.pop(server, [])})

    def reset(self) -> None:
        """Close every idle connection (after fork, or on another event loop)."""
        _close_all(self._idle)
        self._idle.clear()
        self._asking.clear()  # (tasks of another loop: not ours to cancel from here)


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A tuned connection to the first address of ``host`` that answers."""
    addresses: list[tuple[int, Any]]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [(family, address) for family, _, _, _, address in infos]
    else:
        # A numeric address (what cluster files hold) needs no lookup: asyncio's runs in a
        # thread pool, which a DataLoader worker's first read would start for it.
        addresses = [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]
    error: OSError = OSError(f"no address for {host}")
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        dataplane.tune_socket(sock)
        return sock
    raise error


def _close_all(idle: dict[int, list[int]]) -> None:
    for fds in idle.values():
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        fds.clear()


class _Lease:
    """One request's use of a pooled connection.

    On exit the connection goes back to the pool if the request set ``clean`` (its stream
    ended where the protocol says), else it is closed, since its byte stream may be
    mid-frame. A socket's own ``OSError`` becomes a :class:`~iosvc.dataplane.FrameError`
    (retried by the client like a cut connection); iosvc errors pass as they are.
    """

    def __init__(self, connections: DataConnections, server: int, sock: socket.socket) -> None:
        self.connections, self.server, self.sock = connections, server, sock
        self.clean = False

    def __enter__(self) -> _Lease:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if self.clean:
            self.connections.release(self.server, self.sock)
        else:
            self.sock.close()
        if isinstance(exc, OSError) and not isinstance(exc, IosvcError | dataplane.FrameError):
            raise dataplane.FrameError(f"data connection failed: {exc}") from exc


async def read_frames(
    connections: DataConnections,
    server: int,
    sock: socket.socket,
    request: dict[str, Any],
    destination: Callable[[dict[str, Any]], memoryview | None],
) -> AsyncGenerator[tuple[dict[str, Any], memoryview, bool], None]:
    """Send a read request on ``sock``; yield ``(reply header, payload, direct)`` per piece.

    ``destination(header)`` names where a piece's payload should land (a slice of the
    caller's buffer, received into straight from the socket: ``direct`` is then True);
    None, or a view of another length, gets a fresh buffer. An error frame raises its
    :class:`~iosvc.errors.IosvcError`. The connection goes back to the pool only when the
    stream ended as the protocol says; anything else (an exception here or in the consumer,
    a cancelled read) closes it, since its byte stream may be mid-frame.
    """
    loop = asyncio.get_running_loop()
    with _Lease(connections, server, sock) as lease:
        await loop.sock_sendall(sock, dataplane.frame({**request, "op": "read"}))
        reader = dataplane.FrameReader(loop, sock)
        while True:
            header = await _reply_header(reader, lease, dataplane.MAX_PAYLOAD)
            size = header["n"]
            if header.get("end"):
                # Nothing may follow the last frame: the next request's replies would be
                # read out of step.
                lease.clean = size == 0 and not reader.buffered
                return
            if "i" not in header:
                raise InvalidArgument("data port reply without a piece index")
            view = destination(header) if size else None
            direct = view is not None and view.nbytes == size
            if not direct:
                view = memoryview(bytearray(size))
            assert view is not None
            await reader.into(view)
            yield header, view, direct


async def call(
    connections: DataConnections, server: int, sock: socket.socket, request: dict[str, Any]
) -> bytearray:
    """Send one of a read's metadata operations (``dataplane.CALLS``) on ``sock``; return
    the server's reply frame (as a gRPC ``Call`` returns it: ``iosvc.wire.unpack`` it). An
    error frame raises its :class:`~iosvc.errors.IosvcError`; the connection goes back to
    the pool as in :func:`read_frames`."""
    loop = asyncio.get_running_loop()
    with _Lease(connections, server, sock) as lease:
        await loop.sock_sendall(sock, dataplane.frame({"op": "call", "call": request}))
        reader = dataplane.FrameReader(loop, sock)
        header = await _reply_header(reader, lease, MAX_MESSAGE_SIZE)
        if not header.get("end"):
            raise InvalidArgument(f"data port answered a call with {header!r}")
        reply = bytearray(header["n"])
        await reader.into(memoryview(reply))
        lease.clean = not reader.buffered
        return reply


async def _reply_header(reader: dataplane.FrameReader, lease: _Lease, limit: int) -> dict[str, Any]:
    """The next reply's header, its payload length ``n`` checked (at most ``limit``); an
    error frame raises its :class:`~iosvc.errors.IosvcError` (the connection pooled again
    if nothing follows it)."""
    header = await reader.header()
    size = header.setdefault("n", 0)
    if not isinstance(size, int) or not 0 <= size <= limit:
        raise DataCorruption(f"data port sent a payload length of {size!r}")
    if "error" in header:
        lease.clean = size == 0 and not reader.buffered
        raise dataplane.error_from_frame(
            header, f"server {lease.connections.servers[lease.server]}"
        )
    return header


async def write_segment(
    connections: DataConnections,
    server: int,
    sock: socket.socket,
    chunks: AsyncIterable[tuple[dict[str, Any], bytes]],
) -> dict[str, Any]:
    """Send a write segment on ``sock``: each ``(header, bytes)`` of ``chunks``, then a
    flush; return the server's reply (``chunks``, ``bytes``, and ``failed`` if a chunk was
    refused). The payloads are sent without a copy. The connection goes back to the pool
    only after a reply, as in :func:`read_frames`."""
    loop = asyncio.get_running_loop()
    with _Lease(connections, server, sock) as lease:
        for_server = connections.servers[server]
        async for header, payload in chunks:
            head = dataplane.frame({**header, "op": "write", "n": len(payload)})
            await dataplane.send_frame(loop, sock, head, payload)
        await loop.sock_sendall(sock, dataplane.frame({"op": "flush"}))
        reply = await dataplane.recv_header(loop, sock)
        lease.clean = reply.get("n", 0) == 0 and ("error" in reply or bool(reply.get("end")))
        if "error" in reply:
            raise dataplane.error_from_frame(reply, f"server {for_server}")
        if not reply.get("end"):
            raise InvalidArgument(f"server {for_server} answered a write with {reply!r}")
        return reply

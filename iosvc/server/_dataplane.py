"""A server's data port: chunk reads and writes over plain TCP (see :mod:`iosvc.dataplane`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from iosvc import dataplane
from iosvc.errors import InternalError, InvalidArgument, IosvcError, QuotaExceeded, Unavailable
from iosvc.server._service import IN_PLACE_RUN, IoService
from iosvc.wire import MAX_MESSAGE_SIZE

__all__ = ["MAX_DATA_CONNECTIONS", "DataPlaneServer"]

log = logging.getLogger("iosvc.server")

#: Open data connections a server keeps at once; more are told so and closed. Well under
#: the usual 1024 open files, so gRPC and the store keep descriptors to work with.
MAX_DATA_CONNECTIONS = 512
#: Seconds a connection that has been used may wait for its next request before the server
#: closes it (a pooled connection: its client opens a new one, one retry later).
IDLE_CLOSE = 600.0


class _PeerGone(Exception):
    """The client's side of the connection failed or stalled: nothing more to tell it."""


class DataPlaneServer:
    """Accepts data connections and serves their reads, write segments and a read's
    metadata operations (``dataplane.CALLS``) through ``service``.

    Parameters
    ----------
    service
        The server whose :meth:`IoService.read_stream` and :meth:`IoService.write_chunk`
        (identity, scheduler, budget, store) answer.
    request_timeout
        Seconds a client may take for any one step: to send its first request, the rest of a
        request it has started, the next chunk of an open write segment, or to take a reply
        (a stalled or hostile client does not hold a connection slot or budget for longer).
    """

    def __init__(self, service: IoService, request_timeout: float = 60.0) -> None:
        self.service = service
        self.request_timeout = request_timeout
        self.port: int | None = None
        self.connections = 0
        #: payload bytes sent and stored (statistics: ``iosvc status``, metrics, tests)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port); return the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as exc:
            listener.close()
            raise OSError(f"could not bind the data port {host}:{port}: {exc}") from exc
        listener.listen(512)
        listener.setblocking(False)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._spawn(self._accept_loop(listener))
        return self.port

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. EMFILE: keep serving the open connections
                log.warning("data port accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            try:
                dataplane.tune_socket(conn)
                if self.connections >= MAX_DATA_CONNECTIONS:
                    self._spawn(self._refuse(conn))
                    continue
                self.connections += 1  # counted here: a burst of accepts cannot pass the cap
                self._spawn(self._serve(conn))
            except Exception:  # never let one connection stop the accept loop
                log.exception("data port: could not take a connection")
                conn.close()

    async def _refuse(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, TimeoutError), conn:
            error = Unavailable(f"server has {MAX_DATA_CONNECTIONS} data connections open")
            await asyncio.wait_for(
                dataplane.send_frame(loop, conn, dataplane.error_frame(error)), 5
            )

    async def _send(
        self, conn: socket.socket, head: bytes, payload: bytes | bytearray | memoryview = b""
    ) -> None:
        try:
            async with asyncio.timeout(self.request_timeout):
                await dataplane.send_frame(asyncio.get_running_loop(), conn, head, payload)
        except (OSError, TimeoutError) as exc:
            raise _PeerGone from exc

    async def _recv_exact(self, reader: dataplane.FrameReader, view: memoryview) -> None:
        try:
            async with asyncio.timeout(self.request_timeout):
                await reader.into(view)
        except (OSError, TimeoutError) as exc:
            raise _PeerGone from exc

    async def _serve(self, conn: socket.socket) -> None:
        segment = _Segment()
        # Every byte from the client goes through it: a request's header usually arrives
        # whole in one recv (three, with a timer each, before), and bytes of a write's
        # payload that came with its header are handed on from the buffer.
        reader = dataplane.FrameReader(asyncio.get_running_loop(), conn)
        idle = self.request_timeout  # until the first request; then IDLE_CLOSE
        try:
            while True:
                # Inside a write segment the client must keep sending, as on a gRPC stream.
                try:
                    header = await self._next_request(reader, idle)
                    if header is None:
                        return
                    idle = self.request_timeout if segment.open else IDLE_CLOSE
                    op = header.get("op")
                    if op == "write":
                        await self._receive_chunk(reader, header, segment)
                        idle = self.request_timeout
                    elif op == "flush":
                        await self._send(conn, segment.reply())
                        segment = _Segment()
                        idle = IDLE_CLOSE
                    elif op == "hello":
                        await self._hello(conn, header)
                    elif op == "call":
                        await self._call(conn, header)
                    else:
                        await self._answer(conn, header)
                except InvalidArgument as exc:
                    # Malformed framing: the stream cannot be trusted to resync; say why, close.
                    await self._send(conn, dataplane.error_frame(exc))
                    return
        except _PeerGone:
            return  # the client went away or stalled; an unflushed segment's file is never
            # committed (its chunks are reclaimed by the garbage collector)
        finally:
            self.connections -= 1
            conn.close()

    async def _next_request(
        self, reader: dataplane.FrameReader, idle: float
    ) -> dict[str, Any] | None:
        """The next request header; None when the client closed the connection or idled."""
        try:
            async with asyncio.timeout(idle):
                if not await reader.ready():
                    return None
        except (OSError, TimeoutError):
            return None
        if reader.has_header:  # the usual case: no timer needed
            return await reader.header()
        try:
            async with asyncio.timeout(self.request_timeout):
                return await reader.header()
        except (OSError, TimeoutError) as exc:
            raise _PeerGone from exc

    async def _hello(self, conn: socket.socket, header: dict[str, Any]) -> None:
        """A client checks it reached the server it asked for the port (not a process that
        took the port number over after a restart)."""
        if header.get("to") != self.service.instance:
            error = Unavailable("not the server instance the client asked for (restarted?)")
            await self._send(conn, dataplane.error_frame(error))
            raise _PeerGone  # close: the client asks for the port again
        await self._send(conn, dataplane.frame({"end": True, "n": 0}))

    async def _call(self, conn: socket.socket, header: dict[str, Any]) -> None:
        """A read's metadata operation (``dataplane.CALLS``), answered as over gRPC: its
        reply frame (``wire.pack``) is the payload of one ``end`` frame."""
        try:
            call = header.get("call")
            if not isinstance(call, dict):
                raise InvalidArgument("a data-port call needs a 'call' map")
            if call.get("op") not in dataplane.CALLS:
                raise InvalidArgument(
                    f"operation {call.get('op')!r} is not served on the data port "
                    f"(only {sorted(dataplane.CALLS)}; the others over gRPC)"
                )
            reply = await self.service.call(call, memoryview(b""))
            if len(reply) > MAX_MESSAGE_SIZE:  # what gRPC refuses to send (RESOURCE_EXHAUSTED)
                raise QuotaExceeded(
                    f"reply of {len(reply)} bytes is over the {MAX_MESSAGE_SIZE}-byte message "
                    "limit: ask for fewer files at once"
                )
        except Exception as exc:  # the store's OSErrors too: the client is told, not cut off
            await self._send(conn, dataplane.error_frame(_reported(exc)))
            return
        await self._send(conn, dataplane.frame({"end": True, "n": len(reply)}), reply)

    async def _answer(self, conn: socket.socket, header: dict[str, Any]) -> None:
        error: IosvcError | None = None
        heads: list[bytes] = []
        try:
            if header.get("op") != "read":
                raise InvalidArgument(f"unknown data-port operation {header.get('op')!r}")
            stream = self.service.read_stream(header)
            # Replies without a payload (chunks to read in place) go out together, one
            # send for a run of them, as the service admits them (IN_PLACE_RUN at a time).
            async with contextlib.aclosing(stream):
                async for reply, payload in stream:
                    reply["n"] = len(payload)
                    heads.append(dataplane.frame(reply))
                    if payload or len(heads) >= IN_PLACE_RUN:
                        await self._send(conn, b"".join(heads), payload)
                        heads.clear()
                        self.bytes_sent += len(payload)
        except _PeerGone:
            raise
        except Exception as exc:  # the store's OSErrors too: the client is told, not cut off
            error = _reported(exc)
        if error is not None:
            await self._send(conn, dataplane.error_frame(error))
        else:
            await self._send(conn, b"".join([*heads, dataplane.frame({"end": True, "n": 0})]))

    async def _receive_chunk(
        self, reader: dataplane.FrameReader, header: dict[str, Any], segment: _Segment
    ) -> None:
        """One chunk of a write segment: stored through the service, or (after a failure in
        the segment, or a refused chunk) its bytes read and dropped to stay in step."""
        size = header.get("n")
        if not isinstance(size, int) or not 0 <= size <= dataplane.MAX_PAYLOAD:
            raise InvalidArgument(f"chunk payload length {size!r} out of range")
        segment.open = True
        received = False

        async def fill(view: memoryview) -> None:
            nonlocal received
            received = True
            await self._recv_exact(reader, view)

        if segment.failure is None:
            try:
                await self.service.write_chunk(header, size, fill)
                self.bytes_received += size
                segment.chunks += 1
                segment.bytes += size
            except _PeerGone:
                raise
            except IosvcError as exc:
                segment.failure = exc
            except Exception as exc:  # e.g. a raw OSError of the store: told in the reply
                log.exception("internal error storing a chunk", exc_info=exc)
                segment.failure = InternalError(f"internal server error: {exc}")
        if not received:
            await self._drain(reader, size)

    async def _drain(self, reader: dataplane.FrameReader, size: int) -> None:
        scratch = memoryview(bytearray(min(size, 1 << 20)))
        while size:
            part = scratch[: min(size, len(scratch))]
            await self._recv_exact(reader, part)
            size -= len(part)

    async def close(self) -> None:
        for task in list(self._tasks):  # the accept loop first: no new connection meanwhile
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()


def _reported(exc: Exception) -> IosvcError:
    """What a client is told of a failed request: an iosvc error as it is, anything else
    logged here and sent as an ``InternalError``."""
    if isinstance(exc, IosvcError):
        return exc
    log.exception("internal error on the data port", exc_info=exc)
    return InternalError(f"internal server error: {type(exc).__name__}: {exc}")


class _Segment:
    """What one write segment (chunks up to a ``flush``) stored, or why it stopped."""

    __slots__ = ("bytes", "chunks", "failure", "open")

    def __init__(self) -> None:
        self.chunks = 0
        self.bytes = 0
        self.failure: IosvcError | None = None
        self.open = False

    def reply(self) -> bytes:
        header: dict[str, Any] = {"end": True, "n": 0, "chunks": self.chunks, "bytes": self.bytes}
        if self.failure is not None:
            header["failed"] = [type(self.failure).__name__, str(self.failure)]
        return dataplane.frame(header)

"""A server's data port: chunk reads and writes over plain TCP (see :mod:`iosvc.dataplane`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from iosvc import dataplane
from iosvc.errors import InternalError, InvalidArgument, IosvcError
from iosvc.server._service import IoService

__all__ = ["MAX_DATA_CONNECTIONS", "DataPlaneServer"]

log = logging.getLogger("iosvc.server")

#: Open data connections a server keeps at once; more are told so and closed.
MAX_DATA_CONNECTIONS = 4096
#: Seconds an open connection may wait between requests before the server closes it
#: (clients reconnect transparently).
IDLE_CLOSE = 600.0


class DataPlaneServer:
    """Accepts data connections and serves their read requests through ``service``.

    Parameters
    ----------
    service
        The server whose :meth:`IoService.read_stream` (identity, scheduler, store) answers.
    request_timeout
        Seconds a client may take to send the rest of a request it has started (a stalled
        or hostile client does not hold a connection slot forever).
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
            dataplane.tune_socket(conn)
            if self.connections >= MAX_DATA_CONNECTIONS:
                self._spawn(self._refuse(conn))
                continue
            self._spawn(self._serve(conn))

    async def _refuse(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError), conn:
            error = dataplane.error_frame(
                IosvcError(f"server has {MAX_DATA_CONNECTIONS} data connections open")
            )
            await asyncio.wait_for(dataplane.send_frame(loop, conn, error), 5)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.connections += 1
        segment = _Segment()
        try:
            while True:
                # Inside a write segment the client must keep sending, as on a gRPC stream.
                idle = self.request_timeout if segment.open else IDLE_CLOSE
                try:
                    header = await self._next_request(loop, conn, idle)
                    if header is None:
                        return
                    op = header.get("op")
                    if op == "write":
                        await self._receive_chunk(loop, conn, header, segment)
                    elif op == "flush":
                        await dataplane.send_frame(loop, conn, segment.reply())
                        segment = _Segment()
                    else:
                        await self._answer(loop, conn, header)
                except InvalidArgument as exc:
                    # Malformed framing: the stream cannot be trusted to resync; say why, close.
                    await dataplane.send_frame(loop, conn, dataplane.error_frame(exc))
                    return
        except (OSError, TimeoutError):
            return  # the client went away or stalled; an unflushed segment is never committed
        finally:
            self.connections -= 1
            conn.close()

    async def _next_request(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, idle: float
    ) -> dict[str, Any] | None:
        """The next request header; None when the client closed the connection or idled."""
        first = bytearray(1)
        try:
            got = await asyncio.wait_for(loop.sock_recv_into(conn, memoryview(first)), idle)
        except TimeoutError:
            return None
        if got == 0:
            return None
        rest = bytearray(3)
        async with asyncio.timeout(self.request_timeout):
            await dataplane.recv_exact(loop, conn, memoryview(rest))
            size = int.from_bytes(first + rest, "little")
            if size > dataplane.MAX_DATA_HEADER:
                raise InvalidArgument(f"header length {size} is over {dataplane.MAX_DATA_HEADER}")
            raw = bytearray(size)
            await dataplane.recv_exact(loop, conn, memoryview(raw))
        return dataplane.decode_header(raw)

    async def _receive_chunk(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: socket.socket,
        header: dict[str, Any],
        segment: _Segment,
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
            async with asyncio.timeout(self.request_timeout):
                await dataplane.recv_exact(loop, conn, view)

        if segment.failure is None:
            try:
                await self.service.write_chunk(header, size, fill)
                self.bytes_received += size
                segment.chunks += 1
                segment.bytes += size
            except IosvcError as exc:
                segment.failure = exc
        if not received:
            await self._drain(loop, conn, size)

    async def _drain(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, size: int) -> None:
        scratch = memoryview(bytearray(min(size, 1 << 20)))
        async with asyncio.timeout(self.request_timeout):
            while size:
                part = scratch[: min(size, len(scratch))]
                await dataplane.recv_exact(loop, conn, part)
                size -= len(part)

    async def _answer(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, header: dict[str, Any]
    ) -> None:
        try:
            if header.get("op") != "read":
                raise InvalidArgument(f"unknown data-port operation {header.get('op')!r}")
            async for reply, payload in self.service.read_stream(header):
                reply["n"] = len(payload)
                await dataplane.send_frame(loop, conn, dataplane.frame(reply), payload)
                self.bytes_sent += len(payload)
        except IosvcError as exc:
            await dataplane.send_frame(loop, conn, dataplane.error_frame(exc))
            return
        except (OSError, TimeoutError):
            raise
        except Exception as exc:
            log.exception("internal error on the data port", exc_info=exc)
            error = InternalError(f"internal server error: {type(exc).__name__}: {exc}")
            await dataplane.send_frame(loop, conn, dataplane.error_frame(error))
            return
        await dataplane.send_frame(loop, conn, dataplane.frame({"end": True, "n": 0}))

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


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

"""A server's data port: chunk reads over plain TCP (see :mod:`iosvc.dataplane`)."""

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
        #: payload bytes sent (a statistic: ``iosvc status``, tests)
        self.bytes_sent = 0
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
        try:
            while True:
                try:
                    header = await self._next_request(loop, conn)
                except InvalidArgument as exc:
                    # Malformed framing: the stream cannot be trusted to resync; say why, close.
                    await dataplane.send_frame(loop, conn, dataplane.error_frame(exc))
                    return
                if header is None:
                    return
                await self._answer(loop, conn, header)
        except (OSError, TimeoutError):
            return  # the client went away (or stalled mid-request); nothing to answer
        finally:
            self.connections -= 1
            conn.close()

    async def _next_request(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket
    ) -> dict[str, Any] | None:
        """The next request header; None when the client closed the connection or idled."""
        first = bytearray(1)
        try:
            got = await asyncio.wait_for(loop.sock_recv_into(conn, memoryview(first)), IDLE_CLOSE)
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

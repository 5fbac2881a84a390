"""Back-pressure: a bound on request bytes the handlers of one server hold at once.

A handler takes its request's bytes from the budget before working on it and gives them back
when done; past the limit it waits. A waiting write handler reads no more frames from its
stream, so gRPC's HTTP/2 flow control stops that client's sender: however many clients write
at once, a server holds at most ``limit`` bytes of admitted requests plus one received frame
per open stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["ByteBudget"]


class ByteBudget:
    """At most ``limit`` bytes held at once (None: unbounded), granted in arrival order.

    A request larger than the whole limit is let through when nothing else is held, so
    nothing waits forever.
    """

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit <= 0:
            raise ValueError("the in-flight limit must be positive")
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for budget."""
        return len(self._waiters)

    def _fits(self, nbytes: int) -> bool:
        return self.limit is None or self.held == 0 or self.held + nbytes <= self.limit

    def _take(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def _grant(self) -> None:
        while self._waiters:
            nbytes, future = self._waiters[0]
            if future.cancelled():
                self._waiters.popleft()
                continue
            if not self._fits(nbytes):
                return
            self._waiters.popleft()
            self._take(nbytes)
            future.set_result(None)

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget for the body of the ``async with``."""
        if not self._waiters and self._fits(nbytes):
            self._take(nbytes)
        else:
            entry = (nbytes, asyncio.get_running_loop().create_future())
            self._waiters.append(entry)
            try:
                await entry[1]
            except asyncio.CancelledError:
                if entry[1].done() and not entry[1].cancelled():
                    self.held -= nbytes  # granted in the same tick: give it back
                self._grant()
                raise
        try:
            yield
        finally:
            self.held -= nbytes
            self._grant()

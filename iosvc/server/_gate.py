"""Admission control: the queue in front of a bounded set of I/O slots.

Every data and metadata request passes :meth:`IoGate.admit` with its identity and byte count.
When all slots are busy, requests wait in a queue whose order is set by the queueing discipline
(FIFO here; the fair-share scheduler plugs in through the same ``enqueue/dequeue`` interface).
An optional emulated device (bandwidth cap + per-op latency) makes contention reproducible on a
laptop: requests hold their slot for as long as the device would take to move their bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, Protocol, TypeVar

from iosvc.identity import JobIdentity

__all__ = ["DeviceModel", "FifoQueue", "IoGate", "RequestQueue"]

T = TypeVar("T")


class RequestQueue(Protocol[T]):
    """What the gate needs of a queueing discipline."""

    def enqueue(self, identity: JobIdentity, nbytes: int, item: T) -> None: ...

    def dequeue(self) -> T | None: ...

    def __len__(self) -> int: ...


class FifoQueue(Generic[T]):
    """Arrival order, no notion of who asks."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()

    def enqueue(self, identity: JobIdentity, nbytes: int, item: T) -> None:
        self._items.append(item)

    def dequeue(self) -> T | None:
        return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        return len(self._items)


class DeviceModel:
    """A single device that moves ``bandwidth`` bytes/s and adds ``latency`` seconds per op.

    Reservations are made in grant order, so the device serves requests in the order the
    scheduler chose.
    """

    def __init__(self, bandwidth: float | None, latency: float = 0.0) -> None:
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError("device bandwidth must be positive")
        self.bandwidth = bandwidth
        self.latency = latency
        self._free_at = 0.0

    def reserve(self, nbytes: int) -> float:
        """Book the device for ``nbytes``; return how long the caller must wait."""
        now = time.monotonic()
        cost = self.latency + (nbytes / self.bandwidth if self.bandwidth else 0.0)
        self._free_at = max(now, self._free_at) + cost
        return self._free_at - now


class IoGate:
    """Bounded I/O slots behind a policy-ordered queue.

    Parameters
    ----------
    slots
        Requests doing I/O at once.
    queue
        Queueing discipline; FIFO by default.
    device
        Optional emulated device.
    """

    def __init__(
        self,
        slots: int = 16,
        queue: RequestQueue[asyncio.Future[None]] | None = None,
        device: DeviceModel | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("need at least one I/O slot")
        self.slots = slots
        self.queue: RequestQueue[asyncio.Future[None]] = queue if queue is not None else FifoQueue()
        self.device = device
        self._free = slots

    @property
    def busy(self) -> int:
        return self.slots - self._free

    @asynccontextmanager
    async def admit(self, identity: JobIdentity, nbytes: int) -> AsyncIterator[None]:
        """Wait for a slot in policy order, hold it for the I/O (and emulated device time)."""
        if self._free > 0 and len(self.queue) == 0:
            self._free -= 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.queue.enqueue(identity, nbytes, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # granted and cancelled in the same tick: give it back
                raise
        try:
            if self.device is not None:
                delay = self.device.reserve(nbytes)
                if delay > 0:
                    await asyncio.sleep(delay)
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self._free += 1
        while self._free > 0:
            waiter = self.queue.dequeue()
            if waiter is None:
                return
            if waiter.cancelled():
                continue  # its caller went away while queued
            self._free -= 1
            waiter.set_result(None)

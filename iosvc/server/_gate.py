"""Admission control: the fair-share queue in front of a bounded set of I/O slots.

Every data and metadata request passes :meth:`IoGate.admit` with its identity and byte count.
Requests queue in a :class:`~iosvc.policies.FairScheduler` that orders them by the sharing
policy an admin set; a request runs when the scheduler picks it and an I/O slot is free.
An optional emulated device (bandwidth cap + per-op latency) makes contention reproducible on
a laptop: a request holds its slot for as long as the device would take to move its bytes.
Keep slots small when the device is emulated (the default is 2 then): requests holding slots
are past the policy, so many slots blur it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from iosvc.identity import JobIdentity
from iosvc.policies import FairScheduler, Policy, load_policy

__all__ = ["DeviceModel", "IoGate", "JobStats"]


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


@dataclass(slots=True)
class JobStats:
    """What one job got from this server (cumulative, never reset)."""

    served_bytes: int = 0
    served_ops: int = 0
    wait_seconds: float = 0.0


class _Waiter:
    __slots__ = ("enqueued", "future", "identity", "nbytes")

    def __init__(self, future: asyncio.Future[None], identity: JobIdentity, nbytes: int) -> None:
        self.future = future
        self.identity = identity
        self.nbytes = nbytes
        self.enqueued = time.monotonic()


class IoGate:
    """Bounded I/O slots behind a policy-ordered queue.

    Parameters
    ----------
    slots
        Requests doing I/O at once (default 16, or 2 with an emulated device).
    policy
        Sharing policy: a preset name, a policy file, TOML text, a dict, or a ``Policy``.
    device
        Optional emulated device.
    on_grant
        Called with (identity, nbytes, wait seconds) for every request let through: the
        server's metrics hook.
    """

    def __init__(
        self,
        slots: int | None = None,
        policy: Policy | Mapping[str, Any] | str = "fifo",
        device: DeviceModel | None = None,
        on_grant: Callable[[JobIdentity, int, float], None] | None = None,
    ) -> None:
        if slots is None:
            slots = 2 if device is not None else 16
        if slots < 1:
            raise ValueError("need at least one I/O slot")
        self.slots = slots
        self.scheduler: FairScheduler[_Waiter] = FairScheduler(load_policy(policy))
        self.device = device
        self.on_grant = on_grant
        self.jobs: dict[JobIdentity, JobStats] = {}
        self._free = slots
        self._timer: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> int:
        return self.slots - self._free

    @property
    def queued(self) -> int:
        return len(self.scheduler)

    def set_policy(self, policy: Policy | Mapping[str, Any] | str) -> Policy:
        """Switch policy live: atomic, every queued request kept (in arrival order)."""
        new = load_policy(policy)
        self.scheduler.set_policy(new)
        self._dispatch()
        return new

    @asynccontextmanager
    async def admit(self, identity: JobIdentity, nbytes: int) -> AsyncIterator[None]:
        """Wait for a slot in policy order, hold it for the I/O (and emulated device time)."""
        waiter = _Waiter(asyncio.get_running_loop().create_future(), identity, nbytes)
        self.scheduler.enqueue(identity, nbytes, waiter)
        self._dispatch()
        if not waiter.future.done():
            try:
                await waiter.future
            except asyncio.CancelledError:
                if waiter.future.done() and not waiter.future.cancelled():
                    self._release()  # granted and cancelled in the same tick: give it back
                else:
                    waiter.future.cancel()  # skipped when the scheduler reaches it
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
        self._dispatch()

    def _dispatch(self) -> None:
        now = time.monotonic()
        while self._free > 0:
            waiter = self.scheduler.dequeue()
            if waiter is None:
                self._arm_timer()
                return
            if waiter.future.done():
                continue  # its caller went away while queued
            self._free -= 1
            waited = now - waiter.enqueued
            stats = self.jobs.get(waiter.identity)
            if stats is None:
                stats = self.jobs[waiter.identity] = JobStats()
            stats.served_bytes += waiter.nbytes
            stats.served_ops += 1
            stats.wait_seconds += waited
            if self.on_grant is not None:
                self.on_grant(waiter.identity, waiter.nbytes, waited)
            waiter.future.set_result(None)

    def _arm_timer(self) -> None:
        # Rate caps (tbf) can leave work queued that becomes eligible later.
        when = self.scheduler.next_eligible_time() if len(self.scheduler) else None
        if when is None or self._timer is not None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timer = None
            self._dispatch()

        self._timer = loop.call_later(max(0.0, when - time.monotonic()), fire)

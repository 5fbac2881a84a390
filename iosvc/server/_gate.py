"""Admission control: the fair-share queue in front of a bounded set of I/O slots.

Every data and metadata request passes :meth:`IoGate.admit` with its identity and byte count.
Requests queue in a :class:`~iosvc.policies.FairScheduler` that orders them by the sharing
policy an admin set; a request runs when the scheduler picks it and an I/O slot is free.
An optional emulated device (bandwidth cap + per-op latency) makes contention reproducible on
a laptop. The gate books the device when it grants a request, in policy order, and grants the
next request once less than ``DeviceModel.lead`` seconds of booked work remain: what is past the
policy is bounded in device time, so small requests (CPU-bound, almost no device time) neither
hold the device idle nor let large ones jump the queue. Large requests reach the device in
``DeviceModel.max_io`` pieces, each scheduled on its own, so a 4 KiB request never waits
behind a whole 4 MiB transfer (measured: ``bench/README.md``, scenario ``reqsize``).
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
    scheduler chose. The gate books the device when it grants a request and stops granting
    while more than ``lead`` seconds of work are booked: what is past the policy is bounded in
    device time, not in requests, so requests that need almost no device time (small ones,
    metadata) never hold the device idle.

    Requests larger than ``max_io`` reach the device in pieces of at most ``max_io`` bytes, as
    the block layer splits I/O at ``max_sectors_kb``; the gate schedules each piece, so a small
    request waits behind at most ``lead`` plus one piece, not behind a whole 4 MiB transfer.
    Without that, a job doing small requests gets at most its queue depth of requests per large
    request of the others, whatever its share.
    """

    def __init__(
        self,
        bandwidth: float | None,
        latency: float = 0.0,
        lead: float = 0.002,
        max_io: int = 128 * 1024,
    ) -> None:
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError("device bandwidth must be positive")
        if lead < 0:
            raise ValueError("device lead must be >= 0")
        if max_io < 4096:
            raise ValueError("device max_io must be >= 4096 bytes")
        self.bandwidth = bandwidth
        self.latency = latency
        self.lead = lead
        self.max_io = max_io
        self._free_at = 0.0

    @property
    def free_at(self) -> float:
        """When the work booked so far ends (monotonic clock)."""
        return self._free_at

    def reserve(self, nbytes: int, *, ops: int = 1) -> float:
        """Book the device for ``nbytes`` and ``ops`` operations; return how long the caller
        must wait.

        ``ops`` is 0 for the later pieces of a split request (the per-op latency is paid
        once per request), n for n chunks admitted as one request (paid per chunk).
        """
        now = time.monotonic()
        cost = self.latency * ops + (nbytes / self.bandwidth if self.bandwidth else 0.0)
        self._free_at = max(now, self._free_at) + cost
        return self._free_at - now


@dataclass(slots=True)
class JobStats:
    """What one job got from this server (cumulative, never reset)."""

    served_bytes: int = 0
    served_ops: int = 0
    wait_seconds: float = 0.0


class _Waiter:
    """One request at the gate; the scheduler holds it once per device piece."""

    __slots__ = ("enqueued", "future", "identity", "nbytes", "ops", "unbooked", "until")

    def __init__(
        self, future: asyncio.Future[None], identity: JobIdentity, nbytes: int, ops: int
    ) -> None:
        self.future = future
        self.identity = identity
        self.nbytes = nbytes
        self.ops = ops  # operations it stands for (chunks admitted together)
        self.unbooked = nbytes  # bytes whose device time is not booked yet
        self.enqueued = time.monotonic()
        self.until = 0.0  # end of its device booking (monotonic), set when granted


class IoGate:
    """Bounded I/O slots behind a policy-ordered queue.

    Parameters
    ----------
    slots
        Requests doing I/O at once (default 16). With an emulated device, its booking lead
        (``DeviceModel.lead``), not the slots, bounds the work past the policy.
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
        on_grant: Callable[[JobIdentity, int, float, int], None] | None = None,
    ) -> None:
        if slots is None:
            slots = 16
        if slots < 1:
            raise ValueError("need at least one I/O slot")
        self.slots = slots
        self.scheduler: FairScheduler[_Waiter] = FairScheduler(load_policy(policy))
        self.device = device
        self.on_grant = on_grant
        self.jobs: dict[JobIdentity, JobStats] = {}
        self._free = slots
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

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
    async def admit(self, identity: JobIdentity, nbytes: int, ops: int = 1) -> AsyncIterator[None]:
        """Wait for a slot in policy order, hold it for the I/O (and emulated device time).

        ``ops`` > 1 admits that many operations as one request (chunks read in place): each
        is charged ``op_cost`` and the device's latency, and counted, as if admitted alone.
        """
        waiter = _Waiter(asyncio.get_running_loop().create_future(), identity, nbytes, ops)
        piece = self.device.max_io if self.device is not None else nbytes
        if nbytes <= piece:
            self.scheduler.enqueue(identity, nbytes, waiter, ops=ops)
        else:
            # Queued back to back in the job's FIFO, so pieces are booked in order; op_cost is
            # charged on the first one only.
            for offset in range(0, nbytes, piece):
                size = min(piece, nbytes - offset)
                self.scheduler.enqueue(identity, size, waiter, ops=ops if offset == 0 else 0)
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
                # booked in _dispatch, in policy order; wait for the device to get to it
                delay = waiter.until - time.monotonic()
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
        device = self.device
        while self._free > 0:
            if device is not None and device.free_at - now > device.lead and len(self.scheduler):
                # Enough work booked: decide the next request when the device gets near it.
                self._arm_timer(device.free_at - device.lead)
                return
            waiter = self.scheduler.dequeue()
            if waiter is None:
                self._arm_timer()
                return
            if waiter.future.done():
                continue  # its caller went away while queued
            if device is not None:
                piece = min(waiter.unbooked, device.max_io)
                first = waiter.unbooked == waiter.nbytes
                waiter.unbooked -= piece
                waiter.until = now + device.reserve(piece, ops=waiter.ops if first else 0)
                if waiter.unbooked > 0:
                    continue  # more pieces of it are queued: the last one grants the request
            self._free -= 1
            waited = now - waiter.enqueued
            stats = self.jobs.get(waiter.identity)
            if stats is None:
                stats = self.jobs[waiter.identity] = JobStats()
            stats.served_bytes += waiter.nbytes
            stats.served_ops += waiter.ops
            stats.wait_seconds += waited
            if self.on_grant is not None:
                self.on_grant(waiter.identity, waiter.nbytes, waited, waiter.ops)
            waiter.future.set_result(None)

    def _arm_timer(self, when: float | None = None) -> None:
        # Rate caps (tbf) can leave work queued that becomes eligible later; a booked device
        # is given its next request shortly before it runs out of work.
        if when is None:
            when = self.scheduler.next_eligible_time() if len(self.scheduler) else None
        if when is None:
            return
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timer = None
            self._dispatch()

        self._timer_at = when
        self._timer = loop.call_later(max(0.0, when - time.monotonic()), fire)

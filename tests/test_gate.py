"""IoGate in front of an emulated device: work conservation with mixed request sizes.

Real asyncio and real time (no server): the gate alone decides when the device works.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from iosvc.identity import JobIdentity
from iosvc.server._gate import DeviceModel, IoGate

KiB, MiB = 1 << 10, 1 << 20
BANDWIDTH = 20e6  # slow enough that event-loop lag on a loaded machine is small beside it


async def _drive(gate: IoGate, seconds: float) -> tuple[Counter[str], Counter[str], float]:
    """A big-request job and a small-request job, 4 streams each, both always backlogged.

    Each request also spends 1 ms after its device time (sending the reply, say): with the
    device booked only when a slot holder resumed, small requests held the slots while the
    device idled.
    """
    loop = asyncio.get_running_loop()
    served: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    start = loop.time()
    stop = start + seconds

    async def stream(who: JobIdentity, size: int) -> None:
        while loop.time() < stop:
            async with gate.admit(who, size):
                await asyncio.sleep(0.001)
            served[who.job_id] += size
            ops[who.job_id] += 1

    big = JobIdentity(job_id="big", user="a", group="g", nodes=1)
    small = JobIdentity(job_id="small", user="b", group="g", nodes=1)
    await asyncio.gather(
        *[stream(big, MiB) for _ in range(4)], *[stream(small, 4 * KiB) for _ in range(4)]
    )
    return served, ops, loop.time() - start


async def test_device_never_idles_while_small_requests_hold_slots() -> None:
    gate = IoGate(policy="job-fair", device=DeviceModel(BANDWIDTH))
    served, ops, elapsed = await _drive(gate, 1.5)
    busy = sum(served.values()) / BANDWIDTH / elapsed
    assert busy >= 0.85, (busy, served)
    # job-fair charges bytes + op_cost: equal cost, so the small job gets many more requests.
    op_cost = gate.scheduler.policy.op_cost
    cost = {job: served[job] + ops[job] * op_cost for job in served}
    assert cost["small"] / (cost["small"] + cost["big"]) == pytest.approx(0.5, abs=0.08)


async def test_booking_lead_bounds_work_past_the_policy() -> None:
    """At any moment at most ``lead`` seconds plus one piece of device time are booked."""
    device = DeviceModel(BANDWIDTH, lead=0.002)
    gate = IoGate(policy="job-fair", device=device)
    loop = asyncio.get_running_loop()
    worst = 0.0
    sampling = True

    async def sample() -> None:
        nonlocal worst
        while sampling:
            worst = max(worst, device.free_at - loop.time())
            await asyncio.sleep(0.0005)

    sampler = asyncio.create_task(sample())
    await _drive(gate, 0.5)
    sampling = False
    await sampler
    assert 0 < worst <= device.lead + device.max_io / BANDWIDTH + 0.001


def test_device_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        DeviceModel(0)
    with pytest.raises(ValueError, match="lead"):
        DeviceModel(1e6, lead=-1)
    with pytest.raises(ValueError, match="max_io"):
        DeviceModel(1e6, max_io=512)


async def test_split_request_is_charged_one_operation() -> None:
    """A 4 MiB request split into device pieces costs what it would whole."""
    gate = IoGate(policy="job-fair", device=DeviceModel(1e9, max_io=256 * KiB))
    who = JobIdentity(job_id="j", user="u", group="g", nodes=1)
    async with gate.admit(who, 4 * MiB):
        pass
    async with gate.admit(who, 4 * KiB):
        pass
    stats = gate.jobs[who]
    assert (stats.served_bytes, stats.served_ops) == (4 * MiB + 4 * KiB, 2)
    snapshot = gate.scheduler.snapshot()
    assert (snapshot.served_ops, snapshot.served_bytes) == (2, 4 * MiB + 4 * KiB)


async def test_operations_admitted_together_cost_what_they_would_one_by_one() -> None:
    """n chunks admitted as one request (reads in place) are charged n operations and the
    device's latency n times, like n requests; what they move is booked in device pieces."""
    latency = 0.002
    device = DeviceModel(None, latency=latency, max_io=64 * KiB)
    gate = IoGate(policy={"policy": "job-fair", "op_cost": MiB}, device=device)
    together = JobIdentity(job_id="a", user="u", group="g", nodes=1)
    alone = JobIdentity(job_id="b", user="u", group="g", nodes=1)
    t0 = time.monotonic()
    async with gate.admit(together, 8 * 100 * KiB, ops=8):
        pass
    waited = time.monotonic() - t0
    for _ in range(8):
        async with gate.admit(alone, 100 * KiB):
            pass
    a, b = gate.jobs[together], gate.jobs[alone]
    assert (a.served_bytes, a.served_ops) == (b.served_bytes, b.served_ops) == (800 * KiB, 8)
    assert waited >= 8 * latency  # the device's latency once per operation
    # Charged alike: with both jobs backlogged, the fair queue alternates their requests.
    order: list[str] = []
    sched = gate.scheduler
    sched.enqueue(together, 800 * KiB, "a1", ops=8)
    sched.enqueue(together, 800 * KiB, "a2", ops=8)
    for k in range(16):
        sched.enqueue(alone, 100 * KiB, f"b{k}")
    while (item := sched.dequeue()) is not None:
        order.append(item)
    # a request of 8 chunks costs 8 of b's: a2 only after b7 (charged one op: after b1)
    assert order.index("a2") > order.index("b6")
    with pytest.raises(ValueError, match="ops"):
        sched.enqueue(alone, 1, "bad", ops=-1)

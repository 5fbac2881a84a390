"""Simulation helpers shared by the policy tests: a fake clock, backlogged streams, targets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from iosvc.identity import JobIdentity
from iosvc.policies import FairScheduler, Policy, expected_shares


class FakeClock:
    """Monotonic clock the tests move by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.now += seconds


def ident(job: str, user: str = "u", group: str = "g", nodes: int = 1) -> JobIdentity:
    return JobIdentity(job_id=job, user=user, group=group, nodes=nodes)


@dataclass(frozen=True)
class Stream:
    """One process of a job: keeps ``depth`` requests of ``sizes`` (cycled) queued."""

    identity: JobIdentity
    sizes: Sequence[int]
    depth: int = 1


def run_backlogged(
    sched: FairScheduler[tuple[int, int]],
    streams: Sequence[Stream],
    decisions: int,
    *,
    warmup: int = 0,
) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Keep every stream backlogged; return served (bytes, cost, ops) per job id.

    Each decision dequeues one request and immediately queues the next one of the same stream, so
    every job stays active the whole time. ``warmup`` decisions are run first and not counted.
    """
    op_cost = sched.policy.op_cost
    counters = [0] * len(streams)
    for s, stream in enumerate(streams):
        for _ in range(stream.depth):
            size = stream.sizes[counters[s] % len(stream.sizes)]
            counters[s] += 1
            sched.enqueue(stream.identity, size, (s, size))
    served_bytes: Counter[str] = Counter()
    served_cost: Counter[str] = Counter()
    served_ops: Counter[str] = Counter()
    for step in range(warmup + decisions):
        got = sched.dequeue()
        assert got is not None, "work-conserving scheduler returned None with work queued"
        s, size = got
        job = streams[s].identity.job_id
        if step >= warmup:
            served_bytes[job] += size
            served_cost[job] += size + op_cost
            served_ops[job] += 1
        stream = streams[s]
        nxt = stream.sizes[counters[s] % len(stream.sizes)]
        counters[s] += 1
        sched.enqueue(stream.identity, nxt, (s, nxt))
    return served_bytes, served_cost, served_ops


def shares(served: Counter[str]) -> dict[str, float]:
    total = sum(served.values())
    return {k: v / total for k, v in served.items()}


def target_shares(policy: Policy, identities: Iterable[JobIdentity]) -> dict[str, float]:
    """Hierarchical target shares by job id (see :func:`iosvc.policies.expected_shares`)."""
    shares = expected_shares(policy, identities)
    assert shares is not None
    return {identity.job_id: share for identity, share in shares.items()}

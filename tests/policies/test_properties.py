"""Hypothesis properties of FairScheduler over random share trees and workloads.

The bounds come from SFQ's fairness theorem (Goyal, Vin and Cheng, SIGCOMM'96, Theorem 1): for two
children f, m of a node, both backlogged over an interval, |W_f/w_f - W_m/w_m| <= L/w_f + L/w_m,
where W is the cost served and L the largest cost of one request. H-SFQ applies it at every node.
Summing over the k siblings of a child with target share s gives
|W_child - s * W_node| <= L (1 + k s) <= L (k + 1), so along a path of depth d a job is off its
target by at most d (n + 1) L in total, n being the number of jobs. Runs are long enough that this
bound is a few percent of all service, so the properties fail for a scheduler that counts requests
or starves a child.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Any

import hypothesis.strategies as st
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from iosvc.identity import JobIdentity
from iosvc.policies import FairScheduler, Policy, TokenBucketPolicy, load_policy

from ._sim import FakeClock, target_shares

KiB, MiB = 1 << 10, 1 << 20

FAIR = [
    "job-fair",
    "user-fair",
    "size-fair",
    "user-then-size-fair",
    "user-then-job-fair",
    "group-user-size-fair",
]
TABLE_OF_LEVEL = {"group": "groups", "user": "users", "job": "jobs"}
USERS, GROUPS = ["ann", "bob", "cy"], ["g1", "g2"]

SETTINGS = settings(max_examples=40, deadline=None, database=None, print_blob=True)


@st.composite
def share_trees(
    draw: st.DrawFn, max_jobs: int = 5
) -> tuple[Policy, list[JobIdentity], dict[str, int]]:
    """A random preset with random explicit weights, jobs, and a request size per job."""
    name = draw(st.sampled_from(FAIR))
    op_cost = draw(st.sampled_from([0, 64 * KiB]))
    n = draw(st.integers(1, max_jobs))
    jobs = [
        JobIdentity(
            job_id=f"j{i}",
            user=draw(st.sampled_from(USERS)),
            group=draw(st.sampled_from(GROUPS)),
            nodes=draw(st.integers(1, 8)),
        )
        for i in range(n)
    ]
    spec: dict[str, Any] = {"policy": name, "op_cost": op_cost}
    levels = load_policy(name).levels
    names = {"group": GROUPS, "user": USERS, "job": [j.job_id for j in jobs]}
    for level in levels:
        weights = draw(
            st.dictionaries(st.sampled_from(names[level]), st.integers(1, 4), max_size=3)
        )
        if weights:
            spec[TABLE_OF_LEVEL[level]] = weights
    sizes = {j.job_id: draw(st.sampled_from([64 * KiB, 256 * KiB, MiB])) for j in jobs}
    return load_policy(spec), jobs, sizes


def backlogged_run(
    policy: Policy, jobs: list[JobIdentity], sizes: dict[str, int], min_total: float
) -> tuple[Counter[str], dict[str, float]]:
    """Keep every job backlogged until ``min_total`` cost is served.

    Returns cost served per job, and per job the largest cost served to others between two of
    its services (or before its first).
    """
    sched: FairScheduler[int] = FairScheduler(policy, clock=FakeClock())
    for i, job in enumerate(jobs):
        sched.enqueue(job, sizes[job.job_id], i)
    costs = [sizes[j.job_id] + policy.op_cost for j in jobs]
    served: Counter[str] = Counter()
    since = [0.0] * len(jobs)
    worst_gap = dict.fromkeys((j.job_id for j in jobs), 0.0)
    total = 0.0
    for _ in range(200_000):
        if total >= min_total:
            break
        got = sched.dequeue()
        assert got is not None
        cost = costs[got]
        served[jobs[got].job_id] += cost
        total += cost
        for k in range(len(jobs)):
            if k != got:
                since[k] += cost
        worst_gap[jobs[got].job_id] = max(worst_gap[jobs[got].job_id], since[got])
        since[got] = 0.0
        sched.enqueue(jobs[got], sizes[jobs[got].job_id], got)
    else:
        raise AssertionError("run did not reach its length")
    for k, job in enumerate(jobs):
        worst_gap[job.job_id] = max(worst_gap[job.job_id], since[k])
    return served, worst_gap


@SETTINGS
@given(share_trees())
def test_shares_converge_to_targets(tree: tuple[Policy, list[JobIdentity], dict[str, int]]) -> None:
    policy, jobs, sizes = tree
    largest = max(sizes.values()) + policy.op_cost
    bound = len(policy.levels) * (len(jobs) + 1) * largest
    served, _ = backlogged_run(policy, jobs, sizes, min_total=25 * bound)  # bound <= 4% of total
    total = sum(served.values())
    for job, share in target_shares(policy, jobs).items():
        assert abs(served[job] - share * total) <= bound, (job, served[job] / total, share)


@SETTINGS
@given(share_trees())
def test_no_backlogged_job_starves(tree: tuple[Policy, list[JobIdentity], dict[str, int]]) -> None:
    """Between two services of a backlogged job, others get a bounded amount of service.

    From the same per-node bound: while job f waits, its ancestors' siblings and its own
    siblings can each run ahead by at most ~L (1 + w_m / w_f); summed over the tree that is below
    d (n + 1) L / g_f, with g_f the job's global target share. In decisions that is at most
    that bound divided by the smallest request cost.
    """
    policy, jobs, sizes = tree
    largest = max(sizes.values()) + policy.op_cost
    smallest = min(sizes.values()) + policy.op_cost
    targets = target_shares(policy, jobs)
    depth = len(policy.levels)
    bounds = {j: depth * (len(jobs) + 1) * largest / g for j, g in targets.items()}
    # Run long enough that a starved job would overshoot its bound three times over.
    _, worst_gap = backlogged_run(policy, jobs, sizes, min_total=3 * max(bounds.values()))
    for job, gap in worst_gap.items():
        assert gap <= bounds[job], (job, gap / largest, bounds[job] / largest)
        assert math.ceil(gap / smallest) <= math.ceil(bounds[job] / smallest)


JOBS = [
    JobIdentity("1", "ann", "g1", 1),
    JobIdentity("2", "ann", "g1", 4),
    JobIdentity("3", "bob", "g1", 2),
    JobIdentity("4", "cy", "g2", 1),
    JobIdentity("5", "cy", "g2", 8),
    JobIdentity("6", "dee", "g3", 3),
]
POLICIES = [
    *FAIR,
    "fifo",
    'policy = "group-user-size-fair"\nop_cost = 0\n[groups]\ng2 = 3\n[users]\nann = 2',
    'policy = "tbf"\nop_cost = 0\n[tbf]\ndefault_rate = "10MB/s"\n[tbf.rates]\n"1" = "1MB/s"',
    'policy = "tbf"\n[tbf]\nkey = "user"\nburst = "1MiB"\ndefault_rate = "100MB/s"',
]


class SchedulerMachine(RuleBasedStateMachine):
    """Random enqueues, dequeues, clock moves and live policy changes against a simple model.

    Checks: nothing lost or duplicated, FIFO within a job, exact queue accounting, work
    conservation (a fair policy never returns None with work queued; tbf only while the next
    bucket is in the future, and never when the clock reaches next_eligible_time()), and tbf caps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.model: dict[str, deque[tuple[int, int]]] = {j.job_id: deque() for j in JOBS}
        self.next_item = 0
        self.sched: FairScheduler[tuple[str, int]]

    @initialize(policy=st.sampled_from(POLICIES), idle_timeout=st.sampled_from([0.0, 0.01, 10.0]))
    def start(self, policy: str, idle_timeout: float) -> None:
        self.sched = FairScheduler(policy, clock=self.clock, idle_timeout=idle_timeout)
        self._policy_started()

    def _policy_started(self) -> None:
        # Token buckets start full when a tbf policy is installed.
        self.tbf_since = self.clock()
        self.tbf_served: Counter[str] = Counter()
        self.by_job = {j.job_id: j for j in JOBS}

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.model.values())

    @rule(job=st.sampled_from(JOBS), nbytes=st.integers(0, 2 * MiB), count=st.integers(1, 4))
    def enqueue(self, job: JobIdentity, nbytes: int, count: int) -> None:
        for _ in range(count):
            item = (job.job_id, self.next_item)
            self.next_item += 1
            self.sched.enqueue(job, nbytes, item)
            self.model[job.job_id].append((self.next_item - 1, nbytes))

    def _check(self, got: tuple[str, int]) -> None:
        job, seq = got
        assert self.model[job], f"{got} was not queued (duplicate?)"
        expected_seq, nbytes = self.model[job].popleft()
        assert seq == expected_seq, "FIFO order within a job broken"
        policy = self.sched.policy
        if isinstance(policy, TokenBucketPolicy):
            # GCRA from a full bucket: before the k-th request is let through, the first k-1
            # cost at most rate * elapsed + burst, so in all at most that plus one request.
            key = job if policy.key == "job" else self.by_job[job].user
            self.tbf_served[key] += nbytes + policy.op_cost
            elapsed = self.clock() - self.tbf_since
            cap = policy.rate_for(key) * elapsed + policy.burst + 2 * MiB + policy.op_cost
            assert self.tbf_served[key] <= cap * (1 + 1e-9), (key, self.tbf_served[key], cap)

    @rule(count=st.integers(1, 6))
    def dequeue(self, count: int) -> None:
        for _ in range(count):
            got = self.sched.dequeue()
            if got is None:
                if self.queued:
                    assert self.sched.policy.name == "tbf", "work-conserving policy idled"
                    when = self.sched.next_eligible_time()
                    assert when is not None and when > self.clock()
                return
            self._check(got)

    @precondition(lambda self: self.queued > 0)
    @rule()
    def wait_for_tokens(self) -> None:
        """Move the clock to next_eligible_time(): then something must come out."""
        when = self.sched.next_eligible_time()
        assert when is not None
        self.clock.now = max(self.clock.now, when)
        got = self.sched.dequeue()
        assert got is not None
        self._check(got)

    @rule(seconds=st.floats(0, 0.05))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(policy=st.sampled_from(POLICIES))
    def set_policy(self, policy: str) -> None:
        self.sched.set_policy(policy)
        self._policy_started()

    @rule()
    def snapshot_agrees(self) -> None:
        snap = self.sched.snapshot()
        assert snap.queued_items == self.queued
        assert snap.queued_bytes == sum(n for q in self.model.values() for _, n in q)
        for _, node in snap.walk():
            if node.level == "job":
                assert node.queued_items == len(self.model[node.key])
            active = [c.share for c in node.children if c.active and c.share is not None]
            assert not active or math.isclose(sum(active), 1.0)

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "sched"):
            return
        assert len(self.sched) == self.queued
        assert self.sched.queued_bytes == sum(n for q in self.model.values() for _, n in q)

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        # Drain: everything still queued comes out, once each, in per-job order.
        while self.queued:
            self.wait_for_tokens()
        assert self.sched.dequeue() is None
        assert len(self.sched) == 0 and self.sched.queued_bytes == 0


SchedulerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, database=None
)
test_scheduler_machine = SchedulerMachine.TestCase

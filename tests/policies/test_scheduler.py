"""FairScheduler: achieved shares, work conservation, idle handling, live policy changes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import iosvc.policies._scheduler as scheduler_module
from iosvc.identity import JobIdentity
from iosvc.policies import FairScheduler, load_policy

from ._sim import FakeClock, Stream, ident, run_backlogged, shares, target_shares

KiB, MiB = 1 << 10, 1 << 20


def take(sched: FairScheduler[int], count: int) -> list[int]:
    """Dequeue ``count`` items, all of which must be there."""
    out = []
    for _ in range(count):
        got = sched.dequeue()
        assert got is not None
        out.append(got)
    return out


def no_op_cost(name: str) -> str:
    """A preset with op_cost = 0, so byte shares and cost shares coincide."""
    return f'policy = "{name}"\nop_cost = 0'


def assert_close(achieved: dict[str, float], target: dict[str, float], rel: float = 0.01) -> None:
    assert achieved.keys() == target.keys()
    for job, want in target.items():
        assert achieved[job] == pytest.approx(want, rel=rel), (job, achieved, target)


# -- presets over a long backlog -------------------------------------------------------------------


def test_size_fair_shares_follow_node_counts() -> None:
    jobs = [ident("a", nodes=1), ident("b", nodes=2), ident("c", nodes=4)]
    sched: FairScheduler[tuple[int, int]] = FairScheduler(no_op_cost("size-fair"))
    served, _, _ = run_backlogged(sched, [Stream(j, [MiB], depth=2) for j in jobs], 14_000)
    assert_close(shares(served), {"a": 1 / 7, "b": 2 / 7, "c": 4 / 7})


def test_job_fair_ignores_request_size() -> None:
    """4 KiB requests vs 4 MiB requests: equal bytes (op_cost 0)."""
    small, big = ident("small"), ident("big")
    sched: FairScheduler[tuple[int, int]] = FairScheduler(no_op_cost("job-fair"))
    streams = [Stream(small, [4 * KiB], depth=4), Stream(big, [4 * MiB], depth=4)]
    served, _, ops = run_backlogged(sched, streams, 120_000)
    assert_close(shares(served), {"small": 0.5, "big": 0.5})
    assert ops["small"] > 900 * ops["big"]  # the small job gets its bytes as many more requests


def test_op_cost_charges_each_operation() -> None:
    """With the default op_cost, shares are equal in bytes + op_cost, not in bytes."""
    small, big = ident("small"), ident("big")
    sched: FairScheduler[tuple[int, int]] = FairScheduler("job-fair")
    streams = [Stream(small, [4 * KiB]), Stream(big, [4 * MiB])]
    served, cost, _ = run_backlogged(sched, streams, 20_000)
    assert_close(shares(cost), {"small": 0.5, "big": 0.5})
    op = sched.policy.op_cost
    # Bytes then split as 4Ki/(4Ki+op) : 4Mi/(4Mi+op) per unit of cost.
    ratio = (4 * KiB / (4 * KiB + op)) / (4 * MiB / (4 * MiB + op))
    assert served["small"] / served["big"] == pytest.approx(ratio, rel=0.01)


def test_share_does_not_depend_on_number_of_streams() -> None:
    """8 processes with deep queues vs 1 process with one request outstanding."""
    wide, narrow = ident("wide"), ident("narrow")
    sched: FairScheduler[tuple[int, int]] = FairScheduler(no_op_cost("job-fair"))
    streams = [Stream(wide, [MiB, 64 * KiB], depth=4) for _ in range(8)]
    streams.append(Stream(narrow, [MiB], depth=1))
    served, _, _ = run_backlogged(sched, streams, 20_000)
    assert_close(shares(served), {"wide": 0.5, "narrow": 0.5})


def test_user_fair_splits_a_user_share_among_jobs() -> None:
    jobs = [ident("a1", "alice"), ident("a2", "alice"), ident("a3", "alice"), ident("b1", "bob")]
    for name in ("user-fair", "user-then-job-fair"):
        sched: FairScheduler[tuple[int, int]] = FairScheduler(no_op_cost(name))
        served, _, _ = run_backlogged(sched, [Stream(j, [256 * KiB]) for j in jobs], 30_000)
        assert_close(shares(served), {"a1": 1 / 6, "a2": 1 / 6, "a3": 1 / 6, "b1": 1 / 2})


def test_user_then_size_fair_hand_computed() -> None:
    # alice: jobs of 1 and 3 nodes share her half 1:3; bob's single 8-node job has the other half.
    jobs = [
        ident("a1", "alice", nodes=1),
        ident("a3", "alice", nodes=3),
        ident("b8", "bob", nodes=8),
    ]
    sched: FairScheduler[tuple[int, int]] = FairScheduler(no_op_cost("user-then-size-fair"))
    served, _, _ = run_backlogged(sched, [Stream(j, [256 * KiB, MiB]) for j in jobs], 40_000)
    assert_close(shares(served), {"a1": 0.125, "a3": 0.375, "b8": 0.5})


def test_group_user_size_fair_hand_computed() -> None:
    # climate (weight 3 in the file) vs bio (1): 3/4 and 1/4 of the device.
    # climate: alice (weight 2) and carl (1) split 2:1 -> 1/2 and 1/4; alice's jobs by nodes 1:3.
    # bio: one user, jobs "42" (weight 5 from [jobs], overriding nodes 1) and "43" (nodes 3): 5:3.
    policy = load_policy(
        'policy = "group-user-size-fair"\nop_cost = 0\n'
        '[groups]\nclimate = 3\n[users]\nalice = 2\n[jobs]\n"42" = 5\n'
    )
    jobs = [
        ident("a1", "alice", "climate", 1),
        ident("a3", "alice", "climate", 3),
        ident("c1", "carl", "climate", 2),
        ident("42", "bea", "bio", 1),
        ident("43", "bea", "bio", 3),
    ]
    expected = {
        "a1": 0.5 * 1 / 4,
        "a3": 0.5 * 3 / 4,
        "c1": 0.25,
        "42": 0.25 * 5 / 8,
        "43": 0.25 * 3 / 8,
    }
    assert target_shares(policy, jobs) == pytest.approx(expected)
    sched: FairScheduler[tuple[int, int]] = FairScheduler(policy)
    served, _, _ = run_backlogged(sched, [Stream(j, [128 * KiB, MiB]) for j in jobs], 60_000)
    assert_close(shares(served), expected)


def test_fifo_serves_in_arrival_order() -> None:
    sched: FairScheduler[int] = FairScheduler("fifo")
    people = [ident(str(i % 3), f"u{i % 2}", nodes=1 + i % 4) for i in range(30)]
    for i, who in enumerate(people):
        sched.enqueue(who, (i * 7919) % 5000, i)
    assert [sched.dequeue() for _ in range(30)] == list(range(30))
    assert sched.dequeue() is None


def test_fifo_within_a_job() -> None:
    sched: FairScheduler[tuple[str, int]] = FairScheduler("group-user-size-fair")
    for i in range(50):
        for job in ("1", "2", "3"):
            sched.enqueue(ident(job, f"u{job}", "g", 2), 1000 * (i % 7), (job, i))
    out: dict[str, list[int]] = {"1": [], "2": [], "3": []}
    while (got := sched.dequeue()) is not None:
        out[got[0]].append(got[1])
    assert all(seq == list(range(50)) for seq in out.values())


# -- work conservation and idle handling -----------------------------------------------------------


@pytest.mark.parametrize("name", ["job-fair", "size-fair", "group-user-size-fair"])
def test_lone_job_gets_everything(name: str) -> None:
    sched: FairScheduler[int] = FairScheduler(name)
    big = ident("solo", nodes=1)
    other = ident("other", "v", "h", nodes=64)
    sched.enqueue(other, 1, -1)
    assert sched.dequeue() == -1  # other is now idle: it must not hold back the lone job
    for i in range(100):
        sched.enqueue(big, MiB, i)
    assert [sched.dequeue() for _ in range(100)] == list(range(100))
    assert sched.dequeue() is None
    assert len(sched) == 0 and sched.queued_bytes == 0


def test_idle_job_gets_no_credit_when_it_returns() -> None:
    """A job idle while another ran alone must come back at an equal share, not with a burst."""
    sched: FairScheduler[str] = FairScheduler(no_op_cost("job-fair"))
    a, b = ident("a"), ident("b")
    sched.enqueue(a, MiB, "a")
    assert sched.dequeue() == "a"  # a has been seen, then goes idle
    for _ in range(5000):  # b alone moves 5000 MiB; a accrues nothing meanwhile
        sched.enqueue(b, MiB, "b")
        assert sched.dequeue() == "b"
    for _ in range(200):
        sched.enqueue(a, MiB, "a")
        sched.enqueue(b, MiB, "b")
    first = [sched.dequeue() for _ in range(100)]
    assert abs(first.count("a") - first.count("b")) <= 2


def _burst_after_idle(credit: str, idle_requests: int) -> int:
    """Bytes job ``b`` is served in a row when it returns after ``a`` ran alone for a while.

    Both jobs alternate first, so ``b``'s finish tag is current; then ``a`` runs alone for
    ``idle_requests`` MiB requests (what ``b`` leaves unused), then both are backlogged again.
    """
    sched: FairScheduler[str] = FairScheduler(
        f'policy = "job-fair"\nop_cost = 0\nburst_credit = "{credit}"'
    )
    a, b = ident("a"), ident("b")
    for _ in range(50):
        sched.enqueue(a, MiB, "a")
        sched.enqueue(b, MiB, "b")
        sched.dequeue()
        sched.dequeue()
    for _ in range(idle_requests):
        sched.enqueue(a, MiB, "a")
        assert sched.dequeue() == "a"
    for _ in range(500):
        sched.enqueue(a, MiB, "a")
        sched.enqueue(b, MiB, "b")
    run = 0
    while sched.dequeue() == "b":
        run += MiB
    return run


def test_burst_credit_serves_a_returning_job_first() -> None:
    """A job back from a long idle spell takes up to ``burst_credit`` bytes ahead of the others."""
    assert _burst_after_idle("0", 1000) <= MiB  # plain SFQ: no burst
    assert 31 * MiB <= _burst_after_idle("32MiB", 1000) <= 33 * MiB


def test_burst_credit_never_exceeds_the_share_left_unused() -> None:
    """A short pause earns only what was left unused, however large the credit."""
    # a ran alone for 6 MiB, moving V by 6 MiB past b's finish tag: that is all b left unused.
    burst = _burst_after_idle("1GiB", 6)
    assert 5 * MiB <= burst <= 8 * MiB


def test_burst_credit_keeps_long_run_shares() -> None:
    """With both jobs always backlogged the credit changes nothing."""
    small, big = ident("small"), ident("big")
    sched: FairScheduler[tuple[int, int]] = FairScheduler(
        'policy = "job-fair"\nop_cost = 0\nburst_credit = "64MiB"'
    )
    streams = [Stream(small, [4 * KiB], depth=4), Stream(big, [4 * MiB], depth=4)]
    served, _, _ = run_backlogged(sched, streams, 60_000)
    assert_close(shares(served), {"small": 0.5, "big": 0.5})


def test_new_job_starts_at_current_virtual_time() -> None:
    sched: FairScheduler[str] = FairScheduler(no_op_cost("job-fair"))
    old, new = ident("old"), ident("new")
    for _ in range(3000):
        sched.enqueue(old, MiB, "old")
    for _ in range(1000):
        sched.dequeue()
    for _ in range(100):
        sched.enqueue(new, MiB, "new")
    first = [sched.dequeue() for _ in range(100)]
    assert abs(first.count("new") - first.count("old")) <= 2


@pytest.mark.parametrize("idle_timeout", [10.0, 0.0])
def test_closed_loop_job_keeps_its_debt(idle_timeout: float) -> None:
    """A job with one big request outstanding empties its queue after every dequeue.

    If its finish tag were forgotten whenever the queue empties, it would restart at V each time
    and take far more than half. Also with idle_timeout=0 and a moving clock, so that the reaper
    runs on every decision: it must not drop a node whose finish tag is still ahead of V.
    """
    clock = FakeClock()
    sched: FairScheduler[tuple[int, int]] = FairScheduler(
        no_op_cost("job-fair"), clock=clock, idle_timeout=idle_timeout
    )
    big, small = ident("big"), ident("small")
    sched.enqueue(big, 4 * MiB, (0, 4 * MiB))
    for _ in range(8):
        sched.enqueue(small, 4 * KiB, (1, 4 * KiB))
    served: Counter[int] = Counter()
    for _ in range(100_000):
        clock.advance(0.001)
        got = sched.dequeue()
        assert got is not None
        who, size = got
        served[who] += size
        sched.enqueue(big if who == 0 else small, size, got)
    assert served[0] / (served[0] + served[1]) == pytest.approx(0.5, rel=0.02)


@pytest.mark.parametrize("name", ["size-fair", "group-user-size-fair", "tbf"])
def test_idle_nodes_are_reaped(name: str) -> None:
    """Memory stays bounded with many transient jobs; nothing is left after they all go idle."""
    policy = load_policy(
        'policy = "tbf"\n[tbf]\ndefault_rate = "unlimited"' if name == "tbf" else name
    )
    clock = FakeClock()
    sched: FairScheduler[int] = FairScheduler(policy, clock=clock, idle_timeout=0.05)
    high = 0
    for i in range(20_000):
        who = JobIdentity(f"job{i}", f"user{i % 997}", f"group{i % 31}", 1 + i % 5)
        sched.enqueue(who, 4 * KiB, i)
        sched.enqueue(who, 4 * KiB, i)
        clock.advance(0.001)
        assert sched.dequeue() is not None
        assert sched.dequeue() is not None
        if i % 500 == 0:
            high = max(high, sched.node_count())
    # ~50 jobs go idle per idle_timeout; each brings at most a user and a group node along.
    assert high < 250, high
    clock.advance(5.0)
    sched.snapshot()  # sweeps
    assert sched.node_count() == 1
    assert len(sched) == 0


def test_virtual_time_rebase_keeps_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tags are shifted down on busy nodes; shares must not change across the shifts."""
    monkeypatch.setattr(scheduler_module, "_REBASE_AT", 50.0 * MiB)
    for name in ("size-fair", "group-user-size-fair"):
        sched: FairScheduler[tuple[int, int]] = FairScheduler(no_op_cost(name))
        jobs = [ident("a", "x", "g1", 1), ident("b", "y", "g1", 3), ident("c", "z", "g2", 2)]
        served, _, _ = run_backlogged(sched, [Stream(j, [MiB, 64 * KiB]) for j in jobs], 20_000)
        assert_close(shares(served), target_shares(sched.policy, jobs))
        assert sched._root.vtime <= 50.0 * MiB  # it did rebase: unshifted V would be ~10 GiB


# -- live policy changes ---------------------------------------------------------------------------


def test_set_policy_keeps_every_item_in_arrival_order() -> None:
    clock = FakeClock()
    sched: FairScheduler[int] = FairScheduler("size-fair", clock=clock)
    people = [ident(str(j), f"u{j % 3}", f"g{j % 2}", 1 + j) for j in range(6)]
    for i in range(600):
        sched.enqueue(people[(i * 7) % 6], 1000 + i, i)
        clock.advance(0.001)
    taken = set(take(sched, 150))
    bytes_before = sched.queued_bytes
    served_before = sched.snapshot().served_bytes
    sched.set_policy("group-user-size-fair")
    assert len(sched) == 450 and sched.queued_bytes == bytes_before
    taken |= set(take(sched, 150))
    sched.set_policy("fifo")  # a single queue: must now yield the rest exactly in arrival order
    rest = take(sched, 300)
    assert rest == sorted(rest)
    assert sched.dequeue() is None
    assert taken.isdisjoint(rest) and len(taken) == 300
    assert taken | set(rest) == set(range(600))
    snap = sched.snapshot()
    assert snap.served_ops == 600  # the totals survived two tree rebuilds
    assert snap.served_bytes == sum(1000 + i for i in range(600))
    assert snap.served_bytes > served_before


def test_set_policy_keeps_enqueue_times_for_wait_statistics() -> None:
    clock = FakeClock()
    sched: FairScheduler[int] = FairScheduler("job-fair", clock=clock)
    sched.enqueue(ident("1"), 10, 1)
    clock.advance(2.0)
    sched.set_policy("size-fair")
    clock.advance(1.0)
    assert sched.dequeue() == 1
    assert sched.snapshot().root.wait_seconds == pytest.approx(3.0)


def test_failed_set_policy_changes_nothing() -> None:
    """If the new policy rejects a queued identity, the old tree stays as it was."""
    from .test_policy import EveryoneEqualPolicy

    class Picky(EveryoneEqualPolicy):
        def path(self, identity: JobIdentity):  # type: ignore[no-untyped-def]
            if identity.group == "bad":
                raise ValueError("no bad groups")
            return super().path(identity)

    sched: FairScheduler[int] = FairScheduler("job-fair")
    for i in range(10):
        sched.enqueue(ident(str(i % 3), group="bad" if i == 7 else "ok"), 100, i)
    before = sched.snapshot().to_dict()
    with pytest.raises(ValueError, match="no bad groups"):
        sched.set_policy(Picky())
    assert sched.policy.name == "job-fair"
    assert sched.snapshot().to_dict() | {"time": None} == before | {"time": None}
    assert sorted(take(sched, 10)) == list(range(10))


def test_set_policy_to_and_from_tbf() -> None:
    clock = FakeClock()
    sched: FairScheduler[int] = FairScheduler("size-fair", clock=clock)
    for i in range(20):
        sched.enqueue(ident(str(i % 2)), 1000, i)
    sched.set_policy({"policy": "tbf", "op_cost": 0, "tbf": {"default_rate": 1000}})
    assert len(sched) == 20
    got: list[int] = []
    for _ in range(1000):
        item = sched.dequeue()
        if item is None:
            when = sched.next_eligible_time()
            assert when is not None and when > clock()
            clock.now = when
            continue
        got.append(item)
        if len(got) == 10:
            sched.set_policy("job-fair")
            got.extend(take(sched, 10))
            break
    assert sorted(got) == list(range(20))


# -- token buckets ---------------------------------------------------------------------------------

TBF = """
policy = "tbf"
op_cost = 0
[tbf]
key = "{key}"
default_rate = "1MB/s"
[tbf.rates]
fast = "4MB/s"
"""


def drain_tbf(
    sched: FairScheduler[tuple[str, int]], clock: FakeClock, seconds: float
) -> Counter[str]:
    """Serve as fast as the buckets allow, on an infinitely fast device, for ``seconds``."""
    end = clock() + seconds
    served: Counter[str] = Counter()
    while True:
        got = sched.dequeue()
        if got is None:
            when = sched.next_eligible_time()
            assert when is not None and when > clock()  # not work-conserving, but never stuck
            if when > end:
                return served
            clock.now = when
            continue
        served[got[0]] += got[1]


def test_tbf_caps_hold() -> None:
    clock = FakeClock()
    sched: FairScheduler[tuple[str, int]] = FairScheduler(TBF.format(key="job"), clock=clock)
    for _ in range(2000):
        sched.enqueue(ident("slow"), 64 * KiB, ("slow", 64 * KiB))
        sched.enqueue(ident("fast"), 64 * KiB, ("fast", 64 * KiB))
    served = drain_tbf(sched, clock, 20.0)
    assert served["slow"] == pytest.approx(20e6, rel=0.01)
    assert served["fast"] == pytest.approx(80e6, rel=0.01)


def test_tbf_is_not_work_conserving() -> None:
    clock = FakeClock()
    sched: FairScheduler[tuple[str, int]] = FairScheduler(TBF.format(key="job"), clock=clock)
    for _ in range(3):
        sched.enqueue(ident("slow"), 100_000, ("slow", 100_000))
    assert sched.dequeue() == ("slow", 100_000)
    assert sched.dequeue() is None  # the device is idle, yet the request waits for tokens
    assert len(sched) == 2
    assert sched.next_eligible_time() == pytest.approx(clock() + 0.1)  # 100 kB at 1 MB/s
    clock.advance(0.0999)
    assert sched.dequeue() is None
    clock.advance(0.0002)
    assert sched.dequeue() == ("slow", 100_000)


def test_tbf_per_user_bucket_is_shared_by_the_users_jobs() -> None:
    clock = FakeClock()
    sched: FairScheduler[tuple[str, int]] = FairScheduler(TBF.format(key="user"), clock=clock)
    for _ in range(1000):
        for job in ("1", "2", "3"):
            sched.enqueue(ident(job, user="carol"), 64 * KiB, (job, 64 * KiB))
    served = drain_tbf(sched, clock, 10.0)
    assert sum(served.values()) == pytest.approx(10e6, rel=0.01)


def test_tbf_burst_and_unlimited() -> None:
    clock = FakeClock()
    text = TBF.format(key="job").replace(
        'default_rate = "1MB/s"', 'default_rate = "1MB/s"\nburst = "1MiB"'
    )
    text += 'free = "unlimited"\n'
    sched: FairScheduler[tuple[str, int]] = FairScheduler(text, clock=clock)
    for _ in range(40):
        sched.enqueue(ident("bursty"), 64 * KiB, ("bursty", 64 * KiB))
        sched.enqueue(ident("free"), 64 * KiB, ("free", 64 * KiB))
    now_served: Counter[str] = Counter()
    while (got := sched.dequeue()) is not None:
        now_served[got[0]] += 1
    # A full 1 MiB bucket lets 16 requests of 64 KiB go beyond the first, back to back.
    assert now_served == {"bursty": 17, "free": 40}


def test_tbf_snapshot_reports_rates() -> None:
    clock = FakeClock()
    sched: FairScheduler[tuple[str, int]] = FairScheduler(TBF.format(key="job"), clock=clock)
    sched.enqueue(ident("fast"), 10, ("fast", 10))
    sched.enqueue(ident("x"), 10, ("x", 10))
    snap = sched.snapshot()
    rates = {node.key: node.rate for _, node in snap.walk() if node.level == "job"}
    assert rates == {"fast": 4e6, "x": 1e6}
    assert all(node.share is None for _, node in snap.walk() if node.level == "job")


# -- snapshot --------------------------------------------------------------------------------------


def test_snapshot_shares_queues_and_counters() -> None:
    clock = FakeClock()
    policy = load_policy('policy = "group-user-size-fair"\n[groups]\nclimate = 3')
    sched: FairScheduler[int] = FairScheduler(policy, clock=clock)
    a1 = ident("a1", "alice", "climate", 1)
    a3 = ident("a3", "alice", "climate", 3)
    b = ident("b", "bob", "bio", 2)
    idle = ident("i", "ivan", "bio", 2)
    sched.enqueue(idle, 500, 0)
    assert sched.dequeue() == 0  # ivan is known but idle
    for i in range(4):
        sched.enqueue(a1, 100, i)
        sched.enqueue(a3, 200, i)
        sched.enqueue(b, 300, i)
    clock.advance(1.0)
    snap = sched.snapshot()
    nodes = {path: node for path, node in snap.walk()}
    climate = nodes[(("group", "climate"),)]
    bio = nodes[(("group", "bio"),)]
    assert (climate.weight, climate.share, bio.share) == (3.0, 0.75, 0.25)
    job_a3 = nodes[(("group", "climate"), ("user", "alice"), ("job", "a3"))]
    assert job_a3.share == 0.75 and job_a3.global_share == pytest.approx(0.5625)
    assert job_a3.identity == a3
    ivan = nodes[(("group", "bio"), ("user", "ivan"))]
    assert (ivan.active, ivan.share, ivan.served_bytes, ivan.served_ops) == (False, 0.0, 500, 1)
    bob = nodes[(("group", "bio"), ("user", "bob"))]
    assert bob.share == 1.0  # ivan is idle: bob has all of bio
    assert (snap.queued_items, snap.queued_bytes) == (12, 2400)
    assert (climate.queued_items, climate.queued_bytes, bio.queued_bytes) == (8, 1200, 1200)
    assert (snap.served_ops, snap.served_bytes) == (1, 500)
    assert snap.policy == policy.to_dict()
    json.dumps(snap.to_dict())  # plain types all the way down
    for _ in range(12):
        sched.dequeue()
    snap = sched.snapshot()
    assert snap.root.wait_seconds == pytest.approx(12 * 1.0)
    assert snap.served_bytes == 2900


def test_rejects_bad_arguments() -> None:
    sched: FairScheduler[int] = FairScheduler("size-fair")
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="nbytes"):
            sched.enqueue(ident("1"), bad, 0)  # type: ignore[arg-type]
    assert len(sched) == 0
    with pytest.raises(ValueError, match="idle_timeout"):
        FairScheduler("size-fair", idle_timeout=-1)
    assert sched.next_eligible_time() is None
    sched.enqueue(ident("1"), 0, 0)
    assert sched.next_eligible_time() is not None

"""The epoch order and its partition: pure functions, property-tested."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dataloaders import epoch_order, plan
from dataloaders._order import sample_ids

counts_st = st.lists(st.integers(0, 40), min_size=0, max_size=12)


@given(counts_st, st.integers(0, 3), st.integers(1, 6), st.integers(1, 9), st.booleans())
def test_order_is_a_permutation_and_deterministic(
    counts: list[int], epoch: int, canonical: int, block: int, shuffle: bool
) -> None:
    kwargs = {"seed": 7, "epoch": epoch, "canonical": canonical, "block": block, "shuffle": shuffle}
    order = epoch_order(counts, **kwargs)  # type: ignore[arg-type]
    assert sorted(order.tolist()) == list(range(sum(counts)))
    assert np.array_equal(order, epoch_order(counts, **kwargs))  # type: ignore[arg-type]


def test_epochs_and_seeds_differ() -> None:
    counts = [100] * 10
    a = epoch_order(counts, seed=0, epoch=0)
    assert not np.array_equal(a, epoch_order(counts, seed=0, epoch=1))
    assert not np.array_equal(a, epoch_order(counts, seed=1, epoch=0))
    assert np.array_equal(epoch_order(counts, seed=0, epoch=0, shuffle=False), np.arange(1000))


@settings(max_examples=200)
@given(
    st.integers(0, 300),
    st.integers(0, 320),
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(1, 17),
    st.sampled_from(["pad", "drop"]),
)
def test_plan_is_disjoint_complete_and_equal(
    n: int, start: int, ranks: int, workers: int, block: int, remainder: str
) -> None:
    start = min(start, n)
    p = plan(n, start, ranks, block, remainder)
    per_rank = []
    everything: list[int] = []
    for rank in range(ranks):
        mine = [p.positions(rank, w, workers) for w in range(workers)]
        per_rank.append(sum(len(m) for m in mine))
        for m in mine:
            everything += m.tolist()
    assert len(set(per_rank)) <= 1  # every rank the same number of samples
    assert sorted(everything) == list(range(start, p.end))  # disjoint and complete
    left = n - start
    if remainder == "pad":
        assert left <= p.end - start < left + ranks
    else:
        assert left - ranks < p.end - start <= left


@given(st.integers(1, 300), st.integers(1, 4), st.integers(1, 3), st.integers(1, 9))
def test_batches_consumed_are_a_prefix(n: int, ranks: int, workers: int, block: int) -> None:
    """After k batches per rank (round-robin over workers), exactly a prefix is consumed."""
    p = plan(n, 0, ranks, block)
    streams = [[p.positions(r, w, workers).tolist() for w in range(workers)] for r in range(ranks)]
    batches_per_rank = -(-p.per_rank // block)
    for k in range(batches_per_rank + 1):
        taken: list[int] = []
        for r in range(ranks):
            # The DataLoader's batch i of a rank is batch i // workers of worker i % workers.
            for i in range(k):
                stream = streams[r][i % workers]
                j = i // workers
                taken += stream[j * block : (j + 1) * block]
        end = p.consumed(min(k * block, p.per_rank))
        assert sorted(taken) == list(range(end))


def test_readers_touch_only_their_streams() -> None:
    """With ranks x workers dividing the canonical count, each reader reads few shards."""
    counts = [50] * 16
    order = epoch_order(counts, seed=0, epoch=0, canonical=4, block=10, window=2)
    p = plan(800, 0, 2, 10)
    touched = []
    for rank in range(2):
        for worker in range(2):
            ids = sample_ids(order, p.positions(rank, worker, 2))
            touched.append(set((ids // 50).tolist()))
    assert all(len(t) <= 5 for t in touched)  # 16 shards / 4 readers, +1 at a boundary
    assert set().union(*touched) == set(range(16))


def test_padding_wraps_to_the_epoch_start() -> None:
    order = epoch_order([5], seed=0, epoch=0)
    p = plan(5, 0, 4, 1)
    assert p.per_rank == 2
    ids = np.concatenate([sample_ids(order, p.positions(r)) for r in range(4)])
    assert sorted(ids.tolist()) == sorted([*range(5), *order[:3].tolist()])

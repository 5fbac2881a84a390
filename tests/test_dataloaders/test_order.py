"""The epoch order and its partition: pure functions, property-tested."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dataloaders import epoch_order, plan
from dataloaders._order import argsort_within, sample_ids

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


def _lexsort_order(
    counts: list[int], seed: int, epoch: int, window: float, canonical: int, block: int
) -> np.ndarray:
    """The epoch order as first written (np.lexsort inside windows): resumes made with
    earlier versions must see the same order."""
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(c)[:-1]])
    rng = np.random.default_rng([seed, epoch, 0x10C5])
    shard_order = rng.permutation(len(c))
    lengths = c[shard_order]
    seq = np.repeat(starts[shard_order] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    seq += np.arange(n, dtype=np.int64)
    pos = np.arange(n, dtype=np.int64)
    bounds = (n * np.arange(canonical + 1, dtype=np.int64)) // canonical
    span = np.searchsorted(bounds, pos, side="right") - 1
    offset = pos - bounds[span]
    per_window = max(1, round(window * n / len(c)))
    keys = rng.random(n)
    seq = seq[np.lexsort((keys, span * (n + 1) + offset // per_window))]
    return seq[np.lexsort((pos, span, offset // block))]


@given(
    counts_st,
    st.integers(0, 3),
    st.sampled_from([0.5, 1.0, 2.0, 3.5]),
    st.integers(1, 6),
    st.integers(1, 9),
)
def test_order_is_the_lexsort_order(
    counts: list[int], epoch: int, window: float, canonical: int, block: int
) -> None:
    got = epoch_order(counts, seed=3, epoch=epoch, window=window, canonical=canonical, block=block)
    assert np.array_equal(got, _lexsort_order(counts, 3, epoch, window, canonical, block))


def test_order_of_a_large_epoch_is_the_lexsort_order() -> None:
    counts = [6451] * 30 + [6470]  # the benchmark's 200k images in 31 shards
    got = epoch_order(counts, seed=0, epoch=1, canonical=2, block=256)
    assert np.array_equal(got, _lexsort_order(counts, 0, 1, 2.0, 2, 256))


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), max_size=80), st.booleans())
def test_argsort_within_equals_lexsort_with_ties(pairs: list[tuple[int, int]], real: bool) -> None:
    group = np.sort(np.array([g for g, _ in pairs], dtype=np.int64))
    keys = np.array([k for _, k in pairs], dtype=np.float64)
    if real:
        keys = keys + np.random.default_rng(len(pairs)).random(len(pairs))
    cuts = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), len(group)]
    windows = list(itertools.pairwise(cuts)) if len(group) else []
    assert np.array_equal(argsort_within(keys, windows), np.lexsort((keys, group)))


@settings(max_examples=200)
@given(
    counts_st,
    st.integers(0, 3),
    st.integers(1, 6),
    st.integers(1, 9),
    st.booleans(),
    st.floats(0.3, 3.0),
    st.lists(st.integers(0, 1000), max_size=60),
)
def test_the_order_at_some_positions_is_the_full_order_there(
    counts: list[int],
    epoch: int,
    canonical: int,
    block: int,
    shuffle: bool,
    window: float,
    at: list[int],
) -> None:
    """A reader computes only its own positions (the windows they draw from): the same ids,
    including positions past the end, which wrap as in sample_ids."""
    kwargs = {
        "seed": 3,
        "epoch": epoch,
        "canonical": canonical,
        "block": block,
        "shuffle": shuffle,
        "window": window,
    }
    full = epoch_order(counts, **kwargs)  # type: ignore[arg-type]
    positions = np.asarray(at, dtype=np.int64)
    part = epoch_order(counts, at=positions, **kwargs)  # type: ignore[arg-type]
    assert np.array_equal(part, sample_ids(full, positions))

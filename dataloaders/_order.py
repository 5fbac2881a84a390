"""Epoch order and its partition among ranks and workers: pure functions, no I/O.

The order of an epoch is a function of (shard sample counts, seed, epoch, shuffle window,
``canonical`` stream count, ``block``) only, never of the number of ranks or workers: that is
what makes a resume exact on a different world (the approach of MosaicML streaming's
"canonical nodes", ``streaming/base/shuffle``).

1. **Shards.** Shuffle the shard order (seed, epoch).
2. **Streams.** Cut the resulting sample sequence into ``canonical`` contiguous spans of equal
   length; inside each span, shuffle samples within windows of about ``window`` shards. A
   span touches only its own shards, so a reader holds about ``window`` shards at a time.
3. **Global order.** Interleave the spans block by block (``block`` samples each, normally
   the batch size): block ``g`` comes from span ``g % canonical``.

A run consumes the global order as a prefix: at each step every rank takes the next ``block``
positions in rank order, and the step goes to worker ``step % num_workers`` of each rank (the
DataLoader asks its workers round-robin). After ``k`` batches on every rank, exactly the
first ``k * ranks * block`` positions are consumed, whatever the world: resuming is starting
the partition at that position. When ``ranks * workers`` divides ``canonical`` (the default
takes ``canonical`` = ranks x workers of the first run), each worker reads whole spans: its
own shards only.

Equal work per rank: the positions left are padded (repeating the epoch's first samples) or
truncated to a multiple of the rank count, and a final short step is split evenly, so every
rank gets the same samples and batches (uneven batch counts deadlock DDP).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.random  # numpy imports it lazily: not on a reader's first-batch path

__all__ = ["Plan", "argsort_within", "epoch_order", "plan"]

IntArray = np.ndarray[Any, np.dtype[np.int64]]


def epoch_order(
    counts: IntArray | list[int],
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    window: float = 2.0,
    canonical: int = 1,
    block: int = 1,
    at: IntArray | None = None,
) -> IntArray:
    """Global sample ids (``0..N-1``) in this epoch's order (see module docstring).

    With ``at`` (epoch positions, wrapping past the end as :func:`sample_ids` does), just the
    ids at those positions, ``epoch_order(...)[at % N]``: only the shuffle windows they draw
    from are sorted. A reader needs its own streams alone (half the work with 2 readers, on
    the way to its first batch)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if canonical < 1 or block < 1 or window <= 0:
        raise ValueError("canonical and block must be >= 1 and window > 0")
    # Few, narrow temporaries: this runs on the way to the first batch, and fresh memory is
    # slow in VMs (every page of a new array faults); int32 where the ids fit.
    dtype = np.int32 if n < 2**31 else np.int64
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng([seed, epoch, 0x10C5])
    shard_order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
    # Sample ids in shard order.
    seq = np.concatenate(
        [np.arange(starts[s], starts[s] + counts[s], dtype=dtype) for s in shard_order]
    )
    # Spans: equal contiguous parts of the sequence.
    bounds = ((n * np.arange(canonical + 1, dtype=np.int64)) // canonical).tolist()
    # Interleave the spans block by block: by (round, span), then position. Stable, so
    # positions keep their order within a (round, span); the same as np.lexsort((pos, span,
    # rounds)), ~5x faster (each span is one ascending run of keys).
    span: IntArray = np.repeat(np.arange(canonical, dtype=dtype), np.diff(bounds))
    rounds: IntArray = np.arange(n, dtype=dtype)
    span_starts: IntArray = np.asarray(bounds[:-1], dtype=dtype)
    rounds -= span_starts[span]  # offset in its span
    rounds //= block
    rounds *= canonical
    rounds += span
    interleave = np.argsort(rounds, kind="stable")  # epoch position -> index in seq
    wanted = interleave if at is None else interleave[np.asarray(at, dtype=np.int64) % n]
    if shuffle:
        # Shuffled within windows of per_window positions of each span (the last one of a
        # span shorter): each window's keys argsorted on their own.
        per_window = max(1, round(window * n / len(counts)))
        keys = rng.random(n)  # all of them, whatever is wanted: the same stream every time
        windows = [
            (a, min(a + per_window, z))
            for z0, z in itertools.pairwise(bounds)
            for a in range(z0, z, per_window)
        ]
        if at is not None:  # only the windows the wanted positions fall in
            starts_of = np.asarray([a for a, _ in windows], dtype=np.int64)
            hit = np.zeros(len(windows), dtype=bool)
            hit[np.searchsorted(starts_of, wanted, side="right") - 1] = True
            windows = [w for w, keep in zip(windows, hit.tolist(), strict=True) if keep]
        seq = seq[argsort_within(keys, windows, fill=at is not None)]
    out: IntArray = seq[wanted].astype(np.int64)
    return out


def argsort_within(
    keys: np.ndarray[Any, Any], windows: Sequence[tuple[int, int]], fill: bool = False
) -> IntArray:
    """The permutation that sorts ``keys`` inside each ``[a, z)`` of ``windows`` (which tile
    ``keys`` in order), stably: ``np.lexsort((keys, window_ids))``, ~5x faster (25 -> 5 ms
    for 200k samples, on the first batch's path). Each window's keys are argsorted on their
    own with numpy's default (unstable, vectorised) sort; a window with equal keys, which a
    stable sort keeps in index order, is sorted again stably. With ``fill``, ``windows`` may
    leave gaps, where the permutation is the identity."""
    out: IntArray = np.arange(len(keys)) if fill else np.empty(len(keys), dtype=np.int64)
    for a, z in windows:
        part = keys[a:z]
        idx = np.argsort(part)
        ordered = part[idx]
        if (ordered[1:] == ordered[:-1]).any():
            idx = np.argsort(part, kind="stable")
        idx += a
        out[a:z] = idx
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    """How the positions ``[start, end)`` of an epoch are dealt to ranks and workers."""

    start: int
    end: int
    ranks: int
    block: int

    @property
    def per_rank(self) -> int:
        """Samples each rank gets."""
        return (self.end - self.start) // self.ranks

    @property
    def full_steps(self) -> int:
        return (self.end - self.start) // (self.ranks * self.block)

    def positions(self, rank: int, worker: int = 0, workers: int = 1) -> IntArray:
        """Epoch positions of one (rank, worker), in the order it yields them."""
        b, r = self.block, self.ranks
        steps = np.arange(worker, self.full_steps, workers, dtype=np.int64)
        parts = [(self.start + steps[:, None] * r * b + rank * b + np.arange(b)).reshape(-1)]
        tail = (self.end - self.start) - self.full_steps * r * b
        if tail and self.full_steps % workers == worker:
            q = tail // r
            base = self.start + self.full_steps * r * b + rank * q
            parts.append(np.arange(base, base + q, dtype=np.int64))
        out: IntArray = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return out

    def consumed(self, taken: int) -> int:
        """The position the epoch has reached once every rank has taken ``taken`` samples."""
        b, r = self.block, self.ranks
        taken = min(taken, self.per_rank)
        return min(self.start + (taken // b) * r * b + (taken % b) * r, self.end)


def plan(n: int, start: int, ranks: int, block: int, remainder: str = "pad") -> Plan:
    """The plan for an epoch of ``n`` samples resumed at position ``start``.

    ``remainder="pad"`` repeats samples so every rank gets ``ceil(left / ranks)``;
    ``"drop"`` leaves out up to ``ranks - 1`` samples (the last of the order).
    """
    if remainder not in ("pad", "drop"):
        raise ValueError(f"remainder must be 'pad' or 'drop', not {remainder!r}")
    left = max(0, n - start)
    left = -(-left // ranks) * ranks if remainder == "pad" else left // ranks * ranks
    return Plan(start=start, end=start + left, ranks=ranks, block=block)


def sample_ids(order: IntArray, positions: IntArray) -> IntArray:
    """Sample ids at epoch ``positions`` (padding positions wrap to the epoch's start)."""
    n = len(order)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    out: IntArray = order[positions % n]
    return out

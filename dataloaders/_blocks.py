"""Block checksums: a shard file verified piece by piece, as its samples are read.

The writer stores, beside each shard, a small file ``<shard>.xxh3`` of the xxh3-64 of every
``BLOCK`` bytes of the shard's data files (little-endian u64, file after file); the manifest
holds that file's own size and xxh3-64. A reader checks the sums file whole, then each block
the first time a sample reaches into it (:class:`BlockChecker`). No byte is handed out
unverified, as with a whole-file check, but the first batch no longer waits for every byte
of the 2-3 shards it draws from to be read and hashed (~30 ms of a 0.1 s first batch here):
it hashes the blocks its 256 samples lie in. Over an epoch every block is hashed once, as
before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from dataloaders._errors import ShardCorrupted

__all__ = ["BLOCK", "BlockChecker", "block_sums", "sums_path"]

#: Bytes per checksummed block: a 4-16 KiB sample reaches into one or two.
BLOCK = 64 << 10


def sums_path(shard: str) -> str:
    """The sums file of shard ``shard`` (relative to the manifest)."""
    return f"{shard}.xxh3"


def block_sums(data: bytes | bytearray | memoryview, block: int = BLOCK) -> bytes:
    """The xxh3-64 of every ``block`` bytes of ``data``, as little-endian u64."""
    view = memoryview(data).cast("B")
    digest = xxhash.xxh3_64_intdigest
    sums = [digest(view[i : i + block]) for i in range(0, len(view), block)]
    return np.asarray(sums, dtype="<u8").tobytes()


class BlockChecker:
    """Verifies the blocks of one file on first use.

    Parameters
    ----------
    data
        The file's bytes (a mapping or a buffer: nothing is read until a block is checked).
    sums
        The expected xxh3-64 of each block.
    block
        Bytes per block.
    where
        The file, for errors.
    on_failure
        Called before a failed check raises (e.g. to delete a bad cached copy).
    """

    def __init__(
        self,
        data: Any,
        sums: np.ndarray[Any, Any],
        block: int,
        where: str,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._view = memoryview(data).cast("B")
        n_blocks = -(-len(self._view) // block)
        if len(sums) != n_blocks:
            raise ShardCorrupted(
                f"{where}: its block checksums cover {len(sums)} blocks, not {n_blocks}"
            )
        self._sums = sums.tolist()
        self._block = block
        self._where = where
        self._on_failure = on_failure
        self._done = np.zeros(n_blocks, dtype=bool)
        self._lock = threading.Lock()  # decoding threads and the reader may check at once

    def check(self, start: int, stop: int) -> None:
        """Verify the bytes ``[start, stop)`` (the blocks they lie in) unless done already."""
        if stop <= start:
            return
        first, last = start // self._block, (stop - 1) // self._block
        if self._done[first : last + 1].all():
            return
        self._verify(range(first, last + 1))

    def check_spans(self, starts: np.ndarray[Any, Any], stops: np.ndarray[Any, Any]) -> None:
        """Verify many ranges ``[starts[i], stops[i])`` at once (a batch's samples)."""
        keep = stops > starts
        if not keep.any():
            return
        first = starts[keep] // self._block
        last = (stops[keep] - 1) // self._block
        # Samples are much smaller than a block: a range spans at most its two end blocks,
        # except rare large ones, handled one by one. A mask, not np.unique (which imports
        # numpy.ma on first use: 13 ms on a worker's way to its first batch).
        wide = np.flatnonzero(last - first > 1)
        wanted = np.zeros(len(self._done), dtype=bool)
        wanted[first] = True
        wanted[last] = True
        todo = np.flatnonzero(wanted & ~self._done)
        if len(todo):
            self._verify(todo.tolist())
        for i in wide.tolist():
            self.check(int(first[i]) * self._block, int(last[i] + 1) * self._block)

    def _verify(self, blocks: Any) -> None:
        view, block, sums, done = self._view, self._block, self._sums, self._done
        digest = xxhash.xxh3_64_intdigest
        with self._lock:
            for k in blocks:
                if done[k]:
                    continue
                if digest(view[k * block : (k + 1) * block]) != sums[k]:
                    if self._on_failure is not None:
                        self._on_failure()
                    raise ShardCorrupted(
                        f"{self._where}: bytes {k * block}-{min(len(view), (k + 1) * block)} "
                        "fail their xxh3 checksum (corrupted or rewritten after the manifest)"
                    )
                done[k] = True

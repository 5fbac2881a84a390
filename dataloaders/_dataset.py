"""``StreamingDataset`` (iterable, sharded, resumable) and ``ShardedDataset`` (map-style)."""

from __future__ import annotations

import os
import posixpath
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from dataloaders._arena import BatchArena, batch_bytes, blobs_bytes
from dataloaders._cache import BufferPool, ShardFetcher, ShardPrefetcher
from dataloaders._errors import ManifestError, ShardNotFound
from dataloaders._formats import DecodedShard
from dataloaders._fs import join, open_fs
from dataloaders._manifest import MANIFEST_NAME, Manifest
from dataloaders._order import Plan, epoch_order, plan, sample_ids
from dataloaders._slots import SlotDirectory, default_slot_dir
from dataloaders._world import World

__all__ = [
    "STATE_VERSION",
    "ShardedDataset",
    "StreamingDataset",
    "load_manifest",
    "verify_shards",
]

STATE_VERSION = 1
Sample = dict[str, Any]


def _split_url(url: str) -> tuple[str, str]:
    """(directory URL, manifest file name) of a dataset URL or manifest URL."""
    stripped = url.rstrip("/")
    if stripped.endswith(".json"):
        return posixpath.dirname(stripped) or ".", posixpath.basename(stripped)
    return stripped, MANIFEST_NAME


def load_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The manifest of the dataset at ``url`` (its directory or its ``manifest.json``)."""
    directory, name = _split_url(url)
    fs, root = open_fs(directory, storage_options)
    path = join(root, name)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ShardNotFound(f"no dataset at {url}: {name} is missing") from None
    return Manifest.loads(data, where=f"{directory}/{name}")


def verify_shards(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read every shard of ``url`` and check sizes and checksums; return the manifest.

    Raises :class:`ShardNotFound` or :class:`ShardCorrupted` naming the first bad shard.
    """
    source = _Source(url, storage_options, None)
    fetcher = source.fetcher(verify=True, whole=True)
    for shard in source.manifest.shards:
        fetcher.load(shard)
    return source.manifest


class _Source:
    """Lazily opened filesystem + manifest of a dataset URL (never pickled with its client)."""

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None, manifest: Manifest | None
    ) -> None:
        self.url = url
        self.storage_options = storage_options
        self._manifest = manifest
        self._fs: Any = None
        self._root = ""
        self._pool: BufferPool | None = None  # read buffers reused across an epoch's shards

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None  # each process opens its own client
        state["_pool"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def fs_root(self) -> tuple[Any, str]:
        if self._fs is None:
            directory, _ = _split_url(self.url)
            self._fs, self._root = open_fs(directory, self.storage_options)
        return self._fs, self._root

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = load_manifest(self.url, self.storage_options)
        return self._manifest

    def drop_buffers(self) -> None:
        """Let go of the reused read buffers (a fetcher still running keeps its own)."""
        self._pool = None

    def fetcher(
        self,
        verify: bool,
        keep_buffers: int = 0,
        whole: bool = False,
        slots: SlotDirectory | None = None,
        node_cache: bool = False,
    ) -> ShardFetcher:
        """Reads shards; with ``keep_buffers``, into up to that many reused buffers (slots
        of ``slots`` where it has room); with ``whole``, verifies every file whole when it
        is loaded; with ``node_cache``, keeps remote files in ``slots`` for later readers
        and reads them from there."""
        fs, root = self.fs_root
        if keep_buffers and self._pool is None:
            self._pool = BufferPool(keep_buffers, slots)
        pool = self._pool if keep_buffers else None
        cache = slots if node_cache else None
        return ShardFetcher(fs, root, self.manifest, self.url, verify, pool, whole, cache)


def _slot_directory(buffer_dir: str | None, budget: int | None) -> SlotDirectory | None:
    """The slot directory a dataset's ``buffer_dir`` option names ("auto": the default)."""
    path = default_slot_dir() if buffer_dir == "auto" else buffer_dir
    return SlotDirectory(path, budget) if path else None


def _pairs(a: np.ndarray, b: np.ndarray, step: int = 4096) -> Iterator[tuple[int, int]]:
    """``zip(a.tolist(), b.tolist())``, converted a slice at a time: the whole arrays of a
    reader's epoch took ~8 ms to convert, on the way to its first batch."""
    for i in range(0, len(a), step):
        yield from zip(a[i : i + step].tolist(), b[i : i + step].tolist(), strict=True)


@dataclass
class _Reading:
    """One reader's planned epoch: each sample's shard and index in it, each shard's last
    use, and the prefetcher already loading them."""

    key: tuple[Any, ...]  # what it was planned for (StreamingDataset._reading_key)
    shard_of: np.ndarray
    local: np.ndarray
    last_use: list[int]
    prefetcher: ShardPrefetcher
    warm_at: int  # samples in the first batch


def _batch_tensor(shape: tuple[int, ...], dtype: np.dtype[Any]) -> torch.Tensor:
    """An uninitialised tensor for a batch: in shared memory inside a DataLoader worker
    (what the batch is sent in anyway), else ordinary memory."""
    empty = torch.from_numpy(np.empty(0, dtype=dtype))
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=empty.dtype)
    numel = int(np.prod(shape))
    storage = empty._typed_storage()._new_shared(numel, device=empty.device)  # type: ignore[no-untyped-call]
    return empty.new(storage).resize_(*shape)


_NUMERIC = ("array", "int", "float")
_ORDER_ARGS = ("seed", "epoch", "shuffle", "window", "canonical", "block")  # of epoch_order


def _span_lengths(n: int, parts: list[Any]) -> np.ndarray:
    """Each batch row's blob length, from per-group (rows, buffer, starts, stops)."""
    lengths = np.zeros(n, dtype=np.int64)
    for positions, _, starts, stops in parts:
        lengths[positions] = stops - starts
    return lengths


def _column_dtype(spec: Any) -> np.dtype[Any]:
    """The batch column dtype of a numeric field (as default_collate makes it)."""
    if spec.kind == "int":
        return np.dtype(np.int64)
    if spec.kind == "float":
        return np.dtype(np.float64)
    dtype: np.dtype[Any] = spec.np_dtype
    return dtype


def _blosc_single_threaded() -> None:
    # Blosc's own threads would fight the DataLoader's worker processes for the cores.
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False


class StreamingDataset(IterableDataset[Sample]):
    """Stream the samples of a sharded dataset (see :func:`write_shards`) into training.

    Every (rank, worker) reads a disjoint part of each epoch, and every rank gets the same
    number of samples and batches. The order depends on (``seed``, epoch) only, shuffles
    shard order and samples within a window of shards, and is consumed as a prefix, so
    :meth:`state_dict` is a few integers and resuming (also on another number of ranks or
    workers) continues exactly where the run stopped.

    Parameters
    ----------
    url
        The dataset directory (or its ``manifest.json``): local path, ``file://``,
        ``memory://``, ``iosvc://``, any fsspec URL.
    shuffle
        Shuffle shard order and samples within windows of shards (else shard order).
    seed
        Seed of the shuffle; every rank must use the same.
    batch_size
        The DataLoader's batch size. Needed for exact resume and shard locality when a
        DataLoader has several workers (it hands out whole batches round-robin);
        :class:`dataloaders.DataLoader` sets it for you.
    shuffle_window
        Shuffle window in shards (a reader holds about this many shards at once).
    num_canonical
        Streams the epoch is cut into (default: ranks x workers of the first run, kept in
        the state). Each reader reads whole streams when ranks x workers divides it.
    remainder
        ``"pad"`` (repeat up to ranks-1 samples so every rank gets as many) or ``"drop"``.
    cache_bytes
        Bytes of shards each reader holds (loaded and prefetched), beyond the shards in use.
    prefetch
        Shards loaded ahead by background threads.
    io_threads
        Background loader threads per reader.
    buffer_dir
        A tmpfs directory of reusable memory, shared by this user's readers on the node:
        remote shards are received into its ``slot-N`` files, and
        :class:`dataloaders.DataLoader` workers put batch fields in its ``batch-N``
        arenas. Both stay resident between epochs and runs, so no batch or shard first
        faults in fresh memory (~3 CPU-s per GiB in VMs that return freed memory to the
        host). ``"auto"``: ``$DATALOADERS_BUFFER_DIR`` if set (empty: none), else
        ``/dev/shm/dataloaders-<uid>``; ``None`` for private memory. Local shard files are
        mapped and never use it.
    buffer_dir_bytes
        Bytes ``buffer_dir`` may hold, for all readers of the node together (default 1/8
        of its file system); a reader past it uses private memory. Files nobody used for
        10 minutes are deleted (node cache files: 1 hour).
    node_cache
        Keep each remote shard file in ``buffer_dir`` once its manifest checksum has
        passed, and read it from there (mapped, nothing sent over the network) when any
        reader of this user on the node needs it again: the next epoch's workers, the next
        run, another rank. Within ``buffer_dir_bytes``, least recently used first out.
        Needs ``verify`` (the checksums vouch for what is kept) and a ``buffer_dir``; local
        files are never kept (the page cache has them).
    verify
        Check every shard file's size and xxh3 checksum against the manifest.
    transform
        Applied to each sample dict (must pickle, for worker processes).
    storage_options
        Passed to fsspec (e.g. ``{"cluster": path}`` for iosvc).

    Notes
    -----
    **Fork rule.** gRPC (iosvc's control plane) does not survive ``fork()`` once used.
    Readers need none when the cluster file lists the servers' endpoints (``iosvc up`` and
    multi-node clusters write them): metadata and chunks then go over the data ports, so a
    parent that has only read (``len()``, ``state_dict()``, its own reads) may still fork
    its workers. A parent that has used gRPC (it wrote, or its cluster file lists no
    endpoints) must start them with ``multiprocessing_context="forkserver"`` (or
    ``"spawn"``), which :class:`dataloaders.DataLoader` does by itself when it is needed.

    **Epochs.** An exhausted iteration advances the epoch of the copy that ran it (the
    main process's with ``num_workers=0``, each persistent worker's otherwise). With a plain
    ``DataLoader`` and non-persistent workers call :meth:`set_epoch` each epoch (as with
    ``DistributedSampler``), or use :class:`dataloaders.DataLoader`, which does it.
    """

    def __init__(
        self,
        url: str,
        *,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        shuffle_window: float = 2.0,
        num_canonical: int | None = None,
        remainder: str = "pad",
        cache_bytes: int = 512 << 20,
        prefetch: int = 2,
        io_threads: int = 2,
        buffer_dir: str | None = "auto",
        buffer_dir_bytes: int | None = None,
        node_cache: bool = True,
        verify: bool = True,
        transform: Callable[[Sample], Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if remainder not in ("pad", "drop"):
            raise ValueError(f"remainder must be 'pad' or 'drop', not {remainder!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.url = url
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.shuffle_window = shuffle_window
        self.num_canonical = num_canonical
        self.remainder = remainder
        self.cache_bytes = cache_bytes
        self.prefetch = prefetch
        self.io_threads = io_threads
        self.buffer_dir = buffer_dir
        self.buffer_dir_bytes = buffer_dir_bytes
        self.node_cache = node_cache
        self.verify = verify
        self.transform = transform
        self.epoch = 0
        self._source = _Source(url, storage_options, None)
        self._resume_position = 0  # where the current epoch starts (after a resume)
        self._order_block: int | None = None  # the block of the resumed epoch's order
        self._prepared: _Reading | None = None  # see prepare()
        self._fingerprint: str | None = None  # of the manifest a loaded state came from
        self._taken = 0  # samples this process has yielded in the current epoch
        self._in_epoch = False
        self._collated_batches = 0  # >0: yield collated batches of this size (DataLoader)
        self._drop_last = False
        self._batch_arenas = False  # batch fields in a BatchArena (DataLoader workers)
        self._arena: tuple[int, BatchArena | None] | None = None  # (pid, arena)

    # ------------------------------------------------------------------ properties
    @property
    def manifest(self) -> Manifest:
        """The dataset's manifest (read on first use)."""
        manifest = self._source.manifest
        if self._fingerprint is not None and manifest.fingerprint() != self._fingerprint:
            raise ManifestError(
                f"{self.url}: the shards differ from those of the loaded state "
                "(the dataset was rewritten); cannot resume exactly"
            )
        return manifest

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order for the next iteration (from its start)."""
        if epoch != self.epoch:
            self._resume_position = 0
            self._order_block = None
        self.epoch = epoch

    def _block(self) -> int:
        return self.batch_size or 1

    def _canonical(self, world: World) -> int:
        return self.num_canonical or world.partitions

    def _plan(self, world: World) -> Plan:
        return plan(
            self.manifest.samples,
            self._resume_position,
            world.world_size,
            self._block(),
            self.remainder,
        )

    def __len__(self) -> int:
        """Samples this rank gets in the current epoch (from the resume point, if any)."""
        return self._plan(World.detect()).per_rank

    def order(self, epoch: int | None = None, *, canonical: int | None = None) -> np.ndarray:
        """The global sample order of ``epoch`` (default: the current one)."""
        key = self._order_key(epoch, canonical)
        cached: tuple[tuple[Any, ...], np.ndarray] | None = getattr(self, "_order_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        order = self._epoch_order(key)
        order.setflags(write=False)
        self._order_cache = (key, order)  # for the next call with the same arguments
        return order

    def _order_key(self, epoch: int | None, canonical: int | None = None) -> tuple[Any, ...]:
        block = self._order_block if self._order_block is not None else self._block()
        return (
            self.seed,
            self.epoch if epoch is None else epoch,
            self.shuffle,
            self.shuffle_window,
            canonical or self._canonical(World.detect()),
            block,
        )

    def _epoch_order(self, key: tuple[Any, ...], at: np.ndarray | None = None) -> np.ndarray:
        kwargs = dict(zip(_ORDER_ARGS, key, strict=True))  # key: see _order_key
        return epoch_order(self.manifest.counts, at=at, **kwargs)

    def _ids_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Sample ids at ``positions`` of ``epoch``: from the whole order if it was computed
        already, else only the shuffle windows they draw from (a reader's own streams: each
        of 2 workers sorts half the windows, in parallel, on its way to its first batch)."""
        key = self._order_key(epoch)
        cached: tuple[tuple[Any, ...], np.ndarray] | None = getattr(self, "_order_cache", None)
        if cached is not None and cached[0] == key:
            return sample_ids(cached[1], positions)
        return self._epoch_order(key, at=positions)

    # ------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:
        batch = self._collated_batches
        if not batch:
            yield from self._samples()
            return
        if self.transform is None:
            yield from self._batches(batch)
            return
        # Batches made here (dataloaders.DataLoader's fast path): one object per batch through
        # the DataLoader's machinery instead of one per sample, collated by field kind.
        buffer: list[Any] = []
        for sample in self._samples():
            buffer.append(sample)
            if len(buffer) == batch:
                yield self._collate(buffer)
                buffer = []
        if buffer and not self._drop_last:
            yield self._collate(buffer)

    def _batches(self, batch: int) -> Iterator[Any]:
        """Collated batches gathered shard by shard (``DecodedShard.take``): array fields are
        decoded straight into the batch instead of sample by sample, then stacked. The same
        batches, in the same order, as collating the samples of :meth:`_samples`."""
        pending: list[tuple[DecodedShard, int]] = []
        for pair in self._sample_refs():
            pending.append(pair)
            if len(pending) == batch:
                yield self._gather(pending)
                pending = []
        if pending and not self._drop_last:
            yield self._gather(pending)

    def _gather(self, refs: list[tuple[DecodedShard, int]]) -> Any:
        fields = self.manifest.fields
        # One take per shard the batch draws from (a shuffle window mixes a few shards), then
        # each sample's row goes back to its place in the batch.
        groups: dict[int, tuple[DecodedShard, list[int], list[int]]] = {}
        for pos, (shard, j) in enumerate(refs):
            group = groups.get(id(shard))
            if group is None:
                group = groups[id(shard)] = (shard, [], [])
            group[1].append(pos)
            group[2].append(j)
        n = len(refs)
        out: dict[str, Any] = {}
        # Numeric fields are decoded (arrays) or written straight into their batch columns:
        # in a worker, a slot of its batch arena (dataloaders._arena: memory reused batch
        # after batch), else shared memory as default_collate allocates it. No per-shard
        # arrays to copy from, and no copy into shared memory when the batch is sent.
        numeric = [spec for spec in fields if spec.kind in _NUMERIC]
        shapes = [((n, *(spec.shape or ())), _column_dtype(spec)) for spec in numeric]
        # Blob fields go into the arena slot too where the shard says where they lie (raw
        # shards): one copy each, instead of bytes objects pickled through the result pipe.
        spans = self._blob_spans(groups.values(), fields) if self._batch_arenas else {}
        lengths = {name: _span_lengths(n, parts) for name, parts in spans.items()}
        extra = sum(blobs_bytes(n, int(sizes.sum())) for sizes in lengths.values())
        slot = self._arena_batch(shapes, extra)
        if slot is not None:
            for name, parts in spans.items():
                ends, dst, out[name] = slot.blobs(lengths[name])
                at = ends.tolist()
                for positions, src, starts, stops in parts:
                    for pos, a, b in zip(positions, starts.tolist(), stops.tolist(), strict=True):
                        dst[at[pos] : at[pos + 1]] = src[a:b]
        columns: dict[str, np.ndarray] = {}
        for spec, (shape, dtype) in zip(numeric, shapes, strict=True):
            if slot is not None:
                columns[spec.name], out[spec.name] = slot.array(shape, dtype)
            else:
                out[spec.name] = _batch_tensor(shape, dtype)
                columns[spec.name] = out[spec.name].numpy()
        for spec in numeric:
            if spec.kind == "array":
                rows = columns[spec.name]
                for shard, positions, js in groups.values():
                    shard.take_into(js, spec, rows, positions)
        in_slot = spans if slot is not None else {}  # blob columns copied above
        others = [spec for spec in fields if spec.kind != "array" and spec.name not in in_slot]
        parts = [
            (positions, shard.take(js, others) if others else {})
            for shard, positions, js in groups.values()
        ]
        for spec in others:
            column = columns.get(spec.name)
            values: Any = column if column is not None else [None] * n
            for positions, taken in parts:
                if column is not None:
                    column[positions] = taken[spec.name]
                    continue
                for pos, value in zip(positions, taken[spec.name], strict=True):
                    values[pos] = value
            if column is None:
                out[spec.name] = values
        return {spec.name: out[spec.name] for spec in fields}  # in the manifest's order

    def _collate(self, samples: list[Any]) -> Any:
        """What ``default_collate`` makes of ``samples``, faster for the known fields."""
        if self.transform is not None or not isinstance(samples[0], dict):
            return default_collate(samples)
        out: dict[str, Any] = {}
        for spec in self.manifest.fields:
            values = [s[spec.name] for s in samples]
            if spec.kind in ("bytes", "str"):
                out[spec.name] = values
            elif spec.kind == "int":
                out[spec.name] = torch.tensor(values, dtype=torch.int64)
            elif spec.kind == "float":
                out[spec.name] = torch.tensor(values, dtype=torch.float64)
            else:  # arrays: default_collate stacks into shared memory inside workers
                out[spec.name] = default_collate(values)
        return out

    def _samples(self) -> Iterator[Any]:
        transform = self.transform
        for shard, j in self._sample_refs():
            sample = shard.sample(j)
            yield sample if transform is None else transform(sample)

    def prepare(self) -> None:
        """Plan this reader's epoch and start loading its first shards now, before the
        first ``next()``. :class:`dataloaders.DataLoader` calls it as each worker starts:
        a worker otherwise idles until the loader hands it its first request, and only
        then plans and loads (~10 ms of the first batch here). Used by the next iteration
        if nothing changed meanwhile (epoch, resume point), else let go."""
        self._drop_prepared()
        self._prepared = self._start_reading()

    def _drop_prepared(self) -> None:
        if self._prepared is not None:
            self._prepared.prefetcher.close()
            self._prepared = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_prepared"] = None  # threads and open shards stay in their process
        state["_arena"] = None
        return state

    def _start_reading(self) -> _Reading:
        world = World.detect()
        if world.num_workers > 1 and self.batch_size is None:
            raise ValueError(
                "StreamingDataset with several DataLoader workers needs batch_size= (the "
                "DataLoader's), or use dataloaders.DataLoader, which sets it"
            )
        if world.num_workers > 1 or world.worker > 0:
            _blosc_single_threaded()
        manifest = self.manifest
        epoch = self.epoch
        if self.num_canonical is None:
            self.num_canonical = world.partitions
        the_plan = self._plan(world)
        positions = the_plan.positions(world.rank, world.worker, world.num_workers)
        ids = self._ids_at(epoch, positions)
        counts = manifest.counts
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # The shard of each sample id by table lookup (a searchsorted took 4 ms here).
        shard_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)[ids]
        local = ids - starts[shard_of]
        # First and last use of each shard in this reader's sequence, in O(samples): of
        # repeated indices in a fancy assignment the last one wins (no sort on the way to
        # the first batch).
        steps = np.arange(len(shard_of), dtype=np.int64)
        first_use = np.full(len(counts), len(shard_of), dtype=np.int64)
        first_use[shard_of[::-1]] = steps[::-1]
        last_use = np.full(len(counts), -1, dtype=np.int64)
        last_use[shard_of] = steps
        used = np.flatnonzero(last_use >= 0)
        sequence = used[np.argsort(first_use[used], kind="stable")].tolist()
        # The shards of the first batch: loaded before anything further ahead.
        block = self._block()
        first_batch = int(np.count_nonzero(first_use < block))
        # Shards in use (about a shuffle window) + loading ahead: their buffers are reused.
        fetcher = self._source.fetcher(
            self.verify,
            keep_buffers=int(self.shuffle_window) + 2 + self.prefetch,
            slots=self._slots(),
            node_cache=self.node_cache,
        )
        shards = manifest.shards
        fetcher.expect([shards[i] for i in sequence])
        prefetcher = ShardPrefetcher(
            lambda i: fetcher.load(shards[i]),
            sequence,
            [s.bytes for s in shards],
            budget=self.cache_bytes,
            ahead=self.prefetch,
            threads=self.io_threads,
            first=first_batch,
        )
        return _Reading(
            self._reading_key(),
            shard_of,
            local,
            last_use.tolist(),
            prefetcher,
            min(block, len(ids)),
        )

    def _slots(self) -> SlotDirectory | None:
        return _slot_directory(self.buffer_dir, self.buffer_dir_bytes)

    def _arena_batch(
        self, fields: list[tuple[tuple[int, ...], np.dtype[Any]]], extra: int = 0
    ) -> Any:
        """A slot of this worker's batch arena for a batch of ``fields`` and ``extra`` bytes
        of blob columns, or None (no arena: not a DataLoader worker, arenas off, no slot
        directory or no free slot)."""
        if not self._batch_arenas or not (fields or extra):
            return None
        pid = os.getpid()
        if self._arena is None or self._arena[0] != pid:  # forked: not the parent's arena
            slots = self._slots()
            in_worker = torch.utils.data.get_worker_info() is not None
            self._arena = (pid, BatchArena(slots) if slots and in_worker else None)
        arena = self._arena[1]
        return arena.batch(batch_bytes(fields) + extra) if arena is not None else None

    @staticmethod
    def _blob_spans(groups: Any, fields: Sequence[Any]) -> dict[str, list[Any]]:
        """Bytes fields -> [(batch rows, buffer, starts, stops)] per shard group, for the
        fields every shard of the batch can locate (:meth:`DecodedShard.blob_spans`)."""
        out: dict[str, list[Any]] = {}
        for spec in fields:
            if spec.kind != "bytes":
                continue
            parts = []
            for shard, positions, js in groups:
                span = shard.blob_spans(js, spec)
                if span is None:
                    break
                parts.append((positions, *span))
            else:
                out[spec.name] = parts
        return out

    def _reading_key(self) -> tuple[Any, ...]:
        return (self.epoch, self._resume_position, self.num_canonical, self.seed, self.shuffle)

    def _sample_refs(self) -> Iterator[tuple[DecodedShard, int]]:
        """(decoded shard, index in it) of each sample this reader yields, in order."""
        reading = self._prepared
        if reading is None or reading.key != self._reading_key():
            self._drop_prepared()  # planned for another epoch or resume point
            reading = self._start_reading()
        self._prepared = None
        epoch = self.epoch
        prefetcher, last, warm_at = reading.prefetcher, reading.last_use, reading.warm_at
        self._in_epoch = True
        self._taken = 0
        loaded: dict[int, DecodedShard] = {}
        try:
            for k, (s, j) in enumerate(_pairs(reading.shard_of, reading.local)):
                if k == warm_at:  # the first batch is made (and on its way)
                    prefetcher.warm()
                shard = loaded.get(s)
                if shard is None:
                    shard = loaded[s] = prefetcher.get(s)
                if last[s] == k:
                    # Released for the cache's budget; the reference held here keeps the
                    # decoded bytes alive until this sample is used.
                    del loaded[s]
                    prefetcher.release(s)
                self._taken += 1
                yield shard, j
        finally:
            prefetcher.close()
            self._in_epoch = False
            self._source.drop_buffers()  # not held between epochs
        self._finish_epoch(epoch)

    def _finish_epoch(self, epoch: int) -> None:
        """The epoch ``epoch`` was read to its end: the next iteration starts the next one."""
        if self.epoch == epoch:
            self.epoch = epoch + 1
            self._resume_position = 0
            self._order_block = None
            self._taken = 0

    # ----------------------------------------------------------------------- state
    def state_dict(self, taken: int | None = None) -> dict[str, Any]:
        """Where the run is: enough to resume exactly, on any number of ranks or workers.

        Parameters
        ----------
        taken
            Samples each rank has consumed in the current epoch. Default: what this
            process yielded (right with ``num_workers=0``; with workers, call
            :meth:`dataloaders.DataLoader.state_dict`, which counts batches).
        """
        world = World.detect()
        taken = self._taken if taken is None else taken
        position = self._plan(world).consumed(taken) if taken else self._resume_position
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": int(position),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
            "num_canonical": self._canonical(world),
            "block": self._order_block if self._order_block is not None else self._block(),
            "samples": self.manifest.samples,
            "fingerprint": self.manifest.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`) at the next iteration."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported StreamingDataset state version {state.get('version')}")
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.shuffle_window = float(state["shuffle_window"])
        self.num_canonical = int(state["num_canonical"])
        self._resume_position = int(state["position"])
        self._order_block = int(state["block"])
        self._fingerprint = state.get("fingerprint")
        self._taken = 0


class ShardedDataset(Dataset[Sample]):
    """Map-style access to a sharded dataset: ``ds[i]`` is sample ``i`` in write order.

    Shards are fetched whole (one batched read) and kept in an LRU cache of ``cache_bytes``;
    ``__getitems__`` (used by ``DataLoader`` for a batch) fetches the shards a batch needs in
    one call. Good for evaluation and for random access within a working set; to stream a
    dataset larger than the cache, use :class:`StreamingDataset`. Remote shard files also go
    to the node cache, shared by every reader of this user on the node (``buffer_dir``,
    ``buffer_dir_bytes`` and ``node_cache`` as for :class:`StreamingDataset`), so the
    DataLoader workers of a shuffled map-style epoch fetch each file over the network about
    once (workers that miss the same file at the same moment each fetch it).
    """

    def __init__(
        self,
        url: str,
        *,
        cache_bytes: int = 512 << 20,
        buffer_dir: str | None = "auto",
        buffer_dir_bytes: int | None = None,
        node_cache: bool = True,
        verify: bool = True,
        transform: Callable[[Sample], Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.cache_bytes = cache_bytes
        self.buffer_dir = buffer_dir
        self.buffer_dir_bytes = buffer_dir_bytes
        self.node_cache = node_cache
        self.verify = verify
        self.transform = transform
        self._source = _Source(url, storage_options, None)
        self._cache: OrderedDict[int, DecodedShard] = OrderedDict()
        self._held = 0
        self._starts: np.ndarray | None = None
        self._slots: SlotDirectory | None = None  # made on first use

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_held"] = 0
        return state

    @property
    def manifest(self) -> Manifest:
        return self._source.manifest

    def __len__(self) -> int:
        return self.manifest.samples

    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for {n} samples")
        index %= n
        if self._starts is None:
            self._starts = np.concatenate([[0], np.cumsum(self.manifest.counts)])
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, index - int(self._starts[shard])

    def _keep(self, shard: int, decoded: DecodedShard) -> None:
        self._cache[shard] = decoded
        self._held += decoded.nbytes
        while self._held > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._held -= old.nbytes

    def _shards(self, wanted: Sequence[int]) -> dict[int, DecodedShard]:
        out: dict[int, DecodedShard] = {}
        missing = []
        for shard in dict.fromkeys(wanted):
            cached = self._cache.get(shard)
            if cached is None:
                missing.append(shard)
            else:
                self._cache.move_to_end(shard)
                out[shard] = cached
        if missing:
            if self._slots is None:
                self._slots = _slot_directory(self.buffer_dir, self.buffer_dir_bytes)
            fetcher = self._source.fetcher(
                self.verify, slots=self._slots, node_cache=self.node_cache
            )
            for shard in missing:
                decoded = fetcher.load(self.manifest.shards[shard])
                self._keep(shard, decoded)
                out[shard] = decoded
        return out

    def __getitem__(self, index: int) -> Any:
        shard, local = self._locate(index)
        sample = self._shards([shard])[shard].sample(local)
        return sample if self.transform is None else self.transform(sample)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        located = [self._locate(i) for i in indices]
        shards = self._shards([s for s, _ in located])
        out = [shards[s].sample(j) for s, j in located]
        return out if self.transform is None else [self.transform(x) for x in out]

"""Shard fetching: checksummed reads, and a prefetching cache bounded in bytes.

A reader knows its whole future (the epoch order is computed up front), so the cache needs no
guessing: it loads shards in order of first use, a few ahead, on background threads, and frees
each one right after its last use (Belady's optimal eviction). ``budget`` bounds the bytes held,
except that the shards the reader needs *now* are always loaded (a shuffle window larger than
the budget slows the reader down instead of deadlocking it).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import xxhash
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from dataloaders._blocks import BlockChecker
from dataloaders._errors import ShardCorrupted, ShardNotFound
from dataloaders._formats import DecodedShard, get_format
from dataloaders._fs import is_local, join
from dataloaders._manifest import FileEntry, Manifest, ShardEntry
from dataloaders._slots import SlotDirectory, SlotMap

__all__ = ["BufferPool", "ShardFetcher", "ShardPrefetcher"]

POOLED_MIN = 1 << 20  # files smaller than this are read into fresh buffers
#: Files whose metadata one lookup asks at most (the first shard's and those of the next).
LOOKUP_AHEAD = 256
#: Seconds metadata asked ahead stays usable; older, it is asked again, and the reader looks
#: less far ahead. Within the servers' grace for replaced versions (5 s) the version it names
#: is surely still there to read; a version dropped later is found missing and its shard read
#: the plain way (the manifest's checksums catch a dataset rewritten meanwhile either way).
LOOKUP_MAX_AGE = 4.0
_ROUND = 4096  # pages


def _fresh_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of private anonymous memory, in huge pages where the kernel has them.

    A fresh 64 MiB ``bytearray`` took 25-31 ms of page faults to fill here (16k faults, each
    costly in a VM); the same memory with ``MADV_HUGEPAGE`` (THP in ``madvise`` mode, the
    default of many distributions) 3.5-5 ms (32 faults). A full ``iosvc://`` images epoch
    over gRPC: 226k -> ~50k page faults per worker, ~40k -> ~44k samples/s (4 alternating
    pairs).
    """
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):
            buf.madvise(advice)
    return buf


class BufferPool:
    """Reusable read buffers for whole shard files.

    A fresh 64 MiB buffer per shard costs 16k page faults to fill (a large part of a remote
    read's CPU in a VM); a buffer reused from a shard the reader is done with costs none.
    With ``slots``, new buffers are slot files that stay resident after this process (see
    :mod:`dataloaders._slots`), so the next epoch's or run's readers do not fault them in.
    A buffer is free when nothing but the pool refers to it: a decoded shard (and every
    memoryview, numpy or Arrow view of its bytes) holds a reference until it is gone, so a
    buffer is never overwritten while something can still read it.
    """

    def __init__(self, keep: int = 4, slots: SlotDirectory | None = None) -> None:
        self.keep = keep
        self.slots = slots  # new buffers are claimed here first (resident across processes)
        self.reused = 0  # buffers handed out again (a statistic)
        self._buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()
        # References to a buffer only the pool holds, counted as get() counts them (the
        # list, the loop variable, getrefcount's argument; interpreters differ).
        probe = [_fresh_buffer(_ROUND)]
        for buf in probe:
            self._free = sys.getrefcount(buf)

    def get(self, size: int) -> mmap.mmap:
        """A buffer of at least ``size`` bytes that nothing else refers to."""
        with self._lock:
            for buf in self._buffers:
                if sys.getrefcount(buf) <= self._free and size <= len(buf) <= 2 * size:
                    self.reused += 1
                    return buf
            # Room for the slightly larger shards that follow (sizes vary by a few %).
            length = -(-(size + size // 16) // _ROUND) * _ROUND
            buf = (self.slots.claim(length) if self.slots else None) or _fresh_buffer(length)
            if len(self._buffers) < self.keep:
                self._buffers.append(buf)
            else:  # replace a free buffer of the wrong size, if any
                for k in range(len(self._buffers)):
                    if self._is_free(k):
                        self._buffers[k] = buf
                        break
            return buf

    def forget(self, buf: mmap.mmap) -> None:
        """Never hand ``buf`` out again (its file now belongs to the node cache)."""
        with self._lock:
            self._buffers = [b for b in self._buffers if b is not buf]

    def _is_free(self, k: int) -> bool:
        for buf in self._buffers[k : k + 1]:  # counted as in get()
            return sys.getrefcount(buf) <= self._free + 1  # + the slice's reference
        return False

    def __len__(self) -> int:
        return len(self._buffers)


def _read_into_client(fs: Any) -> Any:
    """The client of an fsspec filesystem that reads a file into a caller's buffer.

    iosvc's filesystem carries its ``AsyncClient`` (``info_many`` + ``read_files``, which
    maps files on servers of this host; duck-typed, this package never imports iosvc). None
    for every other filesystem.
    """
    client = getattr(fs, "client", None)
    needs = ("info_many", "read_files")
    if getattr(fs, "async_impl", False) and all(callable(getattr(client, n, None)) for n in needs):
        return client
    return None


class _CacheCopy:
    """A node cache file this reader maps; ``content`` is the file's (its first ``size``
    bytes: the file may be a larger slot)."""

    __slots__ = ("content", "mapping")

    def __init__(self, mapping: SlotMap, size: int) -> None:
        self.mapping = mapping
        self.content = memoryview(mapping)[:size]


class ShardFetcher:
    """Reads and verifies the files of one shard, then decodes it."""

    def __init__(
        self,
        fs: Any,
        root: str,
        manifest: Manifest,
        url: str,
        verify: bool = True,
        pool: BufferPool | None = None,
        whole: bool = False,
        node_cache: SlotDirectory | None = None,
    ):
        self.fs = fs
        self.root = root
        self.manifest = manifest
        self.url = url
        self.verify = verify
        self.whole = whole  # verify every file whole at load, block checksums or not
        self.format = get_format(manifest.format)
        self.pool = pool
        self._client = _read_into_client(fs) if pool is not None else None
        # Remote files are kept in (and read from) the node cache, when the manifest's
        # checksums can vouch for what is kept; local files are the page cache's already
        # (and memory:// ones this process's).
        self.node_cache = node_cache if verify and not is_local(url) else None
        self.cache_hits = 0  # files mapped from the node cache (a statistic)
        # Metadata of files asked ahead (expect()): name -> (info, when asked); each used
        # once, and only while young; touched by the loop thread only.
        self._infos: dict[str, tuple[Any, float]] = {}
        self._used: set[str] = set()  # names whose shard was read: never kept again
        self._window = LOOKUP_AHEAD  # files one lookup may ask (halved when they go stale)
        self._upcoming: list[ShardEntry] = []
        self._looked_up = 0  # shards of _upcoming whose files were asked already

    async def _read_into(self, paths: list[str]) -> dict[str, Any]:
        client = self._client
        assert client is not None and self.pool is not None
        pool = self.pool
        # The files' metadata in one call per home server, then their bytes in one request
        # per server for them all (not one per file: a shard's small files cost as many
        # requests as its large one, and each request costs the client and its server).
        names = [self.fs._strip_protocol(path) for path in paths]
        # Taken before any await, so that no other shard's lookup can change them meanwhile.
        fresh = time.monotonic() - LOOKUP_MAX_AGE
        taken = {n: got for n in names if (got := self._infos.pop(n, None)) is not None}
        known = {n: got for n, got in taken.items() if got[1] >= fresh}
        if len(known) < len(taken):
            # Asked too early for this reader's pace: look less far ahead from now on.
            self._window //= 2
        self._used.update(names)
        missing = [name for name in names if name not in known]
        answers: dict[str, Any] = {name: got[0] for name, got in known.items()}
        if missing:
            asking = set(missing)
            room = self._window - len(missing)
            ahead = [n for n in self._names_ahead(room) if n not in asking]
            asked = missing + ahead
            found = await client.info_many(asked)
            now = time.monotonic()
            for name, info in zip(asked, found, strict=True):
                if name in asking:
                    answers[name] = info
                elif name not in self._used and not isinstance(info, Exception):
                    # Kept for a later shard (an error is asked again when it is needed).
                    self._infos[name] = (info, now)
        infos = [answers[name] for name in names]
        out: dict[str, Any] = {}
        wanted: list[tuple[str, Any]] = []
        for path, name, info in zip(paths, names, infos, strict=True):
            if isinstance(info, BaseException):
                out[path] = info
            elif info.get("type") != "file":
                out[path] = FileNotFoundError(f"{name} is not a file")
            else:
                wanted.append((path, info))

        def buffer(size: int) -> Any:
            return pool.get(size) if size >= POOLED_MIN else bytearray(size)

        # Files on servers of this host are mapped from their chunk files (nothing copied),
        # the others received into reused buffers. Chunk checksums only where the
        # manifest's are off: else those check the bytes end to end (of each block as it
        # is read, or of each file whole), so the files need not be read whole here first.
        got = await client.read_files(
            [info for _, info in wanted],
            buffer,
            map_from=POOLED_MIN,
            verify=not self.verify,
        )
        for (path, _), data in zip(wanted, got, strict=True):
            out[path] = data
        for path, data in out.items():
            if isinstance(data, FileNotFoundError):
                # Also a version replaced between info and read: the plain read retries it.
                try:
                    out[path] = await self.fs._cat_file(path)
                except Exception as exc:  # as fs.cat(on_error="return")
                    out[path] = exc
        return out

    def _read(self, paths: list[str]) -> dict[str, Any]:
        if isinstance(self.fs, LocalFileSystem):
            # Map local files instead of reading them: no fresh 64 MiB buffer to page-fault
            # in (costly in VMs), and the pages are the page cache's, not the worker's.
            out: dict[str, Any] = {}
            for path in paths:
                try:
                    with open(path, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        out[path] = (
                            memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                            if size
                            else b""
                        )
                except FileNotFoundError as exc:
                    out[path] = exc
            return out
        if self._client is not None:
            got: dict[str, Any] = sync(self.fs.loop, self._read_into, paths)
            return got
        got = self.fs.cat(paths, on_error="return")
        return got

    def _wanted(self, shard: ShardEntry) -> tuple[list[str], FileEntry | None, list[str]]:
        """The shard's data files, its block checksums file if it is read, and both."""
        rels = self.format.data_files(shard.name, self.manifest.fields)
        sums_file = shard.sums if self.verify and self.format.checks_blocks else None
        wanted = [*rels, sums_file.path] if sums_file is not None else rels
        return rels, sums_file, wanted

    def expect(self, shards: Sequence[ShardEntry]) -> None:
        """The shards about to be loaded, in order: the metadata of their files is asked
        ahead, with that of the first shard loaded (in batches of ``LOOKUP_AHEAD`` files),
        instead of one call per shard and server. Not with the node cache, whose copies
        need no metadata (asking it ahead would cost its warm epochs calls they do not
        make now)."""
        if self.node_cache is not None:
            return
        self._upcoming = list(shards)
        self._looked_up = 0

    def _names_ahead(self, room: int) -> list[str]:
        """Names (in the filesystem) of the files of the next expected shards, at most
        ``room`` of them."""
        out: list[str] = []
        while self._looked_up < len(self._upcoming):
            _, _, wanted = self._wanted(self._upcoming[self._looked_up])
            if len(out) + len(wanted) > room:
                break
            out += [self.fs._strip_protocol(join(self.root, rel)) for rel in wanted]
            self._looked_up += 1
        return out

    def _files(self, shard: ShardEntry) -> tuple[dict[str, Any], dict[str, BlockChecker]]:
        rels, sums_file, wanted = self._wanted(shard)
        # Block by block as the samples are read, or every file whole now.
        by_blocks = sums_file is not None and not self.whole
        paths = [join(self.root, rel) for rel in wanted]
        expected = {f.path: f for f in shard.all_files()}
        cached = self._cached(wanted, paths, expected, set(rels) if by_blocks else set())
        try:
            got = self._read([p for p in paths if p not in cached])
        except FileNotFoundError as exc:
            raise ShardNotFound(
                f"shard {shard.name} of {self.url}: a file is missing ({exc})"
            ) from None
        got.update({path: copy.content for path, copy in cached.items()})
        out: dict[str, Any] = {}
        for rel, path in zip(wanted, paths, strict=True):
            key = path if path in got else self.fs._strip_protocol(path)
            data = got.get(key)
            if isinstance(data, FileNotFoundError) or data is None:
                raise ShardNotFound(f"shard {shard.name} of {self.url}: {rel} is missing")
            if isinstance(data, BaseException):
                raise data
            entry = expected.get(rel)
            if entry is not None and self.verify:
                if len(data) != entry.size:
                    raise ShardCorrupted(
                        f"shard {shard.name} of {self.url}: {rel} has {len(data)} bytes, "
                        f"the manifest says {entry.size}"
                    )
                # Kept in the node cache only once checked whole; else checked block by
                # block as its samples are read, where the format allows it. (Node cache
                # copies: checked the same way, whole ones by _cached.)
                keep = None if path in cached else self._keepable(data)
                checked_later = (by_blocks and rel in rels and keep is None) or path in cached
                if not checked_later and xxhash.xxh3_64_hexdigest(data) != entry.xxh3_64:
                    raise ShardCorrupted(
                        f"shard {shard.name} of {self.url}: {rel} fails its xxh3 checksum "
                        "(corrupted or rewritten after the manifest)"
                    )
                if keep is not None:
                    self._keep(rel, entry, keep, data)
            out[rel] = data
        checks: dict[str, BlockChecker] = {}
        if sums_file is not None:
            sums = np.frombuffer(out.pop(sums_file.path), dtype="<u8")
            at = 0
            for rel in rels:
                n_blocks = -(-len(out[rel]) // shard.block)
                where = f"shard {shard.name} of {self.url}: {rel}"
                copy = cached.get(join(self.root, rel))
                dropped = None
                if copy is not None and self.node_cache is not None:
                    # A bad node cache copy must not stay: the next read fetches it anew.
                    where += f" (its node cache copy {copy.mapping.path}, now deleted)"
                    dropped = functools.partial(self.node_cache.drop, copy.mapping)
                checks[rel] = BlockChecker(
                    out[rel], sums[at : at + n_blocks], shard.block, where, dropped
                )
                at += n_blocks
            if at != len(sums):
                raise ShardCorrupted(
                    f"shard {shard.name} of {self.url}: {sums_file.path} holds {len(sums)} "
                    f"block checksums, its files have {at} blocks"
                )
            if self.whole:  # and the block checksums agree with the files
                for rel, check in checks.items():
                    check.check(0, len(out[rel]))
        return out, checks

    def _cache_key(self, rel: str, entry: FileEntry) -> str:
        """The node cache's name for the content ``entry`` of this dataset's ``rel``."""
        text = f"{self.url}\0{rel}\0{entry.size}\0{entry.xxh3_64}"
        return xxhash.xxh3_128_hexdigest(text.encode())

    def _cached(
        self,
        wanted: list[str],
        paths: list[str],
        expected: dict[str, FileEntry],
        by_blocks: set[str],
    ) -> dict[str, _CacheCopy]:
        """The files of ``wanted`` the node cache has: path -> their mapping. Files not in
        ``by_blocks`` (checked block by block as they are read) are checked whole here;
        a copy that fails is deleted, and the file read from its source instead."""
        out: dict[str, _CacheCopy] = {}
        if self.node_cache is None:
            return out
        for rel, path in zip(wanted, paths, strict=True):
            entry = expected.get(rel)
            if entry is None:
                continue
            mapped = self.node_cache.open_cached(self._cache_key(rel, entry), entry.size)
            if mapped is None:
                continue
            copy = _CacheCopy(mapped, entry.size)
            if rel not in by_blocks and xxhash.xxh3_64_hexdigest(copy.content) != entry.xxh3_64:
                self.node_cache.drop(mapped)
                continue
            out[path] = copy
            self.cache_hits += 1
        return out

    def _keepable(self, data: Any) -> Any:
        """What holds ``data`` if the node cache takes it (a slot it was received into, or
        bytes), else None. Not files mapped in place from a server on this host (on this
        node already), nor files received into private memory because the directory was
        full."""
        owner = data.obj if isinstance(data, memoryview) else data
        keepable = self.node_cache is not None and isinstance(owner, SlotMap | bytes | bytearray)
        return owner if keepable else None

    def _keep(self, rel: str, entry: FileEntry, owner: Any, data: Any) -> None:
        """Puts a file just read and checked whole into the node cache: its slot (``owner``)
        is renamed (no copy), bytes are copied into one."""
        assert self.node_cache is not None
        key = self._cache_key(rel, entry)
        try:
            if isinstance(owner, SlotMap):
                if self.pool is not None:
                    self.pool.forget(owner)  # no longer a buffer to reuse
                self.node_cache.publish(owner, key)
            else:
                self.node_cache.store(key, data)
        except OSError:
            pass  # the cache is an optimisation: a file not kept is read again next time

    def load(self, shard: ShardEntry) -> DecodedShard:
        """The decoded shard. Verified whole before decoding, or (``raw`` and ``arrays``
        shards with block checksums) block by block as its samples are read: either way no
        byte is used before it is verified."""
        files, checks = self._files(shard)
        try:
            return self.format.decode(
                shard.name, self.manifest.fields, files, shard.samples, checks or None
            )
        except ShardCorrupted as exc:
            named = f"shard {shard.name} of {self.url}: "
            if str(exc).startswith(named):  # a block check names it already
                raise
            raise ShardCorrupted(named + str(exc)) from None


class ShardPrefetcher:
    """Loads the shards of a known access sequence ahead of use, within a byte budget.

    Parameters
    ----------
    load
        Loads one shard by index (runs on the background threads).
    sequence
        Shard indices in order of first use.
    sizes
        Bytes each shard occupies once loaded (for the budget).
    budget
        Bytes of loaded shards to stay within (the shards in use are always allowed).
    ahead
        Shards loaded ahead of the one in use, at most.
    threads
        Background loader threads.
    first
        Shards the reader's first batch draws from (the first ``first`` of ``sequence``):
        these are loaded at once, and nothing further until :meth:`warm` is called, so the
        loads the first batch waits for have the cores to themselves (2 workers each loading
        2 shards ahead doubled the CPU on the way to the first batch).
    """

    def __init__(
        self,
        load: Callable[[int], DecodedShard],
        sequence: Sequence[int],
        sizes: Sequence[int],
        *,
        budget: int,
        ahead: int = 2,
        threads: int = 2,
        first: int = 0,
    ) -> None:
        self._load = load
        self._sequence = list(sequence)
        self._sizes = sizes
        self._budget = budget
        self._ahead = ahead
        self._first = first  # > 0 until warm(): load just the first batch's shards
        self._next = 0  # index in _sequence of the next shard to start loading
        self._futures: dict[int, Future[DecodedShard]] = {}
        self._held = 0
        self._in_use: set[int] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dataloaders-prefetch")
        self._closed = False
        self._pump()

    @property
    def held_bytes(self) -> int:
        return self._held

    def _start(self, shard: int) -> None:
        self._futures[shard] = self._pool.submit(self._load, shard)
        self._held += self._sizes[shard]

    def _pump(self, need: int | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            if need is not None and need not in self._futures:
                # Needed now: load it whatever the budget says. Shards first used earlier
                # have all been asked for already, so it is the next one in the sequence.
                while self._next < len(self._sequence) and self._sequence[self._next] != need:
                    self._next += 1
                self._next += 1
                self._start(need)
            while self._next < len(self._sequence):
                shard = self._sequence[self._next]
                if self._first:
                    if self._next >= self._first:
                        break
                else:
                    unused = len(self._futures) - len(self._in_use)
                    if unused >= self._ahead or self._held + self._sizes[shard] > self._budget:
                        break
                self._next += 1
                self._start(shard)

    def warm(self) -> None:
        """The first batch is made: load ahead as usual from now on."""
        if self._first:
            self._first = 0
            self._pump()

    def get(self, shard: int) -> DecodedShard:
        """The loaded shard (waits for it; raises its load error)."""
        self._pump(need=shard)
        with self._lock:
            self._in_use.add(shard)
            future = self._futures[shard]
        self._pump()
        return future.result()

    def release(self, shard: int) -> None:
        """The reader is done with ``shard``: free it and load further ahead."""
        with self._lock:
            future = self._futures.pop(shard, None)
            self._in_use.discard(shard)
            if future is not None:
                self._held -= self._sizes[shard]
                future.cancel()
        self._pump()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for future in self._futures.values():
                future.cancel()
            self._futures.clear()
            self._held = 0
        self._pool.shutdown(wait=False, cancel_futures=True)

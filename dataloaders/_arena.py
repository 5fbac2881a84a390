"""Batch arenas: a worker's batch fields in a slot file the main process maps.

Why: PyTorch sends each batch tensor of a worker in a fresh shared-memory segment, which the
main process maps (its descriptor passed over a socket) and frees when the batch is dropped.
Every batch is fresh memory, faulted in page by page: an epoch of 1 GiB of float32 arrays is
~262k page faults in the workers, about a quarter of the epoch's CPU on this project's VM
(sys time 1.1 -> 0.25 s, 37k -> 50-68k samples/s when the memory is reused). ``bytes``
fields went through the result pipe, pickled (3 copies). An arena is a few batch slots in
one file of the reader's slot directory (:mod:`dataloaders._slots`, ``batch-N``), reused
batch after batch and, being tmpfs, resident from one run to the next. Numeric fields are
written into a slot and mapped by the main process; blob columns are copied in once and
made into ``bytes`` by the main process.

Who may write a slot of an arena (the worker that holds the file's ``flock``) and when:

- its in-flight flag (a header byte) is 0: never sent, or received by the main process;
- and no process holds an OFD read lock on any of its bytes. The main process takes one on
  a batch's bytes when it receives the batch (before clearing the flag) and drops it when
  the last array or tensor of that batch is collected. Locks on bytes, not slot numbers,
  hold whatever slot layout a later owner of the file chooses. OFD locks belong to the open
  file, so the kernel drops them if the main process dies, however it dies.

A worker that claims an arena afresh (the last owner gone) gives it a new token and clears
the flags; read locks of a main process still holding older batches keep their bytes.
The main process checks the token of every batch it receives: a batch whose slot was
claimed again before it arrived is an error, never silently other data.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataloaders._huge import map_aligned
from dataloaders._slots import SlotDirectory

__all__ = ["ArenaRef", "BatchArena", "open_batch"]

_MAGIC = b"DLARENA1"
_HEADER = struct.Struct("<8sQQQ")  # magic, token, slot bytes, slot count
_FLAGS_AT = 64
_DATA_AT = 4096
_MAX_SLOTS = _DATA_AT - _FLAGS_AT
_FLOCK = "hhqqi4x"  # struct flock on Linux x86-64 and aarch64 (type, whence, start, len, pid)
_ALIGN = 64


def _lock(fd: int, kind: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0))


def _read_locked(fd: int, start: int, length: int) -> bool:
    """True if any open file (of any process) holds a read lock on a byte of the range."""
    probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    kind = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0]
    return bool(kind != fcntl.F_UNLCK)


def supported() -> bool:
    return hasattr(fcntl, "F_OFD_GETLK")


@dataclass(frozen=True, slots=True)
class ArenaRef:
    """A batch field in slot ``slot`` of the arena file ``path`` (what a worker sends
    instead of a tensor or a list of ``bytes``; :func:`open_batch` turns it back)."""

    path: str
    inode: int  # of the file: a file deleted and made again under the same name is another
    token: int
    slot: int
    offset: int  # in the file
    shape: tuple[int, ...]
    dtype: str  # of an array; "bytes": ``shape[0] + 1`` int64 offsets, then the blobs


class BatchArena:
    """A worker's arena: ``count`` reusable slots for whole batches (see module docstring)."""

    def __init__(self, slots: SlotDirectory, count: int = 6) -> None:
        self._dir = slots.of_kind("batch-")
        self._count = count
        self._file: tuple[str, mmap.mmap, int] | None = None  # path, mapping, probe fd
        self._retired: list[tuple[str, mmap.mmap, int]] = []  # outgrown files, kept claimed
        self._inode = 0
        self._slot_bytes = 0
        self._token = 0
        self._next = 0
        self._failed = False

    def _open(self, nbytes: int) -> bool:
        if self._failed:
            return False
        # Headroom: batches of blobs differ in size (a larger one later takes a larger file).
        slot_bytes = -(-(nbytes + nbytes // 4) // 4096) * 4096
        claimed = self._dir.claim_file(_DATA_AT + self._count * slot_bytes)
        if claimed is None:
            self._failed = True  # no room: this worker uses plain shared memory
            return False
        path, buf = claimed
        count = min((len(buf) - _DATA_AT) // slot_bytes, _MAX_SLOTS)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._token = int.from_bytes(os.urandom(8), "little")
        self._inode = os.fstat(fd).st_ino
        buf[_FLAGS_AT : _FLAGS_AT + count] = bytes(count)
        _HEADER.pack_into(buf, 0, _MAGIC, self._token, slot_bytes, count)
        self._file = (path, buf, fd)
        self._slot_bytes = slot_bytes
        return True

    def batch(self, nbytes: int) -> ArenaBatch | None:
        """A free slot for a batch of ``nbytes`` (fields aligned as :meth:`ArenaBatch.array`
        lays them out), or None: the caller uses plain shared memory for this batch."""
        if self._file is not None and nbytes > self._slot_bytes:
            # Outgrown: a larger file. This one stays claimed (for this process's life): its
            # batches in flight must not meet a new owner.
            self._retired.append(self._file)
            self._file = None
        if self._file is None and not self._open(nbytes):
            return None
        assert self._file is not None
        path, buf, fd = self._file
        count = _HEADER.unpack_from(buf, 0)[3]
        for i in range(count):
            k = (self._next + i) % count
            at = _DATA_AT + k * self._slot_bytes
            if buf[_FLAGS_AT + k] == 0 and not _read_locked(fd, at, self._slot_bytes):
                buf[_FLAGS_AT + k] = 1  # in flight until the main process receives it
                self._next = k + 1
                return ArenaBatch(path, self._inode, self._token, k, buf, at)
        return None


def _aligned(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    return -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN


def batch_bytes(fields: list[tuple[tuple[int, ...], np.dtype[Any]]]) -> int:
    """Bytes a batch of these (shape, dtype) fields takes in a slot."""
    return sum(_aligned(shape, dtype) for shape, dtype in fields)


class ArenaBatch:
    """One slot being filled: hands out its fields' arrays, one after the other."""

    def __init__(
        self, path: str, inode: int, token: int, slot: int, buf: mmap.mmap, offset: int
    ) -> None:
        self._path, self._inode, self._token, self._slot = path, inode, token, slot
        self._buf = buf
        self._at = offset

    def array(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[np.ndarray, ArenaRef]:
        """An array to fill in the slot, and the reference to send in its place."""
        count = int(np.prod(shape))
        out = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._at).reshape(shape)
        ref = ArenaRef(self._path, self._inode, self._token, self._slot, self._at, shape, dtype.str)
        self._at += _aligned(shape, dtype)
        return out, ref

    def blobs(self, lengths: np.ndarray[Any, Any]) -> tuple[np.ndarray, memoryview, ArenaRef]:
        """Room for a column of ``len(lengths)`` blobs: their end offsets (filled here), the
        bytes to copy them into (back to back) and the reference to send in their place."""
        n = len(lengths)
        ends = np.frombuffer(self._buf, dtype="<i8", count=n + 1, offset=self._at)
        ends[0] = 0
        np.cumsum(lengths, out=ends[1:])
        data_at = self._at + _aligned((n + 1,), ends.dtype)
        total = int(ends[-1])
        ref = ArenaRef(self._path, self._inode, self._token, self._slot, self._at, (n,), "bytes")
        self._at = data_at + _aligned((total,), np.dtype(np.uint8))
        return ends, memoryview(self._buf)[data_at : data_at + total], ref


def blobs_bytes(n: int, total: int) -> int:
    """Bytes a column of ``n`` blobs of ``total`` bytes takes in a slot."""
    return _aligned((n + 1,), np.dtype("<i8")) + _aligned((total,), np.dtype(np.uint8))


class _Reader:
    """The main process's side: maps arena files and holds a read lock per live batch."""

    def __init__(self) -> None:
        # By (path, inode): a file deleted (idle clean-up, `iosvc shards buffers --clear`) and
        # made again under its name is another file; the old one's descriptor stays open, as
        # its read locks may still guard batches in use.
        self._files: dict[tuple[str, int], tuple[int, mmap.mmap]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _mapping(self, ref: ArenaRef, end: int) -> tuple[int, mmap.mmap] | None:
        """The file of ``ref`` mapped to at least ``end``; None if it is not there any more."""
        if self._pid != os.getpid():  # forked: the parent's locks are not this process's
            self._files, self._pid = {}, os.getpid()
        key = (ref.path, ref.inode)
        got = self._files.get(key)
        if got is None:
            try:
                fd = os.open(ref.path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            if os.fstat(fd).st_ino != ref.inode:  # replaced since the batch was sent
                os.close(fd)
                return None
            got = (fd, _map_whole(fd))
            self._files[key] = got
        if len(got[1]) < end:
            got = (got[0], _map_whole(got[0]))
            self._files[key] = got
        return got

    def open(self, refs: list[tuple[str, ArenaRef]]) -> dict[str, Any]:
        """One batch's fields (all in one slot): tensors, which keep the slot read-locked
        until the last of them and every view of them is collected, and blob columns, copied
        out as ``bytes``."""
        first = refs[0][1]
        received = False
        with self._lock:
            mapped = self._mapping(first, _DATA_AT)
            if mapped is not None and _HEADER.unpack_from(mapped[1], 0)[1] == first.token:
                end = max(self._end(ref, mapped[1]) for _, ref in refs)
                fd, buf = self._mapping(first, end) or mapped
                start = min(ref.offset for _, ref in refs)
                # The bytes themselves are locked, whatever slot layout a later owner of
                # the file chooses: no owner writes over them until they are released.
                _lock(fd, fcntl.F_RDLCK, start, end - start)
                if _HEADER.unpack_from(buf, 0)[1] != first.token:  # claimed in between
                    _lock(fd, fcntl.F_UNLCK, start, end - start)
                else:
                    buf[_FLAGS_AT + first.slot] = 0  # received: the lock guards it now
                    received = True
        if not received:
            raise RuntimeError(
                f"batch slot {first.slot} of {first.path} was claimed by another reader "
                "before its batch arrived (a worker restarted under a running loader?)"
            )
        region = np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start)
        weakref.finalize(region, _release, fd, start, end - start)
        out: dict[str, Any] = {}
        for name, ref in refs:
            if ref.dtype == "bytes":  # copied out: a list of bytes, as default_collate gives
                n = ref.shape[0]
                a = ref.offset - start
                ends = region[a : a + (n + 1) * 8].view("<i8")
                data = a + _aligned((n + 1,), ends.dtype)
                mv = region.data
                bounds = (ends + data).tolist()
                out[name] = [mv[bounds[i] : bounds[i + 1]].tobytes() for i in range(n)]
                continue
            dtype = np.dtype(ref.dtype)
            count = int(np.prod(ref.shape))
            a = ref.offset - start
            view = region[a : a + count * dtype.itemsize].view(dtype).reshape(ref.shape)
            out[name] = torch.from_numpy(view)
        return out

    def _end(self, ref: ArenaRef, buf: mmap.mmap) -> int:
        """Where the field ``ref`` ends in its file (bytes columns: read from the file)."""
        if ref.dtype != "bytes":
            return ref.offset + _aligned(ref.shape, np.dtype(ref.dtype))
        n = ref.shape[0]
        if len(buf) < ref.offset + (n + 1) * 8:  # grown since mapped
            mapped = self._mapping(ref, ref.offset + (n + 1) * 8)
            assert mapped is not None
            buf = mapped[1]
        total = int(np.frombuffer(buf, dtype="<i8", count=1, offset=ref.offset + n * 8)[0])
        return ref.offset + blobs_bytes(n, total)


def _map_whole(fd: int) -> mmap.mmap:
    """The arena file ``fd`` mapped whole, where its huge pages (if any) map whole."""
    size = os.fstat(fd).st_size  # mapped at that size: a worker may grow the file meanwhile
    return map_aligned(lambda: mmap.mmap(fd, size), size)


def _release(fd: int, start: int, length: int) -> None:
    with contextlib.suppress(OSError):  # the file closed at exit: the lock went with it
        _lock(fd, fcntl.F_UNLCK, start, length)


_READER = _Reader()


def open_batch(batch: Any) -> Any:
    """``batch`` with its :class:`ArenaRef` fields turned into tensors (arrays and numbers)
    and lists of ``bytes`` (blobs); other batches as they are."""
    if not isinstance(batch, dict):
        return batch
    refs = [(name, value) for name, value in batch.items() if isinstance(value, ArenaRef)]
    if not refs:
        return batch
    return {**batch, **_READER.open(refs)}

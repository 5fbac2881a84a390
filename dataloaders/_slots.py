"""Read buffers that outlive their process: files in a node-wide tmpfs directory ("slots").

Why: a reader receives each remote shard into a buffer, and fresh memory pays a page fault
per page on its first touch. In VMs with free page reporting (``virtio_balloon``, common in
clouds) memory a process frees goes back to the host within seconds, and the next first
touch of it costs the host's fault: ~3 CPU-s per GiB measured here, 20x the guest's own
zeroing, up to half of a one-epoch ``iosvc://`` read. Pages of a tmpfs file stay resident
when the process that wrote them ends, so the next reader (the next epoch's workers, the
next run) receives into pages that exist already: the pre-registered buffer pool of RDMA
I/O, for page faults. Local files need none of this (their pages are the page cache's).

Each slot is a file ``slot-N``. A process claims one with an exclusive ``flock``, which its
mapping keeps (the lock belongs to the open file, and the mapping holds a duplicate of its
descriptor), so the kernel releases it when the buffer is dropped or the process ends,
however it ends. Slots are reserved with ``posix_fallocate``: a full tmpfs is a refused
claim (the caller falls back to private memory), never a ``SIGBUS`` on a write into the
mapping. On a tmpfs without ``huge=`` (``/dev/shm``), the whole 2 MiB pages of a new slot
(or of a slot's new part) are first collapsed into huge pages, and slot and cache files are
mapped at 2 MiB-aligned addresses where the kernel lets us (:mod:`dataloaders._huge`), so
that filling and mapping them cost what they do on a huge-page mount. All slots together
stay within ``budget`` bytes (checked at each claim; racing claims can pass it by a slot). A
slot nobody has claimed for ``idle`` seconds is deleted by the next claim, so the memory
returns to the node once its readers stop.

**Node cache.** A slot that received a remote shard file, once the file's manifest checksum
has passed, is renamed ``cache-<key>`` (:meth:`SlotDirectory.publish`): ``key`` names the
file's content (dataset URL, path, size and manifest checksum), so the next epoch's or run's
reader of the same file on this node maps it (:meth:`SlotDirectory.open_cached`) instead of
reading it over the network, as MosaicML streaming's and LitData's local caches do, but in
memory and within the same node-wide budget. A reader holds a shared ``flock`` on the cache
file it maps; a claim that finds the budget full takes over the least recently used cache
file nobody maps (exclusive ``flock``), given a slot name first (linked from its descriptor)
so its pages are reused and no crash leaves other bytes under a cache name. Names are only
renamed or unlinked by the holder of their file's exclusive lock, after checking that they
still name that file (see ``_names``). A process keeps its exclusive lock on a file it
published until it has dropped it, so no other process maps it before then. Cache files
nobody used for ``cache_idle`` seconds (1 h) are deleted by the next claim; a copy that fails
its checksum is deleted by the reader that found it (:meth:`SlotDirectory.drop`).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from dataloaders._huge import HUGE_PAGE, collapse_new_range, collapses_new_files, map_aligned

__all__ = ["KINDS", "SlotDirectory", "SlotFile", "SlotMap", "default_slot_dir"]

_PREFIX = "slot-"
CACHE_PREFIX = "cache-"
# Every kind of file (its name's prefix: what it is), for the budget and the idle clean-up.
KINDS = {_PREFIX: "shard buffer", "batch-": "batch arena", CACHE_PREFIX: "node cache"}
_KINDS = tuple(KINDS)
IDLE_S = 600.0
CACHE_IDLE_S = 3600.0  # longer: an epoch may take this long before it reads a file again


def default_slot_dir() -> str | None:
    """``$DATALOADERS_BUFFER_DIR`` if set (empty: none), else ``/dev/shm/dataloaders-<uid>``
    where ``/dev/shm`` is a writable directory, else None."""
    if "DATALOADERS_BUFFER_DIR" in os.environ:
        return os.environ["DATALOADERS_BUFFER_DIR"] or None
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK)):
        return None
    return os.path.join(shm, f"dataloaders-{os.getuid()}")


class SlotMap(mmap.mmap):
    """A shared mapping of a slot or cache file, which holds the file's ``flock`` while it
    is open; ``path`` names the file (it changes when the file is published to the node
    cache) and ``ino`` is its inode."""

    path: str
    ino: int


def _names(path: str, fd: int) -> bool:
    """Whether ``path`` is the file open as ``fd`` and its only name.

    Every rename and unlink here is done by a process holding the file's exclusive lock,
    after this check: a name seen before the lock may have been removed and given to
    another file meanwhile. A file under two names is one a take-over left half done
    (crashed between its link and its unlink): neither name is used until the idle
    clean-up removes the slot name.
    """
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    own = os.fstat(fd)
    return st.st_ino == own.st_ino and st.st_dev == own.st_dev and own.st_nlink == 1


def _unlink_if(path: str, ino: int) -> bool:
    """Unlinks ``path`` if it still names the file ``ino``; False if the name went to another
    file meanwhile (or is gone). Only the holder of that file's exclusive lock, or a reader
    that found the file bad, calls it."""
    try:
        if os.stat(path, follow_symlinks=False).st_ino != ino:
            return False
        os.unlink(path)
        return True
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class SlotFile:
    """One file of a slot directory, as :meth:`SlotDirectory.files` lists it."""

    name: str
    bytes: int  # memory it holds
    in_use: bool  # claimed by a reader now
    last_used: float  # when it was last claimed (epoch seconds)


class SlotDirectory:
    """Claims reusable buffer files in ``path`` (created private to this user).

    Parameters
    ----------
    path
        The directory; on tmpfs for the pages to be memory (any file system works, slower).
    budget
        Bytes all slots in ``path`` may occupy together (default: 1/8 of its file system).
    idle
        Seconds after which a slot nobody claimed is deleted.
    prefix
        Names of this kind of slot (``slot-`` for shard buffers); the budget counts all kinds.
    cache_idle
        Seconds after which a node cache file nobody used is deleted.
    """

    def __init__(
        self,
        path: str,
        budget: int | None = None,
        idle: float = IDLE_S,
        prefix: str = _PREFIX,
        cache_idle: float = CACHE_IDLE_S,
    ) -> None:
        self.path = path
        self.prefix = prefix  # kinds of slots in one directory: shard buffers, batch arenas
        self.idle = idle
        self.cache_idle = cache_idle
        self._budget = budget
        self._usable: bool | None = None
        self._collapse: bool | None = None  # see _collapses

    def of_kind(self, prefix: str) -> SlotDirectory:
        """The same directory and budget, for slots named ``prefix``-N."""
        kind = SlotDirectory(self.path, self._budget, self.idle, prefix, self.cache_idle)
        kind._collapse = self._collapse
        return kind

    @property
    def budget(self) -> int:
        if self._budget is None:
            st = os.statvfs(self.path)
            self._budget = st.f_frsize * st.f_blocks // 8
        return self._budget

    def _open_dir(self) -> bool:
        """Creates the directory (mode 0700); False if it is not this user's own."""
        if self._usable is None:
            try:
                os.makedirs(self.path, mode=0o700, exist_ok=True)
                st = os.lstat(self.path)
                # Another user's directory (or a link to one) must not receive our data.
                self._usable = st.st_uid == os.getuid() and (st.st_mode & 0o077) == 0
            except OSError:
                self._usable = False
        return self._usable

    def claim(self, size: int) -> SlotMap | None:
        """A shared mapping of between ``size`` and ``2 * size`` bytes of a slot this process
        now holds, or None (no usable directory, over budget, or the file system is full).
        The slot is released when the mapping is closed or collected."""
        claimed = self.claim_file(size)
        return claimed[1] if claimed is not None else None

    def claim_file(self, size: int) -> tuple[str, SlotMap] | None:
        """:meth:`claim`, with the slot file's path."""
        if size <= 0 or not self._open_dir():
            return None
        now = time.time()
        slots: list[tuple[int, str, int]] = []  # (bytes, name, blocks in bytes)
        cached: list[tuple[float, str, int, int]] = []  # (last used, name, bytes, blocks)
        used = 0  # by files of every kind
        with contextlib.suppress(OSError), os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.startswith(_KINDS) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        st = entry.stat(follow_symlinks=False)
                        is_cache = entry.name.startswith(CACHE_PREFIX)
                        idle = self.cache_idle if is_cache else self.idle
                        if now - st.st_mtime > idle and self._remove_if_unclaimed(entry.name):
                            continue
                        blocks = st.st_blocks * 512
                        used += blocks
                        if is_cache:
                            cached.append((st.st_mtime, entry.name, st.st_size, blocks))
                        elif entry.name.startswith(self.prefix):
                            slots.append((st.st_size, entry.name, blocks))
        # Best fit first: the smallest slot that holds `size`, then smaller ones to grow.
        fitting = sorted(s for s in slots if size <= s[0] <= 2 * size)
        smaller = sorted((s for s in slots if s[0] < size), reverse=True)
        for length, name, _ in [*fitting, *smaller]:
            grow = max(0, size - length)
            if grow and used + grow > self.budget:
                continue
            got = self._take(os.path.join(self.path, name), size, create=False)
            if got is not None:
                return got
        if used + size > self.budget:
            # Full: take over the least recently used cache file nobody maps, its pages
            # reused (shard buffers, where one is about the right size), else delete the
            # least recently used ones until there is room.
            cached.sort()
            for _, name, length, _ in cached if self.prefix == _PREFIX else ():
                if length <= 2 * size and used + max(0, size - length) <= self.budget:
                    got = self._take(os.path.join(self.path, name), size, create=False)
                    if got is not None:
                        return got
            for _, name, _, blocks in cached:
                if used + size <= self.budget:
                    break
                if self._remove_if_unclaimed(name):
                    used -= blocks
        if used + size > self.budget:
            return None
        for n in range(len(slots), len(slots) + 64):
            path = os.path.join(self.path, f"{self.prefix}{n}")
            if not os.path.lexists(path):
                got = self._take(path, size, create=True)
                if got is not None:
                    return got
        return None

    def _take(self, path: str, size: int, *, create: bool) -> tuple[str, SlotMap] | None:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError:  # claimed and removed, or created by another process first
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None  # another reader holds it
            if not _names(path, fd):
                return None  # removed (and maybe made again) since it was opened
            if os.path.basename(path).startswith(CACHE_PREFIX):
                # Taken over from the cache: a slot's name before a byte changes, so that
                # no crash leaves other bytes under the cache file's name.
                renamed = self._rename_to_slot(path, fd)
                if renamed is None:
                    return None
                path = renamed
            length = os.fstat(fd).st_size
            if length < size:
                if not self._grow(fd, length, size):
                    if create:
                        os.unlink(path)
                    return None
                length = size
            if length > 2 * size:
                return None  # taken by a bigger reader since the scan
            os.utime(fd)  # last claimed (for the idle clean-up)
            buf = self._map(lambda: SlotMap(fd, length), length)  # holds fd (the lock)
            buf.path, buf.ino = path, os.fstat(fd).st_ino
            return path, buf
        finally:
            os.close(fd)

    def _grow(self, fd: int, length: int, size: int) -> bool:
        """Grows the file ``fd`` from ``length`` to ``size`` bytes, reserved now (no ``SIGBUS``
        on a later write); False (and the file as it was) if the file system is full.

        On a tmpfs without huge pages, the whole 2 MiB pages of the new part are collapsed
        into huge pages first (:mod:`dataloaders._huge`): filling and mapping the slot then
        cost what they do on a ``huge=within_size`` mount."""
        try:
            start, end = -(-length // HUGE_PAGE) * HUGE_PAGE, size // HUGE_PAGE * HUGE_PAGE
            if start < end and self._collapses():
                os.ftruncate(fd, size)
                collapse_new_range(fd, start, end)
            os.posix_fallocate(fd, 0, size)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, length)
            return False
        return True

    def _map(self, make: Callable[[], SlotMap], length: int) -> SlotMap:
        """``make()``, at an address where huge pages are mapped whole if slots here are
        collapsed into them (elsewhere the kernel aligns by itself, or there are none)."""
        return map_aligned(make, length) if self._collapses() else make()

    def _collapses(self) -> bool:
        """Whether new slots here are collapsed into huge pages: on a tmpfs whose mount
        gives ``posix_fallocate`` 4 KiB pages (``never``, ``advise``)."""
        if self._collapse is None:
            self._collapse = collapses_new_files(self.path)
        return self._collapse

    def _rename_to_slot(self, path: str, fd: int) -> str | None:
        """Gives the cache file ``path`` (locked through ``fd``) a free ``slot-N`` name.

        Linked from the descriptor, not the name: a publisher may give the cache name to
        a newer copy at any moment (``rename`` replaces), and that copy must keep it."""
        own = f"/proc/self/fd/{fd}"  # linkat(AT_SYMLINK_FOLLOW) of it: this very file
        with contextlib.suppress(OSError):
            directory = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for n in range(4096):
                    name = f"{_PREFIX}{n}"
                    try:  # never replaces a file, unlike rename
                        os.link(own, name, src_dir_fd=directory, dst_dir_fd=directory)
                    except FileExistsError:
                        continue
                    _unlink_if(path, os.fstat(fd).st_ino)  # unless a newer copy has it
                    return os.path.join(self.path, name)
            finally:
                os.close(directory)
        return None

    # ------------------------------------------------------------------ node cache
    def open_cached(self, key: str, size: int) -> SlotMap | None:
        """A read-only mapping of the node cache's file ``key`` (at least ``size`` bytes,
        the first ``size`` of them its content), or None: not cached, or held by a process
        that is writing or has just published it. The mapping holds a shared lock on the
        file, so no claim takes it over while it is open."""
        if not self._open_dir():
            return None
        path = os.path.join(self.path, CACHE_PREFIX + key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            st = os.fstat(fd)
            # Still the file under that name: a claim may have taken this one over (and
            # filled it with other bytes) between the open and the lock.
            if not _names(path, fd) or st.st_size < size:
                return None
            os.utime(fd)  # last used, for the least-recently-used take-over
            buf = self._map(lambda: SlotMap(fd, st.st_size, access=mmap.ACCESS_READ), st.st_size)
            buf.path, buf.ino = path, st.st_ino
            return buf
        except OSError:
            return None
        finally:
            os.close(fd)

    def publish(self, buf: mmap.mmap, key: str) -> bool:
        """Renames the slot behind ``buf`` (a :meth:`claim`, filled with verified content)
        to the node cache's file ``key``; False if ``buf`` is not a slot or the rename
        failed. The caller must not write to ``buf`` again; other processes can map the
        file once ``buf`` is dropped."""
        if not isinstance(buf, SlotMap) or buf.closed or not buf.path.startswith(self.path):
            return False
        target = os.path.join(self.path, CACHE_PREFIX + key)
        try:
            if os.stat(buf.path, follow_symlinks=False).st_ino != buf.ino:
                return False  # not the name of this buffer's file (never expected)
            os.rename(buf.path, target)  # replaces an older copy of the same content
            os.utime(target, follow_symlinks=False)
        except OSError:
            return False
        buf.path = target
        return True

    def drop(self, buf: SlotMap) -> None:
        """Deletes the cache file ``buf`` maps (found corrupt), if its name is still its."""
        _unlink_if(buf.path, buf.ino)

    def store(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        """Copies ``data`` (verified content) into a new node cache file ``key``."""
        size = len(data)
        buf = self.of_kind(_PREFIX).claim(-(-max(size, 1) // 4096) * 4096)
        if buf is None:
            return False
        with buf:
            buf[:size] = data
            return self.publish(buf, key)

    def files(self) -> list[SlotFile]:
        """The slot files of every kind in the directory (none if it does not exist)."""
        out = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.path) as entries:
            for entry in entries:
                if not (entry.name.startswith(_KINDS) and entry.is_file(follow_symlinks=False)):
                    continue
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    out.append(
                        SlotFile(
                            entry.name, st.st_blocks * 512, self._claimed(entry.name), st.st_mtime
                        )
                    )
        return sorted(out, key=lambda f: f.name)

    def clear(self) -> int:
        """Delete every slot file no reader holds; the bytes freed. (A main process still
        holding batches of a deleted arena keeps them: its mapping outlives the name.)"""
        freed = 0
        for f in self.files():
            if not f.in_use and self._remove_if_unclaimed(f.name):
                freed += f.bytes
        return freed

    def _claimed(self, name: str) -> bool:
        try:
            fd = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        # Shared: never blocks a claim long; but cache files are held with shared locks.
        probe = fcntl.LOCK_EX if name.startswith(CACHE_PREFIX) else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, probe | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def _remove_if_unclaimed(self, name: str) -> bool:
        path = os.path.join(self.path, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return True  # gone already
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return _unlink_if(path, os.fstat(fd).st_ino)  # the name may be another's now
        except OSError:
            return False  # in use: not idle after all
        finally:
            os.close(fd)

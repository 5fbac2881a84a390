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
mapping. All slots together stay within ``budget`` bytes (checked at each claim; racing
claims can pass it by a slot). A slot nobody has claimed for ``idle`` seconds is deleted by
the next claim, so the memory returns to the node once its readers stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
from dataclasses import dataclass

__all__ = ["SlotDirectory", "SlotFile", "default_slot_dir"]

_PREFIX = "slot-"
_KINDS = (_PREFIX, "batch-")  # every kind of slot, for the budget and the idle clean-up
IDLE_S = 600.0


def default_slot_dir() -> str | None:
    """``$DATALOADERS_BUFFER_DIR`` if set (empty: none), else ``/dev/shm/dataloaders-<uid>``
    where ``/dev/shm`` is a writable directory, else None."""
    if "DATALOADERS_BUFFER_DIR" in os.environ:
        return os.environ["DATALOADERS_BUFFER_DIR"] or None
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK)):
        return None
    return os.path.join(shm, f"dataloaders-{os.getuid()}")


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
    """

    def __init__(
        self, path: str, budget: int | None = None, idle: float = IDLE_S, prefix: str = _PREFIX
    ) -> None:
        self.path = path
        self.prefix = prefix  # kinds of slots in one directory: shard buffers, batch arenas
        self.idle = idle
        self._budget = budget
        self._usable: bool | None = None

    def of_kind(self, prefix: str) -> SlotDirectory:
        """The same directory and budget, for slots named ``prefix``-N."""
        return SlotDirectory(self.path, self._budget, self.idle, prefix)

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

    def claim(self, size: int) -> mmap.mmap | None:
        """A shared mapping of between ``size`` and ``2 * size`` bytes of a slot this process
        now holds, or None (no usable directory, over budget, or the file system is full).
        The slot is released when the mapping is closed or collected."""
        claimed = self.claim_file(size)
        return claimed[1] if claimed is not None else None

    def claim_file(self, size: int) -> tuple[str, mmap.mmap] | None:
        """:meth:`claim`, with the slot file's path."""
        if size <= 0 or not self._open_dir():
            return None
        now = time.time()
        slots: list[tuple[int, str, int]] = []  # (bytes, name, blocks in bytes)
        used = 0  # by slots of every kind
        with contextlib.suppress(OSError), os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.startswith(_KINDS) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        st = entry.stat(follow_symlinks=False)
                        if now - st.st_mtime > self.idle and self._remove_if_unclaimed(entry.name):
                            continue
                        used += st.st_blocks * 512
                        if entry.name.startswith(self.prefix):
                            slots.append((st.st_size, entry.name, st.st_blocks * 512))
        # Best fit first: the smallest slot that holds `size`, then smaller ones to grow.
        fitting = sorted(s for s in slots if size <= s[0] <= 2 * size)
        smaller = sorted((s for s in slots if s[0] < size), reverse=True)
        for length, name, _ in [*fitting, *smaller]:
            grow = max(0, size - length)
            if grow and used + grow > self.budget:
                continue
            path = os.path.join(self.path, name)
            buf = self._take(path, size, create=False)
            if buf is not None:
                return path, buf
        if used + size > self.budget:
            return None
        for n in range(len(slots), len(slots) + 64):
            path = os.path.join(self.path, f"{self.prefix}{n}")
            if not os.path.lexists(path):
                buf = self._take(path, size, create=True)
                if buf is not None:
                    return path, buf
        return None

    def _take(self, path: str, size: int, *, create: bool) -> mmap.mmap | None:
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
            length = os.fstat(fd).st_size
            if length < size:
                try:
                    os.posix_fallocate(fd, 0, size)  # reserved now: no SIGBUS later
                except OSError:
                    if create:
                        os.unlink(path)
                    return None
                length = size
            if length > 2 * size:
                return None  # taken by a bigger reader since the scan
            os.utime(fd)  # last claimed (for the idle clean-up)
            return mmap.mmap(fd, length)  # holds a duplicate of fd, and so the lock
        finally:
            os.close(fd)

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
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: never blocks a claim long
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
            os.unlink(path)
            return True
        except OSError:
            return False  # in use: not idle after all
        finally:
            os.close(fd)

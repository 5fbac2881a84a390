"""2 MiB pages for tmpfs files on mounts without ``huge=`` (``/dev/shm``), with no admin.

Why: tmpfs keeps a file in 4 KiB pages unless its mount says ``huge=``, and filling or
mapping one pays a page-table entry (and a fault per 4 KiB written, per 64 KiB read). A
64 MiB file here (``bench/results/pages.json``): filled through a mapping in 46.6 ms (31.0 ms
when its pages exist), mapped and hashed in 14.0 ms, against 9.7 (6.1) and 2.3 ms collapsed
into 2 MiB pages. ``/dev/shm`` is mounted without ``huge=`` nearly everywhere, and only an
administrator can mount another tmpfs.

How: Linux 6.1 added ``MADV_COLLAPSE``, which moves a mapped range of a file into 2 MiB
pages at once, whatever the mount says (unless ``shmem_enabled`` is ``deny``).
:func:`collapse_new_range` does it for a new, empty range: one byte written per 2 MiB (the
kernel refuses a range of holes only), then the collapse, which copies those few 4 KiB
pages into new huge pages: ~4 ms per 64 MiB here when the memory is already backed by the
VM's host. Fresh memory costs the host's faults, as any first touch does (here up to
~150 ms per 64 MiB, free page reporting hands free 2 MiB blocks back to the host). The
file's pages stay huge for its life, for every later mapping by any process. The kernel
maps them whole only at addresses that agree with the file offset modulo 2 MiB, and it
does not align mappings of files on such mounts: :func:`map_aligned` steers them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = [
    "HUGE_PAGE",
    "MAP_FAILED",
    "collapse_new_range",
    "collapses_new_files",
    "huge_bytes",
    "libc",
    "map_aligned",
    "tmpfs_huge_pages",
]

HUGE_PAGE = 2 << 20
_ATTEMPTS = 8  # mappings made to fill older gaps before giving up on alignment
_SMAPS_BATCH = 256  # files mapped at once by huge_bytes
_M = TypeVar("_M", bound=mmap.mmap)
_MADV_COLLAPSE = 25  # <linux/mman.h>, Linux >= 6.1
_MADV_POPULATE_READ = 22  # Linux >= 5.14
_MAP_FIXED_NOREPLACE = 0x100000  # Linux >= 4.17 (older kernels take it for a hint)
_PROT_NONE, _PROT_READ = 0, 1
_MAP_SHARED, _MAP_PRIVATE, _MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value


# The libc calls the mmap module lacks (mapping at a chosen address, madvise of a range
# not mapped by it): this module's, and iosvc's client's (iosvc.client._mapped).
_SIGNATURES = {
    "mmap": (
        ctypes.c_void_p,
        [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long],
    ),
    "munmap": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]),
    "madvise": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]),
}


@functools.cache
def libc() -> Any | None:
    """libc with ``mmap``, ``munmap`` and ``madvise`` typed, on Linux; None elsewhere."""
    if sys.platform != "linux":
        return None
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
    except (OSError, AttributeError):
        return None
    return lib


@functools.cache
def _libc() -> Any | None:
    """:func:`libc`, on Linux with 2 MiB transparent huge pages (not e.g. arm64 with 64 KiB
    base pages, where they are 512 MiB); None elsewhere, and this module does nothing."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            if int(f.read()) != HUGE_PAGE:
                return None
    except (OSError, ValueError):
        return None
    return libc()


def tmpfs_huge_pages(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The ``huge=`` option of the tmpfs holding ``path`` (``always``, ``within_size`` or
    ``advise``), ``"never"`` for a tmpfs without it, None where ``path`` is not on a tmpfs.

    Why it matters: without it, tmpfs keeps files in 4 KiB pages, and mapping one costs a
    page-table entry per 4 KiB (with ``unmap`` the same again). Mapping and hashing a
    64 MiB file took 14.0 ms on ``/dev/shm`` here, 2.3 ms on a tmpfs mounted with
    ``huge=within_size`` (2 MiB pages); filling a new one through a mapping 46.6 ms against
    7.3 ms (``bench/results/pages.json``). Only an administrator can mount one
    (``mount -t tmpfs -o huge=within_size,size=..,mode=1777 tmpfs DIR``); readers then use
    it through ``$DATALOADERS_BUFFER_DIR``. Slots are reserved with ``posix_fallocate``,
    which takes huge pages only from ``within_size`` and ``always`` mounts; elsewhere (Linux
    >= 6.1) readers collapse new slots into huge pages themselves (:func:`collapse_new_range`).
    """
    try:
        target = os.path.realpath(path)
        while not os.path.exists(target):  # a directory not made yet: its parent's mount
            target = os.path.dirname(target)
        with open(mountinfo) as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    best: tuple[int, str | None] = (-1, None)
    for fields in mounts:
        # id parent major:minor root mount-point options [optional...] - type source super
        try:
            dash = fields.index("-", 6)
            fstype, super_options = fields[dash + 1], fields[dash + 3]
        except (ValueError, IndexError):
            continue  # not a line of the format above
        # Spaces, tabs, newlines and backslashes in paths are written as octal escapes.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best[0]:  # (the last of stacked mounts is seen)
            huge = None
            if fstype == "tmpfs":
                options = dict(o.partition("=")[::2] for o in super_options.split(","))
                huge = options.get("huge", "never")
            best = (len(point), huge)
    return best[1]


@functools.cache
def _kernel_collapses() -> bool:
    """Whether this kernel knows ``MADV_COLLAPSE`` (Linux 6.1): older ones are not asked
    (nor are files prepared for it) on every new file."""
    release = re.findall(r"\d+", os.uname().release)[:2]
    return tuple(int(n) for n in release) >= (6, 1)


def collapses_new_files(path: str) -> bool:
    """Whether new files in directory ``path`` should be collapsed into huge pages by
    their writer (:func:`collapse_new_range`): on a tmpfs whose mount gives them 4 KiB
    pages (``huge=never``, the default, or ``advise``), where the kernel can."""
    if _libc() is None or not _kernel_collapses():
        return False
    return tmpfs_huge_pages(path) in ("never", "advise")


def collapse_new_range(fd: int, start: int, end: int) -> bool:
    """Backs bytes ``[start, end)`` of the tmpfs file ``fd`` with 2 MiB pages; True if the
    kernel did so for all of it.

    ``start`` and ``end`` must be multiples of :data:`HUGE_PAGE` within the file's size,
    and the range must hold no data yet (a byte is written at each huge page's start).
    Best effort: where the kernel cannot (before Linux 6.1, not tmpfs, ``deny``, no huge
    page free), the range keeps whatever it had and the caller reserves it as before.
    """
    libc = _libc()
    length = end - start
    if (
        libc is None
        or not _kernel_collapses()
        or length <= 0
        or start % HUGE_PAGE
        or end % HUGE_PAGE
    ):
        return False
    try:
        for offset in range(start, end, HUGE_PAGE):
            os.pwrite(fd, b"\0", offset)  # a range of holes only is refused
    except OSError:
        return False
    with _aligned_mapping(libc, fd, start, length) as address:
        return address is not None and libc.madvise(address, length, _MADV_COLLAPSE) == 0


def huge_bytes(paths: Iterable[str]) -> int:
    """How many bytes of the tmpfs files ``paths`` are in 2 MiB pages, counted as the kernel
    maps them at aligned addresses (``ShmemPmdMapped``); 0 for files it cannot tell of."""
    if isinstance(paths, str):
        raise TypeError("huge_bytes takes paths, not one path")
    libc = _libc()
    if libc is None:
        return 0
    total = 0
    paths = list(paths)
    for at in range(0, len(paths), _SMAPS_BATCH):  # one read of smaps per batch of files
        with contextlib.ExitStack() as stack:
            mapped = (_map_huge_part(stack, libc, path) for path in paths[at : at + _SMAPS_BATCH])
            addresses = [address for address in mapped if address is not None]
            if not addresses:
                continue
            with open("/proc/self/smaps") as smaps:
                text = smaps.read()
        # Each mapping's header line, then its fields (this one in every kernel since 4.8).
        for address in addresses:
            found = re.search(
                rf"^{address:x}-[^\n]*\n(?:[A-Z][^\n]*\n)*?ShmemPmdMapped:\s+(\d+) kB", text, re.M
            )
            total += int(found[1]) * 1024 if found else 0
    return total


def _map_huge_part(stack: contextlib.ExitStack, libc: Any, path: str) -> int | None:
    """The address of the file ``path``'s whole 2 MiB pages, mapped (until ``stack`` closes)
    and its huge pages faulted in; None for a file of none or that cannot be mapped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        length = os.fstat(fd).st_size // HUGE_PAGE * HUGE_PAGE
        if not length:
            return None
        address: int | None = stack.enter_context(_aligned_mapping(libc, fd, 0, length))
        if address is not None:
            for offset in range(0, length, HUGE_PAGE):
                # Only 2 MiB that start with data (a huge page does): reading a hole of a
                # tmpfs file through a shared mapping would allocate a page in it. Faulted in
                # by madvise, which fails where a plain read would raise SIGBUS (a file cut
                # short meanwhile, a full tmpfs).
                with contextlib.suppress(OSError):
                    if os.lseek(fd, offset, os.SEEK_DATA) == offset:
                        libc.madvise(address + offset, HUGE_PAGE, _MADV_POPULATE_READ)
    finally:
        os.close(fd)  # the mapping keeps the file
    return address


_aligning = threading.Lock()


def _new_lock_after_fork() -> None:
    """A child forked while another thread held the lock would never see it released."""
    global _aligning
    _aligning = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def map_aligned(make: Callable[[], _M], length: int) -> _M:
    """``make()``, a mapping of ``length`` bytes that the kernel places itself (``mmap``
    with no address, as :class:`mmap.mmap` does), steered to a 2 MiB-aligned address.

    Why: the kernel maps a file's huge pages whole (one page-table entry for 2 MiB) only at
    an address that agrees with the file offset modulo 2 MiB, and it aligns mappings only
    for files on mounts with ``huge=``. Filling a collapsed 64 MiB slot through an aligned
    mapping took ~6 ms here, ~30 ms through an unaligned one (16k faults); mapping and
    hashing it ~3 against ~6 ms (dev timings). How: reserve ``length`` + 2 MiB of address
    space and free exactly ``length`` bytes of it at an aligned address. The kernel maps
    into the highest free gap that fits: that hole, unless an older gap above fits too; a
    mapping that lands in such a gap is kept (it fills the gap) while ``make`` is called
    again, up to 8 times, and closed after. Best effort: the result may still be unaligned
    (then merely slower).
    """
    libc = _libc()
    length = -(-length // mmap.PAGESIZE) * mmap.PAGESIZE
    if libc is None or length < HUGE_PAGE:
        return make()
    with _aligning, _aligned_hole(libc, length) as aligned:
        if aligned is None:
            return make()
        fillers: list[_M] = []
        try:
            for _ in range(_ATTEMPTS):
                made = make()
                if _address(made) == aligned:
                    return made
                fillers.append(made)
            return fillers.pop()
        finally:
            for filler in fillers:
                filler.close()


def _address(mapping: mmap.mmap) -> int:
    """Where ``mapping`` starts (read-only ones too, which ctypes cannot point into)."""
    import numpy as np  # here: iosvc servers import this module, and need no numpy

    return int(np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data)


@contextlib.contextmanager
def _aligned_mapping(libc: Any, fd: int, start: int, length: int) -> Iterator[int | None]:
    """A read-only shared mapping of ``fd``'s ``[start, start + length)`` at a 2 MiB-aligned
    address (None if it could not be made), unmapped on exit.

    The kernel maps and collapses huge pages only where the address and the file offset
    agree modulo 2 MiB; ``mmap`` of a file on a mount without ``huge=`` does not align.
    The mapping goes into a hole freed in a reservation, with ``MAP_FIXED_NOREPLACE``: it
    never replaces a mapping another thread may have made there meanwhile.
    """
    with _aligned_hole(libc, length) as aligned:
        if aligned is None:
            yield None
            return
        mapped = libc.mmap(
            aligned, length, _PROT_READ, _MAP_SHARED | _MAP_FIXED_NOREPLACE, fd, start
        )
        try:
            yield aligned if mapped == aligned else None
        finally:
            if mapped not in (None, MAP_FAILED):
                libc.munmap(mapped, length)  # where it is, even if a kernel took it for a hint


@contextlib.contextmanager
def _aligned_hole(libc: Any, length: int) -> Iterator[int | None]:
    """The 2 MiB-aligned address of exactly ``length`` free bytes, fenced by reserved
    address space on both sides until exit (None if none could be reserved): the highest
    free gap that fits ``length``, where the kernel places a mapping it is not told where to
    put, unless an older gap above fits too."""
    reserved = libc.mmap(None, length + HUGE_PAGE, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
    if reserved in (None, MAP_FAILED):
        yield None
        return
    aligned = (reserved + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = reserved + length + HUGE_PAGE
    libc.munmap(aligned, length)
    try:
        yield aligned
    finally:
        if aligned > reserved:
            libc.munmap(reserved, aligned - reserved)
        if end > aligned + length:
            libc.munmap(aligned + length, end - aligned - length)

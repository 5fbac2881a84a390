"""Steering mappings to 2 MiB-aligned addresses (dataloaders._huge); collapsing tmpfs files
into huge pages is tested with slots (test_slots.py) and arenas (test_arena.py)."""

from __future__ import annotations

import functools
import mmap
import os
import time
from pathlib import Path

import pytest

from dataloaders import _huge
from dataloaders._huge import HUGE_PAGE, _address, huge_bytes, map_aligned

from .helpers import tmpfs

MiB = 1 << 20
# Not a whole number of huge pages: the kernel aligns such anonymous mappings by itself.
LENGTH = 6 * MiB + 4096


def _anonymous() -> mmap.mmap:
    return mmap.mmap(-1, LENGTH)


def test_a_mapping_is_steered_past_an_older_gap_that_fits_it() -> None:
    # A gap that fits LENGTH but not the reservation (LENGTH + 2 MiB), between two guard
    # mappings, made last: the kernel's first choice for the mapping, at an address of its
    # own (not 2 MiB-aligned, as the gap is 1 MiB larger than the mapping).
    libc, guard, gap = _huge._libc(), 64 << 10, LENGTH + MiB
    region = libc.mmap(None, gap + 2 * guard, 0, 0x22, -1, 0)  # PROT_NONE, private anonymous
    assert region not in (None, _huge.MAP_FAILED)
    libc.munmap(region + guard, gap)
    got = []
    try:
        got = [map_aligned(_anonymous, LENGTH) for _ in range(4)]
        assert all(_address(m) % HUGE_PAGE == 0 for m in got)
        assert all(len(m) == LENGTH for m in got)
        for m in got:
            m[-1:] = b"x"  # ordinary, writable mappings of their whole length
    finally:
        for m in got:
            m.close()
        libc.munmap(region, guard)  # the guards only: the gap may hold other mappings now
        libc.munmap(region + guard + gap, guard)


def test_a_child_forked_while_the_lock_was_held_can_still_map() -> None:
    with _huge._aligning:  # as if another thread were mapping when the process forked
        pid = os.fork()
        if pid == 0:  # the child: would wait forever on the parent's lock
            ok = False
            try:
                ok = _address(map_aligned(_anonymous, LENGTH)) % HUGE_PAGE == 0
            finally:
                os._exit(0 if ok else 1)
    for _ in range(200):  # up to 10 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the child deadlocked on the lock it inherited")


def test_huge_bytes_takes_paths_and_skips_what_it_cannot_map() -> None:
    with pytest.raises(TypeError):
        huge_bytes("/dev/shm/one-path")
    assert huge_bytes(["/nonexistent/file"]) == 0


def test_huge_bytes_neither_fills_holes_nor_dies_on_a_full_tmpfs(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=4m") as mount:
        full, sparse = mount / "full", mount / "sparse"
        with open(full, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 4 * MiB)  # no room left
        with open(sparse, "wb") as f:
            f.truncate(4 * MiB)  # holes: reading them through a mapping would need pages
        assert huge_bytes([str(sparse), str(full)]) == 0  # 4 KiB pages; no SIGBUS
        assert sparse.stat().st_blocks == 0  # no page allocated in its holes


def test_a_kernel_before_6_1_is_not_asked_to_collapse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It does not know MADV_COLLAPSE: no file is prepared for it (a byte written per
    2 MiB) or mapped to ask, and no directory is said to collapse new files."""
    release = os.uname()
    old = os.uname_result((*release[:2], "5.15.0-91-generic", *release[3:]))
    monkeypatch.setattr(os, "uname", lambda: old)
    monkeypatch.setattr(
        _huge, "_kernel_collapses", functools.cache(_huge._kernel_collapses.__wrapped__)
    )
    writes: list[int] = []
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: writes.append(at))
    with open(tmp_path / "f", "w+b") as f:
        f.truncate(4 * MiB)
        assert not _huge.collapse_new_range(f.fileno(), 0, 4 * MiB)
    assert writes == []
    with tmpfs(tmp_path / "plain", "size=8m,mode=0700") as mount:
        assert not _huge.collapses_new_files(str(mount))

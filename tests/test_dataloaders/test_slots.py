"""Slot files: read buffers that stay resident across reader processes (dataloaders._slots)."""

from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dataloaders._cache
from dataloaders import DataLoader, StreamingDataset, write_shards
from dataloaders._cache import BufferPool
from dataloaders._huge import HUGE_PAGE, _address, huge_bytes, tmpfs_huge_pages
from dataloaders._slots import SlotDirectory, default_slot_dir

from .helpers import checked_images, needs_collapse, tmpfs

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def slot_path(tmp_path: Path) -> str:
    return str(tmp_path / "slots")


def _slots(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.startswith("slot-"))


def test_a_released_slot_is_claimed_again_and_a_held_one_is_not(slot_path: str) -> None:
    slots = SlotDirectory(slot_path, budget=64 * MiB)
    a = slots.claim(4 * MiB)
    b = slots.claim(4 * MiB)
    assert a is not None and b is not None and len(a) == len(b) == 4 * MiB
    assert _slots(slot_path) == ["slot-0", "slot-1"]  # a is held: b got its own file
    a[:5] = b"hello"
    a.close()  # released
    c = slots.claim(3 * MiB)
    assert c is not None and c[:5] == b"hello"  # the same pages, nothing new created
    assert _slots(slot_path) == ["slot-0", "slot-1"]
    assert (os.stat(slot_path).st_mode & 0o777) == 0o700
    del b, c


def test_a_slot_grows_and_too_large_slots_are_left_for_others(slot_path: str) -> None:
    slots = SlotDirectory(slot_path, budget=64 * MiB)
    small = slots.claim(1 * MiB)
    assert small is not None
    small.close()
    grown = slots.claim(2 * MiB)  # the free 1 MiB slot grows instead of a new file
    assert grown is not None and len(grown) == 2 * MiB and _slots(slot_path) == ["slot-0"]
    grown.close()
    tiny = slots.claim(64 << 10)  # slot-0 is over twice that: a new slot
    assert tiny is not None and len(tiny) == 64 << 10
    assert _slots(slot_path) == ["slot-0", "slot-1"]


def test_over_budget_claims_are_refused_and_the_pool_uses_private_memory(
    slot_path: str,
) -> None:
    slots = SlotDirectory(slot_path, budget=8 * MiB)
    held = slots.claim(6 * MiB)
    assert held is not None
    assert slots.claim(4 * MiB) is None  # 6 + 4 > 8
    pool = BufferPool(keep=2, slots=slots)
    buf = pool.get(4 * MiB)
    assert len(buf) >= 4 * MiB  # private memory instead
    assert _slots(slot_path) == ["slot-0"]
    del held
    gc.collect()
    buf2 = pool.get(4 * MiB)  # slot-0 is free again and large enough (<= 2x)
    assert _slots(slot_path) == ["slot-0"] and buf2 is not buf


def test_a_slot_held_by_another_process_is_skipped_and_freed_when_it_is_killed(
    slot_path: str,
) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from dataloaders._slots import SlotDirectory
                buf = SlotDirectory({slot_path!r}, budget=1 << 30).claim(1 << 20)
                print(len(buf), flush=True)
                time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == str(1 << 20)
        slots = SlotDirectory(slot_path, budget=1 << 30)
        mine = slots.claim(1 << 20)
        assert mine is not None and _slots(slot_path) == ["slot-0", "slot-1"]
        mine.close()
        holder.kill()  # no clean-up of its own: the kernel drops its lock
        holder.wait(10)
        first, second = slots.claim(1 << 20), slots.claim(1 << 20)
        assert first is not None and second is not None
        assert _slots(slot_path) == ["slot-0", "slot-1"]  # both reused, none created
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_idle_slots_are_deleted_but_claimed_ones_are_kept(slot_path: str) -> None:
    slots = SlotDirectory(slot_path, budget=64 * MiB, idle=60)
    held = slots.claim(MiB)
    idle = slots.claim(MiB)
    assert held is not None and idle is not None
    idle.close()
    old = time.time() - 3600
    for name in _slots(slot_path):
        os.utime(os.path.join(slot_path, name), (old, old))
    fresh = slots.claim(4 * MiB)  # the scan removes slot-1 (idle, unclaimed), not slot-0
    assert fresh is not None
    assert "slot-0" in _slots(slot_path) and len(_slots(slot_path)) == 2
    assert held[:1] is not None


def test_a_directory_that_is_not_private_or_a_symlinked_slot_is_never_used(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert SlotDirectory(str(shared), budget=64 * MiB).claim(MiB) is None
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_bytes(bytes(2 * MiB))
    (private / "slot-0").symlink_to(target)
    buf = SlotDirectory(str(private), budget=64 * MiB).claim(MiB)
    assert buf is not None
    buf[:4] = b"data"
    assert target.read_bytes()[:4] == bytes(4)  # the link's target was not written
    assert _slots(str(private)) == ["slot-0", "slot-1"]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[str]:
    """A 4 MiB tmpfs: a file system that really fills up."""
    with tmpfs(tmp_path / "tmpfs", "size=4m,mode=0700") as mount:
        yield str(mount / "slots")


def test_a_full_file_system_refuses_the_claim_instead_of_a_sigbus(small_tmpfs: str) -> None:
    slots = SlotDirectory(small_tmpfs, budget=1 << 30)  # the budget allows it; the disk not
    first = slots.claim(3 * MiB)
    assert first is not None
    first[:] = b"x" * len(first)  # reserved: writable end to end
    assert slots.claim(3 * MiB) is None  # no room: refused, and no half-made file left
    assert _slots(small_tmpfs) == ["slot-0"]
    pool = BufferPool(keep=2, slots=slots)
    buf = pool.get(3 * MiB)  # private memory, writable
    buf[-1:] = b"y"


@needs_collapse
def test_slots_on_a_tmpfs_without_huge_pages_are_collapsed_into_them(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "plain", "size=64m,mode=0700") as mount:
        slots = SlotDirectory(str(mount / "slots"), budget=48 * MiB)
        claimed = slots.claim_file(6 * MiB + 4096)
        assert claimed is not None
        path, buf = claimed
        assert len(buf) == 6 * MiB + 4096  # not rounded up: the whole huge pages are huge
        assert huge_bytes([path]) == 6 * MiB
        assert _address(buf) % HUGE_PAGE == 0  # mapped where huge pages map whole
        data = os.urandom(len(buf))
        buf[:] = data
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, len(data) + 1, 0) == data  # every byte, none past the end
        finally:
            os.close(fd)
        assert slots.publish(buf, "key")
        buf.close()
        cached = slots.open_cached("key", len(data))
        assert cached is not None and cached[:] == data and _address(cached) % HUGE_PAGE == 0
        cached.close()

        small = slots.claim_file(1 * MiB)  # under a huge page: as it was
        assert small is not None and len(small[1]) == 1 * MiB and huge_bytes([small[0]]) == 0
        small[1].close()
        grown = slots.claim_file(5 * MiB)  # that slot grows: its new whole huge page only
        assert grown is not None and grown[0] == small[0] and len(grown[1]) == 5 * MiB
        assert huge_bytes([grown[0]]) == 2 * MiB  # [2, 4) MiB; [1, 2) and [4, 5) in 4 KiB


@needs_collapse
def test_the_buffers_command_counts_collapsed_huge_pages(tmp_path: Path, iosvc_cli: Any) -> None:
    with tmpfs(tmp_path / "plain", "size=64m") as mount:
        held = SlotDirectory(str(mount / "slots")).claim(8 * MiB)
        shown = iosvc_cli("shards", "buffers", "--dir", str(mount / "slots"))
        assert shown.returncode == 0, shown.stderr
        assert "8MiB of 8MiB in 2 MiB pages: collapsed by the readers" in shown.stdout
        del held


def test_default_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATALOADERS_BUFFER_DIR", "")
    assert default_slot_dir() is None
    monkeypatch.setenv("DATALOADERS_BUFFER_DIR", "/somewhere")
    assert default_slot_dir() == "/somewhere"
    monkeypatch.delenv("DATALOADERS_BUFFER_DIR")
    assert default_slot_dir() in (f"/dev/shm/dataloaders-{os.getuid()}", None)


def test_remote_epochs_in_fresh_worker_processes_reuse_the_same_slots(
    iosvc_url: str, slot_path: str
) -> None:
    # Shard files over POOLED_MIN (what the workers, started afresh, read into buffers).
    samples = [{"image": os.urandom(12 << 10), "label": i % 10, "id": i} for i in range(400)]
    write_shards(samples, iosvc_url, shard_bytes=dataloaders._cache.POOLED_MIN + (200 << 10))
    # Without the node cache (test_node_cache.py), which would keep the first epoch's files.
    ds = StreamingDataset(iosvc_url, seed=3, buffer_dir=slot_path, prefetch=1, node_cache=False)
    loader = DataLoader(ds, batch_size=16, num_workers=2)  # new worker processes each epoch
    made: list[list[str]] = []
    for _ in range(2):
        assert checked_images(loader, samples) == 400
        made.append(_slots(slot_path))
    assert made[0], "no slot was used"
    # The second epoch's workers claimed the first's slots (without reuse they would have
    # made as many again). One more is allowed: two workers that scan at once may race for
    # the last free slot, and the loser makes a new one.
    assert set(made[0]) <= set(made[1]) and len(made[1]) <= len(made[0]) + 1


def test_the_buffers_command_lists_and_clears_only_what_no_reader_holds(
    slot_path: str, iosvc_cli: Any
) -> None:
    slots = SlotDirectory(slot_path, budget=64 * MiB)
    held = slots.claim(2 * MiB)
    free = slots.claim(MiB)
    assert held is not None and free is not None
    free.close()
    summary = iosvc_cli("shards", "buffers", "--dir", slot_path)
    assert summary.returncode == 0, summary.stderr
    assert "2 files, 3MiB of" in summary.stdout and "allowed" in summary.stdout
    (kind,) = [line for line in summary.stdout.splitlines() if "shard buffer" in line]
    assert "2 files" in kind and "3MiB" in kind and "1 in use" in kind
    shown = iosvc_cli("shards", "buffers", "--dir", slot_path, "--files")
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line for line in shown.stdout.splitlines()[1:]}
    assert "in use" in lines["slot-0"] and "free" in lines["slot-1"]
    cleared = iosvc_cli("shards", "buffers", "--dir", slot_path, "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert "freed 1MiB" in cleared.stdout and "1 files in use kept" in cleared.stdout
    assert _slots(slot_path) == ["slot-0"]
    held[:3] = b"abc"  # the held slot is untouched and still writable
    assert iosvc_cli("shards", "buffers", "--dir", str(Path(slot_path) / "none")).returncode == 0


def test_tmpfs_huge_pages_reads_the_mount_of_a_path(tmp_path: Path) -> None:
    bb, deeper, spaced = tmp_path / "bb", tmp_path / "bb" / "job", tmp_path / "with space"
    for d in (bb, deeper, spaced):
        d.mkdir()
    info = tmp_path / "mountinfo"
    info.write_text(
        "21 1 8:1 / / rw - ext4 /dev/vda rw\n"
        "30 21 0:5 / /dev/shm rw,nosuid - tmpfs tmpfs rw,size=100k\n"
        f"40 21 0:6 / {bb} rw - tmpfs tmpfs rw,size=8g,huge=within_size,inode64\n"
        f"41 40 0:7 / {deeper} rw shared:5 - tmpfs tmpfs rw,huge=always\n"
        f"42 40 0:8 / {deeper} rw - tmpfs tmpfs rw\n"  # stacked over 41: this one is seen
        f"50 21 0:9 / {str(spaced).replace(' ', chr(92) + '040')} rw - tmpfs t rw,huge=advise\n"
        "garbage line\n"
        "60 21 0:10 / /x rw -\n"  # cut short
    )
    huge = functools.partial(tmpfs_huge_pages, mountinfo=str(info))
    assert huge(str(bb)) == "within_size"
    assert huge(str(bb / "slots-not-made-yet" / "x")) == "within_size"
    assert huge(str(deeper / "slots")) == "never"
    assert huge(str(spaced)) == "advise"
    assert huge(str(tmp_path)) is None  # ext4
    assert tmpfs_huge_pages(str(tmp_path), mountinfo=str(tmp_path / "absent")) is None


def test_the_buffers_command_tells_whether_the_directory_has_huge_pages(
    tmp_path: Path, iosvc_cli: Any
) -> None:
    with tmpfs(tmp_path / "huge", "huge=within_size,size=64m") as mount:
        shown = iosvc_cli("shards", "buffers", "--dir", str(mount / "slots"))
        assert shown.returncode == 0, shown.stderr
        assert "in huge pages (tmpfs huge=within_size)" in shown.stdout
    with tmpfs(tmp_path / "plain", "size=64m") as mount:
        shown = iosvc_cli("shards", "buffers", "--dir", str(mount / "slots"))
        assert "in 4 KiB pages" in shown.stdout and "huge=within_size" in shown.stdout

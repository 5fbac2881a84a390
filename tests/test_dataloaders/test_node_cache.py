"""The node cache: remote shard files kept in the slot directory for later readers
(dataloaders._slots ``cache-`` files, kept and read by dataloaders._cache.ShardFetcher)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import fsspec
import pytest

import dataloaders._cache
import dataloaders._slots
from dataloaders import DataLoader, ShardCorrupted, ShardedDataset, StreamingDataset, write_shards
from dataloaders._slots import SlotDirectory

from .helpers import checked_images, make_samples

MiB = 1 << 20


@pytest.fixture
def slot_path(tmp_path: Path) -> str:
    return str(tmp_path / "slots")


def _files(path: str, kind: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith(kind)) if os.path.isdir(path) else []


def _shard_files(url: str) -> list[str]:
    fs = fsspec.filesystem("iosvc")
    return [p for p in fs.ls(url, detail=False) if not p.endswith("manifest.json")]


def test_a_later_epoch_reads_the_node_cache_not_the_servers(iosvc_url: str, slot_path: str) -> None:
    samples = [{"image": os.urandom(12 << 10), "label": i % 10, "id": i} for i in range(400)]
    write_shards(samples, iosvc_url, shard_bytes=dataloaders._cache.POOLED_MIN + (200 << 10))
    ds = StreamingDataset(iosvc_url, seed=3, buffer_dir=slot_path, prefetch=1)
    loader = DataLoader(ds, batch_size=16, num_workers=2)  # new worker processes each epoch
    assert checked_images(loader, samples) == 400
    kept = _files(slot_path, "cache-")
    # Every file of every shard: data files received into slots, block checksums copied.
    assert len(kept) == len(_shard_files(iosvc_url))
    # Gone from the servers (the manifest stays): the next epoch's new workers read it all
    # from the node cache, and every image is the one written.
    fsspec.filesystem("iosvc").rm(_shard_files(iosvc_url))
    assert checked_images(loader, samples) == 400
    assert _files(slot_path, "cache-") == kept


def test_a_rewritten_dataset_is_read_anew(iosvc_url: str, slot_path: str) -> None:
    first = make_samples(200, seed=1)
    write_shards(first, iosvc_url, shard_bytes=32 << 10)
    ds = StreamingDataset(iosvc_url, seed=0, buffer_dir=slot_path)
    assert {s["id"]: s["image"] for s in ds} == {s["id"]: s["image"] for s in first}
    assert _files(slot_path, "cache-")
    second = make_samples(200, seed=2)
    write_shards(second, iosvc_url, shard_bytes=32 << 10, overwrite=True)
    ds = StreamingDataset(iosvc_url, seed=0, buffer_dir=slot_path)
    assert {s["id"]: s["image"] for s in ds} == {s["id"]: s["image"] for s in second}


def test_bytes_that_fail_the_manifest_are_never_kept(iosvc_url: str, slot_path: str) -> None:
    write_shards(make_samples(200), iosvc_url, shard_bytes=32 << 10)
    fs = fsspec.filesystem("iosvc")
    path = iosvc_url + "/shard-00002.raw"
    data = bytearray(fs.cat_file(path))
    data[10] ^= 0xFF
    fs.pipe_file(path, bytes(data))  # a new version: consistent chunks, wrong for the manifest
    for _ in range(2):  # and not kept by the first attempt either
        with pytest.raises(ShardCorrupted, match=r"shard-00002.*checksum"):
            list(StreamingDataset(iosvc_url, shuffle=False, buffer_dir=slot_path))
    cache = SlotDirectory(slot_path)
    ds = StreamingDataset(iosvc_url, buffer_dir=slot_path)
    fetcher = ds._source.fetcher(verify=True, node_cache=True, slots=cache)
    shard = ds.manifest.shards[2]
    entry = shard.files[0]
    assert cache.open_cached(fetcher._cache_key(entry.path, entry), entry.size) is None
    kept = _files(slot_path, "cache-")
    assert kept and len(kept) < 2 * len(ds.manifest.shards)  # the shards before it only


def test_no_cache_without_checksums_or_for_local_files(
    iosvc_url: str, local_url: str, memory_url: str, slot_path: str
) -> None:
    samples = make_samples(100)
    for url in (iosvc_url, local_url, memory_url):
        write_shards(samples, url, shard_bytes=32 << 10)
    assert len(list(StreamingDataset(iosvc_url, verify=False, buffer_dir=slot_path))) == 100
    assert len(list(StreamingDataset(local_url, buffer_dir=slot_path))) == 100
    assert len(list(StreamingDataset(memory_url, buffer_dir=slot_path))) == 100
    assert len(list(StreamingDataset(iosvc_url, node_cache=False, buffer_dir=slot_path))) == 100
    assert _files(slot_path, "cache-") == []


def test_a_full_budget_takes_over_the_least_recently_used_file_nobody_maps(
    slot_path: str,
) -> None:
    slots = SlotDirectory(slot_path, budget=8 * MiB)
    for key in ("a", "b", "c"):
        buf = slots.claim(2 * MiB)
        assert buf is not None
        buf[:1] = key.encode()
        assert slots.publish(buf, key)
        buf.close()
    held = slots.open_cached("b", 2 * MiB)  # mapped: never taken over
    assert held is not None and held[:1] == b"b"
    now = os.stat(os.path.join(slot_path, "cache-a")).st_mtime
    os.utime(os.path.join(slot_path, "cache-b"), (now - 20, now - 20))  # the oldest
    os.utime(os.path.join(slot_path, "cache-c"), (now - 10, now - 10))
    taken = slots.claim(2 * MiB)  # 6 of 8 MiB used: a new file
    assert taken is not None and _files(slot_path, "slot-") == ["slot-0"]
    taken2 = slots.claim(2 * MiB)  # full: c, the least recently used but b, is taken over
    assert taken2 is not None
    assert _files(slot_path, "cache-") == ["cache-a", "cache-b"]
    assert sorted(_files(slot_path, "slot-")) == ["slot-0", "slot-1"]
    assert slots.open_cached("c", 2 * MiB) is None
    taken2[:1] = b"x"  # a slot now, and writable
    assert held[:1] == b"b" and slots.open_cached("a", 2 * MiB) is not None


def test_a_batch_arena_claim_makes_room_by_deleting_cache_files(slot_path: str) -> None:
    slots = SlotDirectory(slot_path, budget=4 * MiB)
    buf = slots.claim(3 * MiB)
    assert buf is not None and slots.publish(buf, "a")
    buf.close()
    arena = slots.of_kind("batch-").claim(2 * MiB)
    assert arena is not None and _files(slot_path, "cache-") == []


def test_a_file_taken_over_between_open_and_lock_is_not_read_as_the_cached_one(
    slot_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = SlotDirectory(slot_path, budget=4 * MiB)
    buf = slots.claim(2 * MiB)
    assert buf is not None
    buf[:5] = b"first"
    assert slots.publish(buf, "k")
    buf.close()
    real_flock = fcntl.flock
    raced: list[Any] = []

    def flock_after_a_take_over(fd: int, op: int) -> None:
        if op & fcntl.LOCK_SH and not raced:  # the reader opened cache-k; before its lock:
            raced.append(True)
            other = SlotDirectory(slot_path, budget=2 * MiB)  # full: takes over cache-k
            taken = other.claim(2 * MiB)
            assert taken is not None and not os.path.exists(os.path.join(slot_path, "cache-k"))
            taken[:5] = b"other"
            assert other.publish(taken, "k2")
            taken.close()
        real_flock(fd, op)

    monkeypatch.setattr(dataloaders._slots.fcntl, "flock", flock_after_a_take_over)
    assert slots.open_cached("k", 5) is None  # the same inode, now other bytes: a miss
    assert raced
    got = slots.open_cached("k2", 5)
    assert got is not None and got[:5] == b"other"


def test_a_dataset_larger_than_the_budget_cycles_through_it_intact(
    iosvc_url: str, slot_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataloaders._cache, "POOLED_MIN", 0)  # every file through slots
    samples = make_samples(600)
    summary = write_shards(samples, iosvc_url, shard_bytes=64 << 10)
    budget = summary.bytes // 3  # a third of the dataset (plus the batch arenas') fits
    ds = StreamingDataset(iosvc_url, seed=5, buffer_dir=slot_path, buffer_dir_bytes=budget)
    loader = DataLoader(ds, batch_size=32, num_workers=2)
    for _ in range(3):
        assert checked_images(loader, samples) == 600
        held = sum(f.bytes for f in SlotDirectory(slot_path).files())
        assert held <= budget + (256 << 10)  # racing claims may pass it by a slot
    assert _files(slot_path, "cache-")


def test_the_buffers_command_lists_cache_files(slot_path: str, iosvc_cli: Any) -> None:
    slots = SlotDirectory(slot_path, budget=8 * MiB)
    buf = slots.claim(MiB)
    assert buf is not None and slots.publish(buf, "abc")
    buf.close()
    shown = iosvc_cli("shards", "buffers", "--dir", slot_path)
    assert shown.returncode == 0, shown.stderr
    assert "cache-abc" in shown.stdout and "node cache" in shown.stdout


def test_the_map_style_dataset_reads_and_fills_the_node_cache(
    iosvc_url: str, slot_path: str
) -> None:
    samples = make_samples(300)
    write_shards(samples, iosvc_url, shard_bytes=32 << 10)
    first = ShardedDataset(iosvc_url, buffer_dir=slot_path)
    assert [first[i]["image"] for i in range(300)] == [s["image"] for s in samples]
    assert len(_files(slot_path, "cache-")) == len(_shard_files(iosvc_url))
    fsspec.filesystem("iosvc").rm(_shard_files(iosvc_url))
    again = ShardedDataset(iosvc_url, buffer_dir=slot_path)  # a new reader: nothing in memory
    got = again.__getitems__(list(range(299, -1, -1)))
    assert [s["image"] for s in got] == [s["image"] for s in reversed(samples)]

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

from .helpers import checked_images, corrupt, make_samples

MiB = 1 << 20


@pytest.fixture
def slot_path(tmp_path: Path) -> str:
    return str(tmp_path / "slots")


def _files(path: str, kind: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith(kind)) if os.path.isdir(path) else []


def _publish(slots: SlotDirectory, key: str, content: bytes, size: int = MiB) -> None:
    """A node cache file ``key`` of ``size`` bytes starting with ``content``, nobody's."""
    buf = slots.claim(size)
    assert buf is not None
    buf[: len(content)] = content
    assert slots.publish(buf, key)
    buf.close()


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


def test_bytes_that_fail_the_manifest_are_never_kept(
    iosvc_url: str, slot_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataloaders._cache, "POOLED_MIN", 0)  # data files received into slots
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
        _publish(slots, key, key.encode(), 2 * MiB)
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
    _publish(slots, "a", b"a", 3 * MiB)
    arena = slots.of_kind("batch-").claim(2 * MiB)
    assert arena is not None and _files(slot_path, "cache-") == []


def test_a_file_taken_over_between_open_and_lock_is_not_read_as_the_cached_one(
    slot_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = SlotDirectory(slot_path, budget=4 * MiB)
    _publish(slots, "k", b"first", 2 * MiB)
    real_flock = fcntl.flock
    raced: list[Any] = []

    def flock_after_a_take_over(fd: int, op: int) -> None:
        if op & fcntl.LOCK_SH and not raced:  # the reader opened cache-k; before its lock:
            raced.append(True)
            other = SlotDirectory(slot_path, budget=2 * MiB)  # full: takes over cache-k
            _publish(other, "k2", b"other", 2 * MiB)
            assert not os.path.exists(os.path.join(slot_path, "cache-k"))
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
    kept = []
    for _ in range(3):
        assert checked_images(loader, samples) == 600
        held = sum(f.bytes for f in SlotDirectory(slot_path).files())
        assert held <= budget + (256 << 10)  # racing claims may pass it by a slot
        kept.append(set(_files(slot_path, "cache-")))
    assert kept[0] and kept[1] != kept[0]  # files were taken over for others
    # What the cache holds is read from it: a shard it holds whole, gone from the servers,
    # still reads (map-style, so that this one shard is all that is read).
    ds = StreamingDataset(iosvc_url, buffer_dir=slot_path)
    fetcher = ds._source.fetcher(verify=True, node_cache=True, slots=SlotDirectory(slot_path))
    held = [
        k
        for k, shard in enumerate(ds.manifest.shards)
        if all(
            os.path.exists(os.path.join(slot_path, "cache-" + fetcher._cache_key(f.path, f)))
            for f in shard.all_files()
        )
    ]
    assert held
    shard = ds.manifest.shards[held[0]]
    fsspec.filesystem("iosvc").rm([f"{iosvc_url}/{f.path}" for f in shard.all_files()])
    first = sum(ds.manifest.counts[: held[0]])
    got = ShardedDataset(iosvc_url, buffer_dir=slot_path)[first]
    assert got["image"] == samples[first]["image"]


def test_the_buffers_command_lists_cache_files(slot_path: str, iosvc_cli: Any) -> None:
    slots = SlotDirectory(slot_path, budget=8 * MiB)
    _publish(slots, "abc", b"abc")
    summary = iosvc_cli("shards", "buffers", "--dir", slot_path)
    assert summary.returncode == 0, summary.stderr
    (kind,) = [line for line in summary.stdout.splitlines() if "node cache" in line]
    assert "1 files" in kind and "1MiB" in kind and "0 in use" in kind
    assert "cache-abc" not in summary.stdout  # a line per kind, not per file
    shown = iosvc_cli("shards", "buffers", "--dir", slot_path, "--files")
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


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_take_over_links_its_own_file_even_if_the_name_was_published_again(
    slot_path: str, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    slots = SlotDirectory(slot_path, budget=4 * MiB)
    _publish(slots, "k", b"old", 2 * MiB)
    real_link = os.link
    raced: list[Any] = []

    def publish_k_again() -> None:  # gives the name cache-k to another file
        _publish(SlotDirectory(slot_path, budget=64 * MiB), "k", b"new")

    def link_around_a_publish(src: Any, dst: Any, **kwargs: Any) -> None:
        # The taker holds cache-k's first file and links it as a slot: another reader
        # publishes k again just before, or just after.
        first = not raced
        raced.append(True)
        if first and when == "before":
            publish_k_again()
        real_link(src, dst, **kwargs)  # fails for "before": the file has no name left
        if first and when == "after":
            publish_k_again()

    monkeypatch.setattr(os, "link", link_around_a_publish)
    taken = SlotDirectory(slot_path, budget=3 * MiB).claim(2 * MiB)  # full: takes over k
    monkeypatch.undo()
    assert raced and taken is not None
    # The taker's slot name is its own file, never the newer copy (which a name-based link
    # would have taken, and which the taker would then have published as other content).
    assert os.stat(taken.path).st_ino == taken.ino
    taken[:3] = b"xyz"
    got = slots.open_cached("k", 3)
    if when == "after":  # the newer copy keeps its name
        assert got is not None and got[:3] == b"new"
    else:  # the take-over gave up on the file; the claim made room by deleting cache-k
        assert got is None


def test_a_file_under_two_names_is_neither_read_from_the_cache_nor_claimed(
    slot_path: str,
) -> None:
    slots = SlotDirectory(slot_path, budget=8 * MiB)
    _publish(slots, "k", b"k")
    # A take-over that crashed between its link and its unlink.
    os.link(os.path.join(slot_path, "cache-k"), os.path.join(slot_path, "slot-7"))
    assert slots.open_cached("k", 1) is None
    fresh = slots.claim(MiB)
    assert fresh is not None and fresh.path != os.path.join(slot_path, "slot-7")


def _cache_file(slot_path: str, url: str, rel: str) -> str:
    ds = StreamingDataset(url, buffer_dir=slot_path)
    fetcher = ds._source.fetcher(verify=True, node_cache=True, slots=SlotDirectory(slot_path))
    entry = next(f for s in ds.manifest.shards for f in s.all_files() if f.path == rel)
    return os.path.join(slot_path, "cache-" + fetcher._cache_key(rel, entry))


def test_a_corrupt_cache_file_is_dropped_and_read_again_from_the_servers(
    iosvc_url: str, slot_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataloaders._cache, "POOLED_MIN", 0)  # data files received into slots
    samples = make_samples(200)
    write_shards(samples, iosvc_url, shard_bytes=32 << 10)
    assert len(list(StreamingDataset(iosvc_url, buffer_dir=slot_path))) == 200
    data_file = _cache_file(slot_path, iosvc_url, "shard-00002.raw")  # checked by blocks
    sums_file = _cache_file(slot_path, iosvc_url, "shard-00001.xxh3")  # checked whole
    for path in (data_file, sums_file):
        corrupt(path, 5)
    ds = StreamingDataset(iosvc_url, shuffle=False, buffer_dir=slot_path)
    got: dict[int, bytes] = {}
    with pytest.raises(ShardCorrupted, match=r"shard-00002.*node cache copy .*deleted"):
        for sample in ds:
            got[sample["id"]] = sample["image"]
    # Shard 1 read on: its checksums file was read again from the servers, and kept anew.
    assert len(got) > 20 and all(samples[i]["image"] == image for i, image in got.items())
    sums = fsspec.filesystem("iosvc").cat_file(iosvc_url + "/shard-00001.xxh3")
    assert Path(sums_file).read_bytes()[: len(sums)] == sums
    assert not os.path.exists(data_file)  # dropped: the next reader fetches it anew
    ds = StreamingDataset(iosvc_url, buffer_dir=slot_path)
    assert {s["id"]: s["image"] for s in ds} == {s["id"]: s["image"] for s in samples}


def test_a_name_given_to_another_file_meanwhile_is_not_removed(
    slot_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = SlotDirectory(slot_path, budget=8 * MiB)
    idle = slots.claim(MiB)
    assert idle is not None
    idle.close()  # slot-0, free: clear() removes it...
    real_flock = fcntl.flock
    held: list[Any] = []

    def meanwhile(fd: int, op: int) -> None:
        if op & fcntl.LOCK_EX and not held:  # ...but first, others remove and remake it
            held.append(None)
            os.unlink(os.path.join(slot_path, "slot-0"))
            held[0] = SlotDirectory(slot_path, budget=8 * MiB).claim(MiB)
        real_flock(fd, op)

    monkeypatch.setattr(dataloaders._slots.fcntl, "flock", meanwhile)
    slots.clear()
    monkeypatch.undo()
    (remade,) = held
    assert remade is not None and remade.path == os.path.join(slot_path, "slot-0")
    assert os.stat(remade.path).st_ino == remade.ino  # its name was left alone

"""What makes a reader start and stream fast: frozen objects at fork, the widened result
pipe, reused read buffers (iosvc://), the filesystem imported before the workers fork."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

import dataloaders._cache
from dataloaders import DataLoader, ShardCorrupted, StreamingDataset, write_shards
from dataloaders._cache import BufferPool
from dataloaders._loader import widen_result_pipe

from .helpers import checked_images, ids_of, make_samples

N = 300
BATCH = 16
ROOT = Path(__file__).resolve().parents[2]


def _freeze_count(sample: dict[str, Any]) -> dict[str, Any]:
    """A transform that records, in the worker, how many objects it inherited frozen."""
    return {**sample, "frozen": gc.get_freeze_count()}


def test_forked_workers_inherit_frozen_objects_and_the_parent_unfreezes(
    small_dataset: str,
) -> None:
    assert gc.get_freeze_count() == 0
    ds = StreamingDataset(small_dataset, transform=_freeze_count)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, multiprocessing_context="fork")
    frozen: list[int] = []
    ids = []
    for batch in loader:
        frozen += batch["frozen"].tolist()
        ids += batch["id"].tolist()
        assert gc.get_freeze_count() == 0  # the parent's collections are as before
    assert sorted(ids) == list(range(N))
    # Everything the parent had when the workers forked stays out of their collections.
    assert min(frozen) > 10_000


def test_a_program_that_froze_objects_keeps_them_frozen(small_dataset: str) -> None:
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        loader = DataLoader(
            StreamingDataset(small_dataset),
            batch_size=BATCH,
            num_workers=2,
            multiprocessing_context="fork",
        )
        assert sorted(ids_of(loader)) == list(range(N))
        # Not unfrozen by the loader (frozen objects that died since are not counted).
        assert gc.get_freeze_count() > before // 2 > 0
    finally:
        gc.unfreeze()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
def test_the_result_pipe_is_widened(small_dataset: str) -> None:
    import fcntl

    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    loader = DataLoader(
        StreamingDataset(small_dataset),
        batch_size=BATCH,
        num_workers=2,
        persistent_workers=True,
    )
    assert sorted(ids_of(loader)) == list(range(N))
    reader = loader._iterator._worker_result_queue._reader  # type: ignore[union-attr]
    size = fcntl.fcntl(reader.fileno(), fcntl.F_GETPIPE_SZ)
    assert size >= min(4 << 20, limit) > 65536
    assert sorted(ids_of(loader)) == list(range(N))  # next epoch, same workers
    assert widen_result_pipe(object()) == 0  # nothing to widen: no error


def test_buffer_pool_reuses_only_buffers_nothing_refers_to() -> None:
    pool = BufferPool(keep=2)
    a = pool.get(1 << 20)
    view = memoryview(a)[:100]
    del a
    b = pool.get(1 << 20)  # a is still viewed: not handed out again
    assert b is not view.obj
    assert pool.reused == 0
    del view
    c = pool.get(1 << 20)  # now it is free
    assert pool.reused == 1
    assert c is not b
    assert len(pool) == 2
    big = pool.get(4 << 20)  # nothing fits, all in use: a fresh buffer, not kept
    assert len(big) >= 4 << 20 and len(pool) == 2
    assert not any(buf is big for buf in pool._buffers)
    del b, c, big
    big = pool.get(4 << 20)  # too small ones are not used: it replaces a free one
    assert len(pool) == 2 and any(buf is big for buf in pool._buffers)
    assert pool.get(100) is not big  # nor is a buffer more than twice the size
    del big
    # Room for a slightly larger file next time (shard sizes vary by a few %).
    bigger = pool.get((4 << 20) + 4096)
    assert pool.reused == 2 and len(bigger) >= (4 << 20) + 4096


@pytest.fixture
def pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shard file read through the reused buffers, whatever its size."""
    monkeypatch.setattr(dataloaders._cache, "POOLED_MIN", 0)


@pytest.mark.parametrize("node_cache", [False, True])
def test_reused_buffers_never_mix_samples_on_iosvc(
    iosvc_url: str, pooled: None, node_cache: bool
) -> None:
    samples = make_samples(N)
    write_shards(samples, iosvc_url, shard_bytes=32 << 10)
    # With the node cache, received buffers are kept (the second epoch maps them), not
    # reused: test_node_cache.py covers that.
    ds = StreamingDataset(iosvc_url, batch_size=BATCH, seed=1, prefetch=1, node_cache=node_cache)
    for _ in range(2):
        seen = {}
        pools = set()
        for sample in ds:
            seen[sample["id"]] = sample
            pools.add(ds._source._pool)
        assert sorted(seen) == list(range(N))
        for i, sample in seen.items():
            assert sample["image"] == samples[i]["image"]
            assert sample["label"] == samples[i]["label"]
        (pool,) = pools
        # ~12 shards through at most `keep` buffers, reused as soon as a shard is done.
        assert pool is not None and (node_cache or pool.reused >= 2)
        assert len(pool) <= pool.keep
        assert ds._source._pool is None  # not held after the epoch


def test_reused_buffers_in_collated_batches_on_iosvc(iosvc_url: str, pooled: None) -> None:
    samples = make_samples(N)
    write_shards(samples, iosvc_url, shard_bytes=32 << 10)
    loader = DataLoader(StreamingDataset(iosvc_url, seed=2), batch_size=BATCH)
    for _ in range(2):
        assert checked_images(loader, samples) == N


@pytest.mark.parametrize("case", ["ahead", "stale", "slow", "node cache"])
def test_a_readers_files_are_looked_up_together_on_iosvc(
    iosvc_url: str, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The metadata of the files of a reader's shards is asked ahead, in one call per home
    server (up to LOOKUP_AHEAD files), not per shard, nor per file; what has aged past
    LOOKUP_MAX_AGE when its shard is read is asked again, and a reader whose lookups go
    stale looks less far ahead; with the node cache (whose copies need no metadata) each
    shard's files are asked when it is read, one call per home server."""
    from iosvc.client import AsyncClient
    from iosvc.placement import Placement

    if case in ("stale", "slow"):
        monkeypatch.setattr(dataloaders._cache, "LOOKUP_MAX_AGE", -1.0)
    if case == "slow":
        monkeypatch.setattr(dataloaders._cache, "LOOKUP_AHEAD", 8)
    samples = make_samples(N)
    write_shards(samples, iosvc_url, shard_bytes=32 << 10)
    calls: list[tuple[str, int]] = []
    call = AsyncClient.call

    async def counted(self: AsyncClient, server: int, header: dict[str, Any], *a: Any) -> Any:
        calls.append((header["op"], len(header.get("paths", ()))))
        return await call(self, server, header, *a)

    async def one_by_one(self: AsyncClient, path: str) -> Any:
        raise AssertionError(f"{path} looked up on its own")

    ds = StreamingDataset(iosvc_url, seed=3, node_cache=case == "node cache")
    with monkeypatch.context() as patched:  # (the fixture's clean-up calls info)
        patched.setattr(AsyncClient, "call", counted)
        patched.setattr(AsyncClient, "info", one_by_one)
        assert sorted(s["id"] for s in ds) == list(range(N))
    # One call per home server of all the shards' files (.raw and checksums), each once.
    placement = Placement(2)
    root = iosvc_url.removeprefix("iosvc://")
    shards = [s for s in ds.manifest.shards if s.sums is not None]
    assert len(shards) == len(ds.manifest.shards) > 4
    if case == "slow":
        # Windows of 8, 4, then 2 files (a shard's own): shards 1-2 asked ahead with shard
        # 0, shard 3 with shard 1, each asked again when read; then only their own files.
        assert len(shards) >= 8
        assert sum(n for op, n in calls if op == "stat") == 2 * len(shards) + 6
        return
    assert 2 * len(shards) <= dataloaders._cache.LOOKUP_AHEAD
    homes = [
        {placement.home(f"{root}/{n}") for n in (f"{s.name}.raw", s.sums.path)} for s in shards
    ]
    stats = [n for op, n in calls if op == "stat"]
    if case == "ahead":
        assert len(stats) == len(set().union(*homes)) == 2
        assert sum(stats) == 2 * len(shards)
    elif case == "stale":  # all asked ahead at first, then each shard's again
        assert sum(stats) == 2 * len(shards) + 2 * (len(shards) - 1)
    else:
        assert len(stats) == sum(len(h) for h in homes)
        assert sum(stats) == 2 * len(shards)


def test_corrupted_shard_on_iosvc_is_named(iosvc_url: str, pooled: None) -> None:
    write_shards(make_samples(N), iosvc_url, shard_bytes=32 << 10)
    fs = fsspec.filesystem("iosvc")
    path = iosvc_url + "/shard-00002.raw"
    data = bytearray(fs.cat_file(path))
    data[10] ^= 0xFF
    fs.pipe_file(path, bytes(data))  # a new version: consistent chunks, wrong for the manifest
    with pytest.raises(ShardCorrupted, match=r"shard-00002.*checksum"):
        list(StreamingDataset(iosvc_url))


def test_forked_workers_on_iosvc_from_a_fresh_process(iosvc_url: str, cluster_file: str) -> None:
    """A parent that has not used gRPC forks its workers; it imports the iosvc filesystem
    before they fork (once for all), and stays fork-safe."""
    samples = make_samples(N)
    write_shards(samples, iosvc_url, shard_bytes=32 << 10)
    script = textwrap.dedent(
        f"""
        import json, sys
        import dataloaders
        ds = dataloaders.StreamingDataset({iosvc_url!r}, seed=0)
        loader = dataloaders.DataLoader(ds, batch_size={BATCH}, num_workers=2)
        assert "iosvc.client" not in sys.modules
        ids = []
        for batch in loader:
            ids += batch["id"].tolist()
            import iosvc.client
            assert iosvc.client.fork_safe()  # imported, never used: fork-safe
        print(json.dumps({{"ids": sorted(ids), "start": loader.multiprocessing_context}}))
        """
    )
    env = {**os.environ, "IOSVC_CLUSTER": cluster_file}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ids"] == list(range(N))
    assert result["start"] is None  # forked (the default context), not forkserver


@pytest.fixture(scope="module")
def dir_cluster_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 2-server cluster on this host with a ``--dir`` store: its chunk files can be mapped."""
    from iosvc.server import LocalCluster

    root = tmp_path_factory.mktemp("dl-in-place")
    with LocalCluster(2, directory=root / "data", workdir=root / "work") as cluster:
        assert cluster.spec is not None
        cluster.spec.save(root / "cluster.json")
        yield str(root / "cluster.json")


def test_shards_on_servers_of_this_host_are_mapped_not_copied(
    dir_cluster_file: str, prefix: str
) -> None:
    from iosvc.client import Client

    url = f"iosvc://{prefix}/mapped"
    options = {"cluster": dir_cluster_file}
    samples = make_samples(3000)
    # Shards > POOLED_MIN: read into pooled buffers, or mapped.
    summary = write_shards(samples, url, shard_bytes=2 << 20, storage_options=options)
    assert summary.shards >= 2
    client = Client(dir_cluster_file)
    mapped_before = sum(s["in_place_reads"] for s in client.status())
    ds = StreamingDataset(url, batch_size=BATCH, seed=3, storage_options=options)
    got = {}
    for sample in ds:
        got[sample["id"]] = sample
        pool = ds._source._pool
        assert pool is not None and len(pool) == 0  # no read buffer was ever needed
    assert sorted(got) == list(range(len(samples)))
    for i, sample in got.items():
        assert sample["image"] == samples[i]["image"]
    assert sum(s["in_place_reads"] for s in client.status()) > mapped_before
    # A shard rewritten after the manifest: the mapped bytes fail the manifest's checksum.
    fs = fsspec.filesystem("iosvc", **options)
    path = f"{url}/shard-00001.raw"
    data = bytearray(fs.cat_file(path))
    data[-100] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(ShardCorrupted, match=r"shard-00001.*checksum"):
        list(StreamingDataset(url, storage_options=options))


def test_a_prepared_epoch_is_the_same_epoch(small_dataset: str) -> None:
    """prepare() plans ahead; the iteration that follows yields exactly what it would have,
    and a plan made for another epoch is dropped, not used."""
    expected = [s["id"] for s in StreamingDataset(small_dataset, seed=4)]
    ds = StreamingDataset(small_dataset, seed=4)
    ds.prepare()
    assert ds._prepared is not None
    assert [s["id"] for s in ds] == expected
    assert ds._prepared is None  # used once
    next_epoch = StreamingDataset(small_dataset, seed=4)
    next_epoch.set_epoch(1)
    ds = StreamingDataset(small_dataset, seed=4)
    ds.prepare()
    ds.set_epoch(1)
    assert [s["id"] for s in ds] == [s["id"] for s in next_epoch] != expected


def _mark_worker(worker_id: int) -> None:
    os.environ["DL_TEST_WORKER"] = str(worker_id)


def _worker_mark(sample: dict[str, Any]) -> dict[str, Any]:
    return {**sample, "mark": int(os.environ.get("DL_TEST_WORKER", "-1"))}


def _batches_of(url: str) -> list[tuple[list[int], list[int]]]:
    ds = StreamingDataset(url, seed=1, transform=_worker_mark)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, worker_init_fn=_mark_worker)
    return [(b["id"].tolist(), b["mark"].tolist()) for b in loader]


def test_workers_prepare_their_epoch_after_the_users_init(
    small_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _batches_of(small_dataset)
    assert {m for _, marks in batches for m in marks} == {0, 1}  # the user's init ran
    assert sorted(i for ids, _ in batches for i in ids) == list(range(N))
    # The same batches, in the same order, from workers that plan only when first asked.
    monkeypatch.setattr(StreamingDataset, "prepare", lambda self: None)
    assert _batches_of(small_dataset) == batches

"""zarr, pyarrow and pandas on ``iosvc://`` through fsspec, unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numcodecs
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import zarr
import zarr.api.asynchronous
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype
from zarr.storage import FsspecStore
from zarr.testing.store import StoreTests

from iosvc.client import IosvcFileSystem


@pytest.fixture
def fs(cluster_file: str, prefix: str) -> Iterator[IosvcFileSystem]:
    """A synchronous filesystem; removes the test's prefix afterwards."""
    sync_fs = IosvcFileSystem(cluster=cluster_file)
    yield sync_fs
    if sync_fs.exists(prefix):
        sync_fs.rm(prefix, recursive=True)


@pytest.fixture
def options(cluster_file: str) -> dict[str, str]:
    """``storage_options`` naming the session cluster."""
    return {"cluster": cluster_file}


# ------------------------------------------------------------------ zarr's store contract
class TestFsspecStoreOnIosvc(StoreTests[FsspecStore, cpu.Buffer]):  # type: ignore[misc]
    """zarr's own contract tests for ``FsspecStore``, as zarr runs them on s3fs."""

    store_cls = FsspecStore
    buffer_cls = cpu.Buffer

    @pytest.fixture
    def store_kwargs(
        self, cluster_file: str, fs: IosvcFileSystem, prefix: str
    ) -> dict[str, object]:
        # An asynchronous instance belongs to the event loop of the test that made it, and
        # pytest-asyncio gives every test a new loop: start each test from a fresh instance.
        IosvcFileSystem.clear_instance_cache()
        async_fs = IosvcFileSystem(cluster=cluster_file, asynchronous=True)
        return {"fs": async_fs, "path": prefix}

    @pytest.fixture
    def store(self, store_kwargs: dict[str, object]) -> FsspecStore:
        return self.store_cls(**store_kwargs)

    async def get(self, store: FsspecStore, key: str) -> Buffer:
        # Bypasses the store: a synchronous instance, as zarr's s3fs tests do.
        sync_fs = IosvcFileSystem(cluster=store.fs.storage_options["cluster"])
        return self.buffer_cls.from_bytes(sync_fs.cat_file(f"{store.path}/{key}"))

    async def set(self, store: FsspecStore, key: str, value: Buffer) -> None:
        sync_fs = IosvcFileSystem(cluster=store.fs.storage_options["cluster"])
        sync_fs.pipe_file(f"{store.path}/{key}", value.to_bytes())

    def test_store_repr(self, store: FsspecStore) -> None:
        assert str(store) == f"<FsspecStore(IosvcFileSystem, {store.path})>"

    def test_store_supports_writes(self, store: FsspecStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: FsspecStore) -> None:
        assert store.supports_listing


async def test_fsspec_store_basics(
    options: dict[str, str], fs: IosvcFileSystem, prefix: str
) -> None:
    store = FsspecStore.from_url(f"iosvc://{prefix}/spam/", storage_options=options)
    assert store.fs.asynchronous and isinstance(store.fs, IosvcFileSystem)
    assert store.path == f"{prefix}/spam"
    proto = default_buffer_prototype()
    await store.set("foo", cpu.Buffer.from_bytes(b"hello world"))
    assert await store.exists("foo")
    out = await store.get_partial_values(
        proto,
        [
            ("foo", OffsetByteRequest(6)),
            ("foo", RangeByteRequest(0, 5)),
            ("foo", SuffixByteRequest(3)),
            ("missing", None),
        ],
    )
    assert [b.to_bytes() if b is not None else None for b in out] == [
        b"world",
        b"hello",
        b"rld",
        None,
    ]
    await store.delete("foo")
    await store.delete("foo")  # deleting a missing key is not an error
    assert not await store.exists("foo")


# ------------------------------------------------------------------------- zarr arrays
@pytest.mark.parametrize("shards", [None, (20, 20)], ids=["chunks", "sharded"])
def test_zarr_v3_array_blosc(
    options: dict[str, str], fs: IosvcFileSystem, prefix: str, shards: tuple[int, int] | None
) -> None:
    url = f"iosvc://{prefix}/arr.zarr"
    data = np.arange(40 * 30, dtype="float64").reshape(40, 30)
    arr = zarr.create_array(
        url,
        shape=data.shape,
        chunks=(10, 10),
        shards=shards,
        dtype=data.dtype,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        storage_options=options,
    )
    arr[:] = data
    arr[5:15, 3] = -1.0  # a partial update across chunks
    data[5:15, 3] = -1.0
    back = zarr.open_array(url, mode="r", storage_options=options)
    assert back.metadata.zarr_format == 3
    np.testing.assert_array_equal(back[:], data)
    np.testing.assert_array_equal(back[7:33, 12:21], data[7:33, 12:21])
    assert fs.exists(f"{prefix}/arr.zarr/zarr.json")
    # Compressed: the chunk bytes stored are fewer than the array's.
    stored = sum(size for name, size in fs.du(f"{prefix}/arr.zarr", total=False).items())
    assert stored < data.nbytes


def test_zarr_v2_array_numcodecs_blosc(
    options: dict[str, str], fs: IosvcFileSystem, prefix: str
) -> None:
    url = f"iosvc://{prefix}/v2.zarr"
    data = np.random.default_rng(0).integers(0, 100, size=(50, 50), dtype="int32")
    arr = zarr.create_array(
        url,
        shape=data.shape,
        chunks=(16, 16),
        dtype=data.dtype,
        zarr_format=2,
        compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
        storage_options=options,
    )
    arr[:] = data
    back = zarr.open_array(url, mode="r", storage_options=options)
    assert back.metadata.zarr_format == 2
    np.testing.assert_array_equal(back[:], data)
    assert fs.exists(f"{prefix}/v2.zarr/.zarray")


def test_zarr_group_and_consolidated_metadata(
    options: dict[str, str], fs: IosvcFileSystem, prefix: str
) -> None:
    url = f"iosvc://{prefix}/group.zarr"
    root = zarr.open_group(url, mode="w", storage_options=options, zarr_format=2)
    root.attrs["title"] = "burst buffer"
    temps = root.create_array("climate/temp", shape=(6, 4), chunks=(3, 2), dtype="f4")
    temps[:] = np.ones((6, 4), dtype="f4")
    root.create_array("climate/mask", shape=(6,), chunks=(6,), dtype="bool")
    zarr.consolidate_metadata(FsspecStore.from_url(url, storage_options=options))
    assert fs.exists(f"{prefix}/group.zarr/.zmetadata")

    group = zarr.open_consolidated(url, mode="r", storage_options=options)
    assert group.attrs["title"] == "burst buffer"
    assert sorted(name for name, _ in group.members(max_depth=None)) == [
        "climate",
        "climate/mask",
        "climate/temp",
    ]
    np.testing.assert_array_equal(group["climate/temp"][:], np.ones((6, 4), dtype="f4"))
    # Without consolidation the same tree is found by listing.
    plain = zarr.open_group(url, mode="r", storage_options=options, use_consolidated=False)
    assert sorted(plain.group_keys()) == ["climate"]


async def test_zarr_async_api(options: dict[str, str], fs: IosvcFileSystem, prefix: str) -> None:
    url = f"iosvc://{prefix}/async.zarr"
    group = await zarr.api.asynchronous.open_group(url, mode="w", storage_options=options)
    arr = await group.create_array("x", shape=(100,), chunks=(10,), dtype="i8")
    await arr.setitem(slice(None), np.arange(100))
    again = await zarr.api.asynchronous.open_group(url, mode="r", storage_options=options)
    x = await again.getitem("x")
    np.testing.assert_array_equal(await x.getitem(slice(20, 30)), np.arange(20, 30))


# --------------------------------------------------------------------- pandas / pyarrow
@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(42)
    return pd.DataFrame(
        {
            "job": np.repeat(["a", "b", "c"], 100),
            "bytes": rng.integers(0, 1 << 30, size=300),
            "wait": rng.random(300),
        }
    )


def test_pandas_parquet(
    options: dict[str, str], fs: IosvcFileSystem, prefix: str, frame: pd.DataFrame
) -> None:
    url = f"iosvc://{prefix}/df.parquet"
    frame.to_parquet(url, storage_options=options, compression="zstd")
    assert fs.isfile(f"{prefix}/df.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(url, storage_options=options), frame)
    subset = pd.read_parquet(url, storage_options=options, columns=["wait"])
    pd.testing.assert_frame_equal(subset, frame[["wait"]])


def test_pandas_csv(
    options: dict[str, str], fs: IosvcFileSystem, prefix: str, frame: pd.DataFrame
) -> None:
    url = f"iosvc://{prefix}/df.csv"
    frame.to_csv(url, storage_options=options, index=False)
    pd.testing.assert_frame_equal(pd.read_csv(url, storage_options=options), frame)
    gz = f"iosvc://{prefix}/df.csv.gz"
    frame.to_csv(gz, storage_options=options, index=False, compression="gzip")
    pd.testing.assert_frame_equal(pd.read_csv(gz, storage_options=options), frame)


def test_pyarrow_parquet_with_filesystem(
    fs: IosvcFileSystem, prefix: str, frame: pd.DataFrame
) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    path = f"{prefix}/tables/t.parquet"
    pq.write_table(table, path, filesystem=fs, row_group_size=64)
    back = pq.read_table(path, filesystem=fs)
    assert back.equals(table)
    meta = pq.ParquetFile(fs.open(path, "rb")).metadata
    assert meta.num_rows == 300 and meta.num_row_groups == 5


def test_pyarrow_dataset_over_a_directory(
    fs: IosvcFileSystem, prefix: str, frame: pd.DataFrame, tmp_path: Path
) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    root = f"{prefix}/ds"
    for n, part in enumerate(range(0, 300, 75)):
        pq.write_table(table.slice(part, 75), f"{root}/part-{n}.parquet", filesystem=fs)
    dataset = ds.dataset(root, filesystem=fs, format="parquet")
    assert sorted(Path(f).name for f in dataset.files) == [f"part-{n}.parquet" for n in range(4)]
    assert dataset.to_table().sort_by("bytes").equals(table.sort_by("bytes"))
    assert dataset.count_rows(filter=ds.field("job") == "b") == 100

    # Hive-partitioned: directories made by pyarrow through the filesystem.
    hive = f"{prefix}/hive"
    pq.write_to_dataset(table, hive, partition_cols=["job"], filesystem=fs)
    assert fs.ls(hive, detail=False) == [f"{hive}/job=a", f"{hive}/job=b", f"{hive}/job=c"]
    parted = ds.dataset(hive, filesystem=fs, format="parquet", partitioning="hive")
    got = parted.to_table(filter=ds.field("job") == "c")
    assert got.num_rows == 100

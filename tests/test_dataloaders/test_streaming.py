"""StreamingDataset in DataLoaders: coverage, order, resume, fork rule, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import dataloaders
from dataloaders import (
    DataLoader,
    ShardCorrupted,
    ShardedDataset,
    ShardNotFound,
    StreamingDataset,
    write_shards,
)

from .helpers import corrupt, ids_of, make_samples

N = 300
BATCH = 16


def _loader(url: str, workers: int, **kwargs: Any) -> DataLoader:
    ds = StreamingDataset(url, seed=kwargs.pop("seed", 5), **kwargs)
    return DataLoader(ds, batch_size=BATCH, num_workers=workers)


@pytest.fixture
def iosvc_dataset(iosvc_url: str) -> str:
    write_shards(make_samples(N), iosvc_url, shard_bytes=32 << 10)
    return iosvc_url


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_is_complete_local(small_dataset: str, workers: int) -> None:
    loader = _loader(small_dataset, workers)
    ids = ids_of(loader)
    assert sorted(ids) == list(range(N))
    assert len(loader) == -(-N // BATCH)


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_is_complete_on_iosvc(iosvc_dataset: str, workers: int) -> None:
    # This process wrote the shards through gRPC: workers must not be forked from it, and
    # the DataLoader chooses forkserver by itself.
    loader = _loader(iosvc_dataset, workers)
    ids = ids_of(loader)
    assert sorted(ids) == list(range(N))
    if workers:
        assert loader.multiprocessing_context is not None
        assert loader.multiprocessing_context.get_start_method() == "forkserver"


def test_plain_fork_after_grpc_reads_over_the_data_ports(iosvc_dataset: str) -> None:
    # This process used gRPC (it wrote the shards), but readers need none: the cluster file
    # lists the servers' data ports, which carry the metadata and the chunks.
    ds = StreamingDataset(iosvc_dataset, batch_size=BATCH)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, num_workers=2, multiprocessing_context="fork"
    )
    assert sorted(ids_of(loader)) == list(range(N))


def test_plain_fork_after_grpc_fails_with_the_rule_when_reads_need_grpc(
    iosvc_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOSVC_DATA_PLANE", "0")  # every read through gRPC
    ds = StreamingDataset(iosvc_dataset, batch_size=BATCH)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, num_workers=1, multiprocessing_context="fork"
    )
    with pytest.raises(RuntimeError, match="forkserver"):
        list(loader)


def test_same_seed_same_order_new_epoch_new_order(small_dataset: str) -> None:
    first = ids_of(_loader(small_dataset, 0))
    again_loader = _loader(small_dataset, 0)
    assert ids_of(again_loader) == first
    second_epoch = ids_of(again_loader)  # the loader advanced the epoch
    assert sorted(second_epoch) == sorted(first) and second_epoch != first
    assert ids_of(_loader(small_dataset, 0, seed=6)) != first
    # The order depends on the canonical stream count (default: ranks x workers of the first
    # run, then kept in the state), not on the number of workers reading it.
    assert ids_of(_loader(small_dataset, 2, num_canonical=1)) == first
    assert ids_of(_loader(small_dataset, 2)) != first


def test_persistent_workers_advance_epochs(small_dataset: str) -> None:
    reference = _loader(small_dataset, 0)
    epochs = [ids_of(reference) for _ in range(3)]
    ds = StreamingDataset(small_dataset, seed=5, num_canonical=1)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, persistent_workers=True)
    assert [ids_of(loader) for _ in range(3)] == epochs
    # set_epoch by hand restarts the (stale) persistent workers.
    ds.set_epoch(1)
    assert ids_of(loader) == epochs[1]


def test_in_process_dataset_counts_itself(small_dataset: str) -> None:
    """num_workers=0 with a plain DataLoader: the dataset's own state_dict is exact."""
    ds = StreamingDataset(small_dataset, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH)
    it = iter(loader)
    head = ids_of([next(it) for _ in range(4)])
    state = ds.state_dict()
    assert state["position"] == 4 * BATCH
    rest_ds = StreamingDataset(small_dataset)
    rest_ds.load_state_dict(state)
    rest = ids_of(torch.utils.data.DataLoader(rest_ds, batch_size=BATCH))
    assert sorted(head + rest) == list(range(N))


@pytest.mark.parametrize(("before", "after"), [(0, 0), (2, 2), (2, 0), (0, 2), (2, 1)])
def test_resume_mid_epoch_exactly(small_dataset: str, before: int, after: int) -> None:
    full = ids_of(_loader(small_dataset, before))  # the run that is not interrupted
    loader = _loader(small_dataset, before)
    it = iter(loader)
    head = ids_of([next(it) for _ in range(5)])
    state = loader.state_dict()
    del it  # the "killed" run
    resumed = _loader(small_dataset, after, seed=0)  # the state carries the seed
    resumed.load_state_dict(state)
    rest = ids_of(resumed)
    assert head == full[: 5 * BATCH]
    assert rest == full[5 * BATCH :]  # exactly the remaining samples, in order
    # The run then goes on with the next epoch, as an uninterrupted run would.
    uninterrupted = _loader(small_dataset, before)
    ids_of(uninterrupted)
    next_epoch = ids_of(resumed)
    assert sorted(next_epoch) == list(range(N))
    if before == after:
        assert next_epoch == ids_of(uninterrupted)


def test_resume_twice_in_one_epoch(small_dataset: str) -> None:
    full = ids_of(_loader(small_dataset, 2))
    seen: list[int] = []
    state = None
    for stop in (3, 4):
        loader = _loader(small_dataset, 2)
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        seen += ids_of([next(it) for _ in range(stop)])
        state = loader.state_dict()
        del it
    loader = _loader(small_dataset, 0)
    assert state is not None
    loader.load_state_dict(state)
    seen += ids_of(loader)
    assert seen == full


def test_resume_refuses_a_rewritten_dataset(small_dataset: str) -> None:
    loader = _loader(small_dataset, 0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    write_shards(make_samples(N, seed=1), small_dataset, shard_bytes=16 << 10, overwrite=True)
    again = _loader(small_dataset, 0)
    again.load_state_dict(state)
    with pytest.raises(dataloaders.ManifestError, match="rewritten"):
        list(again)


def test_corrupted_shard_is_named(small_dataset: str) -> None:
    corrupt(Path(small_dataset) / "shard-00003.raw")
    with pytest.raises(ShardCorrupted, match=r"shard-00003.*checksum"):
        list(StreamingDataset(small_dataset))
    with pytest.raises(ShardCorrupted, match="shard-00003"):
        dataloaders.verify_shards(small_dataset)
    # Through worker processes the error keeps its type and names the shard.
    with pytest.raises(ShardCorrupted, match="shard-00003"):
        ids_of(_loader(small_dataset, 2))


def test_missing_shard_is_named(iosvc_dataset: str) -> None:
    fs = fsspec.filesystem("iosvc")
    fs.rm(iosvc_dataset + "/shard-00002.raw")
    with pytest.raises(ShardNotFound, match=r"shard-00002.*missing"):
        list(StreamingDataset(iosvc_dataset))
    with pytest.raises(ShardNotFound, match="shard-00002"):
        ShardedDataset(iosvc_dataset).__getitems__(list(range(N)))


def test_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(ShardNotFound, match="no dataset at"):
        len(StreamingDataset(str(tmp_path / "nothing")))


def test_drop_remainder_with_ranks(small_dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK/WORLD_SIZE from the environment (no process group): 7 ranks, 300 samples."""
    seen: dict[str, list[int]] = {"pad": [], "drop": []}
    for remainder in seen:
        counts = []
        for rank in range(7):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "7")
            ds = StreamingDataset(small_dataset, remainder=remainder)
            mine = [s["id"] for s in ds]
            counts.append(len(mine))
            assert len(mine) == len(ds)
            seen[remainder] += mine
        assert len(set(counts)) == 1
    assert sorted(set(seen["pad"])) == list(range(N)) and len(seen["pad"]) == 301
    assert len(seen["drop"]) == 294 and len(set(seen["drop"])) == 294


def test_map_style_in_a_dataloader(small_dataset: str) -> None:
    ds = ShardedDataset(small_dataset, cache_bytes=64 << 10)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=2)
    assert sorted(ids_of(loader)) == list(range(N))
    assert ds[-1]["id"] == N - 1
    with pytest.raises(IndexError):
        ds[N]


def test_transform_and_small_cache(small_dataset: str) -> None:
    ds = StreamingDataset(small_dataset, transform=lambda s: s["id"] * 2, cache_bytes=1, prefetch=1)
    assert sorted(ds) == [2 * i for i in range(N)]


def test_collate_gives_tensors(small_dataset: str) -> None:
    batch = next(iter(_loader(small_dataset, 0)))
    assert isinstance(batch["label"], torch.Tensor) and batch["label"].shape == (BATCH,)
    assert isinstance(batch["image"], list) and isinstance(batch["image"][0], bytes)


def test_dataloader_rejects_mismatched_batch_size(small_dataset: str) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(StreamingDataset(small_dataset, batch_size=8), batch_size=16)
    ds = StreamingDataset(small_dataset)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    with pytest.raises(ValueError, match="batch_size"):
        list(loader)


def test_public_api() -> None:
    assert set(dataloaders.__all__) >= {"write_shards", "StreamingDataset", "DataLoader"}
    for name in dataloaders.__all__:
        assert hasattr(dataloaders, name)
    assert "iosvc" not in " ".join(
        line
        for p in Path(dataloaders.__file__).parent.glob("*.py")
        for line in p.read_text().splitlines()
        if line.startswith(("import ", "from "))
    )
    # Names load on first use: an iosvc server and client import dataloaders._huge, and
    # no torch; the DataLoader's forkserver loads them all before it forks workers.
    for code in (
        "import sys, iosvc.server._stores, iosvc.client; sys.exit('torch' in sys.modules)",
        "import sys, dataloaders._preload; sys.exit('dataloaders._formats' not in sys.modules)",
    ):
        assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0, code
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dataloaders.nope  # noqa: B018


@pytest.mark.parametrize(
    ("workers", "fmt"),
    [
        (0, "records"),
        (2, "records"),
        (0, "arrays"),
        (2, "arrays"),
        (0, "arrays-16k"),
        (2, "arrays-16k"),
        (0, "raw"),
        (2, "raw-bytes"),
    ],
)
def test_batches_made_in_the_dataset_equal_default_collate(
    local_url: str, workers: int, fmt: str
) -> None:
    """dataloaders.DataLoader collates in the dataset (gathering each shard's samples straight
    into the batch): the same batches as a plain DataLoader collating sample by sample."""
    import numpy as np

    # 16 KiB samples are one per zarr chunk: decoded straight into the batch's rows.
    shape = (64, 64) if fmt == "arrays-16k" else (3, 2)
    samples = [
        (
            {"x": os.urandom(i * 7 % 300)}  # blobs only: gathered without per-sample dicts
            if fmt == "raw-bytes"
            else {"x": np.random.default_rng(i).normal(size=shape).astype(np.float32)}
        )
        | {"y": i, "f": i / 2}
        | ({} if fmt.startswith("arrays") else {"s": f"n{i}"})
        for i in range(70)
    ]
    shard_bytes = 200 << 10 if fmt == "arrays-16k" else 1 << 10
    write_shards(samples, local_url, format=fmt.split("-")[0], shard_bytes=shard_bytes)
    fast = DataLoader(
        StreamingDataset(local_url, seed=1, num_canonical=1), batch_size=16, num_workers=workers
    )
    plain_ds = StreamingDataset(local_url, seed=1, num_canonical=1, batch_size=16)
    plain = torch.utils.data.DataLoader(plain_ds, batch_size=16, num_workers=workers)
    assert fast.batch_size == 16 and len(fast) == len(plain) == 5
    for a, b in zip(fast, plain, strict=True):
        assert a.keys() == b.keys() and a.get("s") == b.get("s")
        if fmt == "raw-bytes":
            assert a["x"] == b["x"]
        for key in ("y", "f") if fmt == "raw-bytes" else ("x", "y", "f"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])


def test_drop_last(small_dataset: str) -> None:
    loader = DataLoader(StreamingDataset(small_dataset), batch_size=32, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == N // 32
    assert all(len(b["id"]) == 32 for b in batches)


def test_array_batches_are_made_in_shared_memory_inside_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's batch goes to the main process in shared memory: decoded there directly,
    it is not copied again when sent."""
    import numpy as np

    from dataloaders._dataset import _batch_tensor

    here = _batch_tensor((4, 3), np.dtype("float32"))
    assert here.shape == (4, 3) and here.dtype == torch.float32 and not here.is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    shared = _batch_tensor((4, 3), np.dtype("<i8"))
    assert shared.shape == (4, 3) and shared.dtype == torch.int64 and shared.is_shared()
    shared.numpy()[:] = 7  # the numpy view writes the tensor's shared storage
    assert int(shared.sum()) == 84

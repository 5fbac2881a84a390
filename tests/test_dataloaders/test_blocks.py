"""Block checksums: shards verified block by block as their samples are read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dataloaders
from dataloaders import ShardCorrupted, ShardNotFound, StreamingDataset, write_shards
from dataloaders._blocks import BLOCK, BlockChecker, block_sums

from .helpers import corrupt, make_samples, smooth_field


def _big_samples(n: int) -> list[dict[str, object]]:
    """Samples of 4-16 KiB (as the benchmark's images): a shard spans many blocks."""
    rng = np.random.default_rng(5)
    return [
        {"image": rng.integers(0, 256, int(rng.integers(4096, 16384)), np.uint8).tobytes(), "id": i}
        for i in range(n)
    ]


def _sample_offsets(shard: Path, n: int) -> np.ndarray:
    """End offset of each sample's blob in a raw shard with one blob field."""
    data = shard.read_bytes()
    ends_len, json_len = np.frombuffer(data[-24:-8], dtype="<u8")
    footer = len(data) - 24 - int(json_len) - int(ends_len)
    return np.frombuffer(data[footer : footer + int(ends_len)], dtype="<u8")[:n]


def test_raw_and_arrays_shards_get_block_checksums(tmp_path: Path) -> None:
    summary = write_shards(_big_samples(200), str(tmp_path / "raw"), shard_bytes=1 << 20)
    for shard in summary.manifest.shards:
        assert shard.sums is not None and shard.block == BLOCK
        data = (tmp_path / "raw" / shard.files[0].path).read_bytes()
        assert (tmp_path / "raw" / shard.sums.path).read_bytes() == block_sums(data)
    records = write_shards(make_samples(50), str(tmp_path / "rec"), format="records")
    assert all(s.sums is None for s in records.manifest.shards)  # verified whole instead
    assert not list((tmp_path / "rec").glob("*.xxh3"))


def test_a_corrupt_sample_stops_the_epoch_there_and_nothing_corrupt_is_yielded(
    tmp_path: Path,
) -> None:
    url = str(tmp_path / "ds")
    samples = _big_samples(300)
    write_shards(samples, url, shard_bytes=8 << 20)  # one shard of ~3 MiB: ~45 blocks
    shard = tmp_path / "ds" / "shard-00000.raw"
    ends = _sample_offsets(shard, 300)
    victim = 200
    corrupt(shard, int(ends[victim]) - 5)  # the last bytes of sample 200
    got = []
    with pytest.raises(ShardCorrupted, match=r"shard-00000.*shard-00000\.raw: bytes \d+-\d+ fail"):
        for sample in StreamingDataset(url, shuffle=False):
            got.append(sample)
    # Lazily: the samples before the corrupt block came out, every one of them intact.
    assert 100 < len(got) <= victim
    assert all(s["image"] == samples[s["id"]]["image"] for s in got)
    # The whole-file check still sees it.
    with pytest.raises(ShardCorrupted, match=r"shard-00000\.raw fails its xxh3"):
        dataloaders.verify_shards(url)


def test_a_corrupt_footer_fails_at_load(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_shards(_big_samples(100), url, shard_bytes=8 << 20)
    shard = tmp_path / "ds" / "shard-00000.raw"
    corrupt(shard, shard.stat().st_size - 30)  # inside the footer's JSON
    with pytest.raises(ShardCorrupted, match="shard-00000"):
        next(iter(StreamingDataset(url)))


def test_corrupt_or_missing_block_checksums_are_named(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_shards(_big_samples(200), url, shard_bytes=1 << 20)
    sums = tmp_path / "ds" / "shard-00001.xxh3"
    corrupt(sums, 3)
    with pytest.raises(ShardCorrupted, match=r"shard-00001.*shard-00001\.xxh3 fails its xxh3"):
        list(StreamingDataset(url))
    sums.unlink()
    with pytest.raises(ShardNotFound, match=r"shard-00001.*shard-00001\.xxh3 is missing"):
        list(StreamingDataset(url))


def test_verify_shards_checks_the_block_checksums_against_the_files(tmp_path: Path) -> None:
    """A sums file that disagrees with its (intact) shard: a reader would fail mid-epoch,
    so the full check says so up front."""
    url = str(tmp_path / "ds")
    write_shards(_big_samples(200), url, shard_bytes=1 << 20)
    sums = tmp_path / "ds" / "shard-00000.xxh3"
    bad = bytearray(sums.read_bytes())
    bad[9] ^= 1  # block 1's checksum
    sums.write_bytes(bytes(bad))
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    import xxhash

    manifest["shards"][0]["block_sums"]["xxh3_64"] = xxhash.xxh3_64_hexdigest(bytes(bad))
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardCorrupted, match=r"shard-00000\.raw: bytes 65536-131072 fail"):
        dataloaders.verify_shards(url)


def test_shards_without_block_checksums_are_verified_whole(tmp_path: Path) -> None:
    """Datasets written before block checksums: same samples, same errors."""
    url = str(tmp_path / "ds")
    samples = _big_samples(200)
    write_shards(samples, url, shard_bytes=1 << 20)
    path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(path.read_text())
    for shard in manifest["shards"]:
        del shard["block_sums"]
    path.write_text(json.dumps(manifest))
    for sums in (tmp_path / "ds").glob("*.xxh3"):
        sums.unlink()
    assert sorted(s["id"] for s in StreamingDataset(url)) == list(range(200))
    corrupt(tmp_path / "ds" / "shard-00001.raw", 7)
    with pytest.raises(ShardCorrupted, match=r"shard-00001\.raw fails its xxh3"):
        list(StreamingDataset(url))


def test_arrays_shards_are_checked_by_block(tmp_path: Path) -> None:
    url = str(tmp_path / "arr")
    fields = smooth_field(2000, shape=(64, 64))
    write_shards(({"x": f, "id": i} for i, f in enumerate(fields)), url, format="arrays")
    (chunk,) = (tmp_path / "arr").glob("shard-00000.zarr/x/c/*/*/*")
    corrupt(chunk, chunk.stat().st_size // 2)
    got = []
    with pytest.raises(ShardCorrupted, match=r"shard-00000.*fail their xxh3"):
        for sample in StreamingDataset(url, shuffle=False):
            got.append(sample)
    assert got  # the blocks before the corrupt one were read, and intact
    for sample in got:
        np.testing.assert_array_equal(sample["x"], fields[sample["id"]])


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 5 * 4096),
    bad=st.integers(0, 5 * 4096 - 1),
    spans=st.lists(st.tuples(st.integers(0, 5 * 4096), st.integers(0, 9000)), max_size=8),
)
def test_block_checker_raises_exactly_when_a_range_reaches_the_bad_block(
    size: int, bad: int, spans: list[tuple[int, int]]
) -> None:
    block = 4096
    data = bytearray(np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes())
    sums = np.frombuffer(block_sums(data, block), dtype="<u8")
    bad %= size
    data[bad] ^= 0xFF
    starts = np.array([min(a, size) for a, _ in spans], dtype=np.int64)
    stops = np.array([min(a + n, size) for a, n in spans], dtype=np.int64)
    reaches = any(
        a // block <= bad // block <= (z - 1) // block
        for a, z in zip(starts, stops, strict=True)
        if z > a
    )
    for vectorised in (True, False):
        checker = BlockChecker(data, sums, block, "f")
        try:
            if vectorised:
                checker.check_spans(starts, stops)
            else:
                for a, z in zip(starts.tolist(), stops.tolist(), strict=True):
                    checker.check(a, z)
        except ShardCorrupted:
            assert reaches
        else:
            assert not reaches

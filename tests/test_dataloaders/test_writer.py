"""The shard writer and the three formats, on local disk, memory:// and a real iosvc cluster."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer import Typer
from typer.testing import CliRunner

import dataloaders
from dataloaders import ShardedDataset, StreamingDataset, write_shards

from .helpers import make_samples, smooth_field


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, np.ndarray):
            if not (isinstance(other, np.ndarray) and np.array_equal(value, other)):
                return False
            if value.dtype != other.dtype:
                return False
        elif value != other:
            return False
    return True


def test_raw_round_trip_everywhere(any_url: str) -> None:
    samples = make_samples(120)
    summary = write_shards(samples, any_url, shard_bytes=16 << 10)
    assert summary.format == "raw"  # random bytes do not compress: stored as given
    assert summary.samples == 120 and summary.shards > 3
    assert 0.95 < summary.ratio <= 1.0
    mapped = ShardedDataset(any_url)
    assert len(mapped) == 120
    assert all(_same(mapped[i], samples[i]) for i in range(120))
    streamed = sorted(StreamingDataset(any_url, seed=3), key=lambda s: s["id"])
    assert all(_same(a, b) for a, b in zip(streamed, samples, strict=True))


def test_arrays_format_is_zarr_and_compresses_smooth_floats(any_url: str) -> None:
    field = smooth_field(200)
    labels = np.arange(200) % 7
    summary = write_shards({"x": field, "y": labels}, any_url, shard_bytes=256 << 10)
    assert summary.format == "arrays"
    spec = summary.manifest.field("x")
    assert spec.codec.startswith("blosc-lz4") and spec.dtype == "<f4" and spec.shape == (32, 32)
    # Blosc shuffle on typed arrays: at most 0.6x of the raw size (the target).
    assert summary.bytes <= 0.6 * field.nbytes
    mapped = ShardedDataset(any_url)
    for i in (0, 57, 199):
        sample = mapped[i]
        assert np.array_equal(sample["x"], field[i]) and sample["y"] == labels[i]
        assert sample["x"].flags.writeable  # torch.as_tensor would warn on read-only arrays
    # Each shard is a zarr v3 group that zarr itself reads.
    first = summary.manifest.shards[0]
    arr = zarr.open_array(f"{any_url}/{first.name}.zarr/x", mode="r")
    assert arr.shape == (first.samples, 32, 32)
    assert np.array_equal(arr[:], field[: first.samples])
    ys = zarr.open_array(f"{any_url}/{first.name}.zarr/y", mode="r")
    assert np.array_equal(ys[:], labels[: first.samples])


def test_records_format_codec_per_column(local_url: str) -> None:
    samples = [
        {
            "text": f"sample {i} " * 40,
            "blob": bytes([i % 256]) * 300,
            "jpeg": np.random.default_rng(i).bytes(500),
            "vec": np.arange(64, dtype=np.int32) + i,
            "score": i / 3,
        }
        for i in range(200)
    ]
    summary = write_shards(samples, local_url, shard_bytes=64 << 10, codecs={"blob": "lz4"})
    assert summary.format == "records"
    codecs = {f.name: f.codec for f in summary.manifest.fields}
    assert codecs["text"].startswith("zstd")  # compressible: probed and chosen
    assert codecs["blob"].startswith("lz4")  # given
    assert codecs["jpeg"] == "none"  # incompressible: stored as it is
    assert codecs["vec"].startswith("blosc-zstd")  # integers: zstd + shuffle
    assert codecs["score"] == "none"
    assert summary.ratio > 1.5
    mapped = ShardedDataset(local_url)
    assert all(_same(mapped[i], samples[i]) for i in range(0, 200, 7))
    batch = mapped.__getitems__([3, 150, 4])
    assert [b["score"] for b in batch] == [1.0, 50.0, 4 / 3]
    # Any Arrow reader opens a shard; the codec is in the column metadata too.
    import pyarrow as pa

    path = Path(local_url) / f"{summary.manifest.shards[0].name}.arrow"
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    meta = json.loads(table.schema.field("text").metadata[b"dataloaders"])
    assert meta["codec"] == codecs["text"]


def test_manifest_lists_sizes_checksums_and_schema(small_dataset: str) -> None:
    doc = json.loads((Path(small_dataset) / "manifest.json").read_text())
    assert doc["kind"] == "iosvc-shards" and doc["format"] == "raw" and doc["samples"] == 300
    assert [f["name"] for f in doc["fields"]] == ["image", "label", "id"]
    total = 0
    for shard in doc["shards"]:
        for entry in shard["files"]:
            data = (Path(small_dataset) / entry["path"]).read_bytes()
            assert len(data) == entry["size"] and len(entry["xxh3_64"]) == 16
        total += shard["samples"]
    assert total == 300


def test_empty_dataset(any_url: str) -> None:
    summary = write_shards([], any_url)
    assert summary.samples == 0 and summary.shards == 0
    ds = StreamingDataset(any_url)
    assert list(ds) == [] and len(ds) == 0
    assert len(ShardedDataset(any_url)) == 0
    loader = dataloaders.DataLoader(StreamingDataset(any_url), batch_size=4)
    assert list(loader) == []


def test_overwrite_and_refusal(local_url: str) -> None:
    write_shards(make_samples(50), local_url, shard_bytes=8 << 10)
    with pytest.raises(FileExistsError):
        write_shards(make_samples(5), local_url)
    write_shards(make_samples(5), local_url, overwrite=True)
    assert len(ShardedDataset(local_url)) == 5
    assert sorted(p.name for p in Path(local_url).iterdir()) == [
        "manifest.json",
        "shard-00000.raw",
        "shard-00000.xxh3",
    ]


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ([{"x": np.zeros(3)}, {"x": np.zeros(4)}], "fixed shape"),
        ([{"x": 1}, {"y": 1}], "has fields"),
        ([{"x": object()}], "not supported"),
    ],
)
def test_bad_samples_are_named(local_url: str, samples: list[Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        write_shards(samples, local_url)


def test_arrays_format_refuses_bytes(local_url: str) -> None:
    with pytest.raises(ValueError, match="format='records'"):
        write_shards([{"b": b"x"}], local_url, format="arrays")


def test_unknown_codec_and_format(local_url: str) -> None:
    with pytest.raises(ValueError, match="known:"):
        write_shards([{"b": b"x"}], local_url, format="records", codecs={"b": "brotli"})
    with pytest.raises(ValueError, match="known:"):
        write_shards([{"b": b"x"}], local_url, format="tar")


def _tree(root: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    files = {}
    for cls in ("cat", "dog", "owl"):
        for i in range(7):
            data = rng.bytes(int(rng.integers(100, 3000)))
            path = root / cls / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[f"{cls}/{i}.jpg"] = data
    return files


def test_pack_directory_imagefolder(tmp_path: Path, iosvc_url: str) -> None:
    files = _tree(tmp_path / "src")
    summary = dataloaders.pack_directory(str(tmp_path / "src"), iosvc_url, shard_bytes=8 << 10)
    assert summary.format == "raw" and summary.samples == 21
    assert summary.manifest.attrs["classes"] == ["cat", "dog", "owl"]
    seen = {s["path"]: s for s in StreamingDataset(iosvc_url)}
    assert {p: s["data"] for p, s in seen.items()} == files
    assert {s["label"] for s in seen.values() if s["path"].startswith("owl/")} == {2}


def test_cli_pack_info_verify(tmp_path: Path, iosvc_url: str, use_cluster: str) -> None:
    from iosvc.cli._shards import shards_app

    _tree(tmp_path / "src")
    app = Typer()
    app.add_typer(shards_app, name="shards")
    runner = CliRunner()
    result = runner.invoke(app, ["shards", "pack", str(tmp_path / "src"), iosvc_url])
    assert result.exit_code == 0, result.output
    assert "packed 21 files in 3 classes" in result.output
    assert re.search(r"compression ratio (0\.9\d|1\.00)", result.output), result.output
    result = runner.invoke(app, ["shards", "info", iosvc_url])
    assert result.exit_code == 0 and "21 samples" in result.output, result.output
    result = runner.invoke(app, ["shards", "verify", iosvc_url])
    assert result.exit_code == 0 and "all checksums match" in result.output, result.output
    # records with a codec: text files compress.
    text = tmp_path / "txt"
    text.mkdir()
    for i in range(20):
        (text / f"{i}.txt").write_text("the quick brown fox " * 50)
    out = str(tmp_path / "packed")
    result = runner.invoke(
        app, ["shards", "pack", str(text), out, "--format", "records", "--codec", "zstd"]
    )
    assert result.exit_code == 0, result.output
    ratio = float(result.output.split("compression ratio ")[1].split()[0])
    assert ratio > 5

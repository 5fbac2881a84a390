"""dataloaders: compressed shards streamed from iosvc (or any fsspec URL) into PyTorch training.

Write a dataset once, read it in any DataLoader, DDP job or notebook::

    import dataloaders

    dataloaders.write_shards(samples, "iosvc://datasets/digits")  # iterable of dicts
    ds = dataloaders.StreamingDataset("iosvc://datasets/digits", seed=0)
    loader = dataloaders.DataLoader(ds, batch_size=256, num_workers=2)
    for batch in loader:
        ...
    checkpoint = loader.state_dict()  # resume exactly, on any number of ranks/workers

Shard formats: ``raw`` (blobs as given, e.g. JPEG), ``records`` (Arrow IPC, a codec per
column), ``arrays`` (zarr v3 with Blosc). This package uses fsspec only and never imports
iosvc; ``iosvc://`` URLs work through iosvc's fsspec entry point.
"""

from dataloaders._codecs import CODECS, choose_array_codec, choose_bytes_codec, get_codec
from dataloaders._dataset import ShardedDataset, StreamingDataset, load_manifest, verify_shards
from dataloaders._errors import ManifestError, ShardCorrupted, ShardError, ShardNotFound
from dataloaders._formats import FORMATS, get_format
from dataloaders._loader import DataLoader
from dataloaders._manifest import FieldSpec, FileEntry, Manifest, ShardEntry
from dataloaders._order import Plan, epoch_order, plan
from dataloaders._world import World
from dataloaders._writer import WriteSummary, pack_directory, write_shards

__all__ = [
    "CODECS",
    "FORMATS",
    "DataLoader",
    "FieldSpec",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "Plan",
    "ShardCorrupted",
    "ShardEntry",
    "ShardError",
    "ShardNotFound",
    "ShardedDataset",
    "StreamingDataset",
    "World",
    "WriteSummary",
    "choose_array_codec",
    "choose_bytes_codec",
    "epoch_order",
    "get_codec",
    "get_format",
    "load_manifest",
    "pack_directory",
    "plan",
    "verify_shards",
    "write_shards",
]

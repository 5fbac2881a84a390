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

The names below are imported on first use (PEP 562), so that a process that needs one
helper module (an iosvc server uses :mod:`dataloaders._huge`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOMES = {
    "CODECS": "dataloaders._codecs",
    "choose_array_codec": "dataloaders._codecs",
    "choose_bytes_codec": "dataloaders._codecs",
    "get_codec": "dataloaders._codecs",
    "ShardedDataset": "dataloaders._dataset",
    "StreamingDataset": "dataloaders._dataset",
    "load_manifest": "dataloaders._dataset",
    "verify_shards": "dataloaders._dataset",
    "ManifestError": "dataloaders._errors",
    "ShardCorrupted": "dataloaders._errors",
    "ShardError": "dataloaders._errors",
    "ShardNotFound": "dataloaders._errors",
    "FORMATS": "dataloaders._formats",
    "get_format": "dataloaders._formats",
    "DataLoader": "dataloaders._loader",
    "FieldSpec": "dataloaders._manifest",
    "FileEntry": "dataloaders._manifest",
    "Manifest": "dataloaders._manifest",
    "ShardEntry": "dataloaders._manifest",
    "Plan": "dataloaders._order",
    "epoch_order": "dataloaders._order",
    "plan": "dataloaders._order",
    "World": "dataloaders._world",
    "WriteSummary": "dataloaders._writer",
    "pack_directory": "dataloaders._writer",
    "write_shards": "dataloaders._writer",
}


if not TYPE_CHECKING:  # type checkers see the imports above, and catch misspelt names

    def __getattr__(name: str) -> Any:
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module 'dataloaders' has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value  # looked up here from now on
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})

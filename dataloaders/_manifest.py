"""The manifest: one JSON file listing a dataset's schema and shards.

Example (``manifest.json`` beside the shards)::

    {"kind": "iosvc-shards", "version": 1, "format": "raw",
     "fields": [{"name": "image", "kind": "bytes", "codec": "none"},
                {"name": "label", "kind": "int", "codec": "none"}],
     "samples": 2, "bytes": 9000, "raw_bytes": 9000,
     "shards": [{"name": "shard-00000", "samples": 2, "raw_bytes": 9000,
                 "files": [{"path": "shard-00000.raw", "size": 9000, "xxh3_64": "…"}],
                 "block_sums": {"path": "shard-00000.xxh3", "size": 8, "xxh3_64": "…",
                                "block": 65536}}]}

``block_sums`` (raw and arrays shards) lets a reader verify a shard block by block as it
reads it (:mod:`dataloaders._blocks`); every file also has its whole-file checksum.

File paths are relative to the manifest's directory, so a dataset can be copied anywhere
(``iosvc put -r``, ``cp -r``) and still read.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from dataloaders._errors import ManifestError

__all__ = ["MANIFEST_NAME", "FieldSpec", "FileEntry", "Manifest", "ShardEntry"]

MANIFEST_NAME = "manifest.json"
KINDS = ("bytes", "str", "int", "float", "array")
FORMATS = ("raw", "records", "arrays")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of every sample.

    ``kind`` is ``bytes``, ``str``, ``int``, ``float`` or ``array`` (a numpy array of fixed
    ``dtype`` and ``shape``); ``codec`` is a name from :data:`dataloaders.CODECS`; ``chunk`` is
    the samples per compressed block in the ``arrays`` format.
    """

    name: str
    kind: str
    codec: str = "none"
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    chunk: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ManifestError(f"field {self.name!r}: unknown kind {self.kind!r}")
        if self.kind == "array" and (self.dtype is None or self.shape is None):
            raise ManifestError(f"array field {self.name!r} needs dtype and shape")

    @property
    def np_dtype(self) -> np.dtype[Any]:
        """The numpy dtype of an ``array`` field (``int64``/``float64`` for scalars)."""
        if self.dtype is not None:
            return np.dtype(self.dtype)
        return np.dtype("<i8") if self.kind == "int" else np.dtype("<f8")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "codec": self.codec}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.chunk is not None:
            out["chunk"] = self.chunk
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FieldSpec:
        shape = data.get("shape")
        return cls(
            name=data["name"],
            kind=data["kind"],
            codec=data.get("codec", "none"),
            dtype=data.get("dtype"),
            shape=None if shape is None else tuple(int(s) for s in shape),
            chunk=data.get("chunk"),
        )


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a shard: path relative to the manifest, size and xxh3-64 (hex)."""

    path: str
    size: int
    xxh3_64: str

    @classmethod
    def of(cls, path: str, data: bytes | bytearray | memoryview) -> FileEntry:
        return cls(path, len(data), xxhash.xxh3_64_hexdigest(data))


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One shard: its sample count, uncompressed size and files.

    ``sums`` is the shard's block checksums file (see :mod:`dataloaders._blocks`), with
    ``block`` bytes per checksum, or None (shards written before it, and formats a reader
    verifies whole).
    """

    name: str
    samples: int
    files: tuple[FileEntry, ...]
    raw_bytes: int = 0
    sums: FileEntry | None = None
    block: int = 0

    @property
    def bytes(self) -> int:
        """Bytes stored, the block checksums included."""
        return sum(f.size for f in self.files) + (self.sums.size if self.sums else 0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "samples": self.samples,
            "raw_bytes": self.raw_bytes,
            "files": [_file_json(f) for f in self.files],
        }
        if self.sums is not None:
            out["block_sums"] = {**_file_json(self.sums), "block": self.block}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardEntry:
        sums = data.get("block_sums")
        if sums is not None and int(sums["block"]) <= 0:
            raise ValueError(f"shard {data['name']}: block size {sums['block']}")
        return cls(
            name=data["name"],
            samples=int(data["samples"]),
            raw_bytes=int(data.get("raw_bytes", 0)),
            files=tuple(_file_of_json(f) for f in data["files"]),
            sums=None if sums is None else _file_of_json(sums),
            block=0 if sums is None else int(sums["block"]),
        )

    def all_files(self) -> tuple[FileEntry, ...]:
        """The data files and the block checksums file."""
        return self.files + ((self.sums,) if self.sums else ())


def _file_json(f: FileEntry) -> dict[str, Any]:
    return {"path": f.path, "size": f.size, "xxh3_64": f.xxh3_64}


def _file_of_json(data: dict[str, Any]) -> FileEntry:
    return FileEntry(data["path"], int(data["size"]), data["xxh3_64"])


@dataclass(frozen=True, slots=True)
class Manifest:
    """A dataset: its format, fields and shards (in write order)."""

    format: str
    fields: tuple[FieldSpec, ...]
    shards: tuple[ShardEntry, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ManifestError(f"unknown shard format {self.format!r}; known: {FORMATS}")

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        """Bytes stored (all shard files)."""
        return sum(s.bytes for s in self.shards)

    @property
    def raw_bytes(self) -> int:
        """Bytes of the samples before compression."""
        return sum(s.raw_bytes for s in self.shards)

    @property
    def ratio(self) -> float:
        """Compression ratio reached (raw / stored), 1.0 for an empty dataset."""
        return self.raw_bytes / self.bytes if self.bytes else 1.0

    @property
    def counts(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        return np.array([s.samples for s in self.shards], dtype=np.int64)

    def field(self, name: str) -> FieldSpec:
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def fingerprint(self) -> str:
        """Identifies the shard list: a resumed run checks it reads the same dataset."""
        text = json.dumps([s.to_json() for s in self.shards], sort_keys=True)
        return xxhash.xxh3_64_hexdigest(text.encode())

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "iosvc-shards",
            "version": 1,
            "format": self.format,
            "fields": [f.to_json() for f in self.fields],
            "samples": self.samples,
            "bytes": self.bytes,
            "raw_bytes": self.raw_bytes,
            "attrs": self.attrs,
            "shards": [s.to_json() for s in self.shards],
        }

    def dumps(self) -> builtins.bytes:
        return json.dumps(self.to_json(), indent=1).encode()

    @classmethod
    def loads(cls, data: builtins.bytes | str, *, where: str = "manifest") -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("kind") != "iosvc-shards":
                raise ManifestError(f"{where} is not a dataloaders manifest")
            if doc.get("version") != 1:
                raise ManifestError(f"{where}: unsupported manifest version {doc.get('version')}")
            manifest = cls(
                format=doc["format"],
                fields=tuple(FieldSpec.from_json(f) for f in doc["fields"]),
                shards=tuple(ShardEntry.from_json(s) for s in doc["shards"]),
                attrs=dict(doc.get("attrs", {})),
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"{where} is not a valid manifest: {exc!r}") from None
        if doc.get("samples", manifest.samples) != manifest.samples:
            raise ManifestError(f"{where}: sample total does not match its shards")
        return manifest

    @staticmethod
    def fields_from(specs: Sequence[dict[str, Any]]) -> tuple[FieldSpec, ...]:
        return tuple(FieldSpec.from_json(s) for s in specs)

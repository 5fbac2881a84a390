"""Shard formats: how one shard's samples become files, and how those files become samples.

Three formats, by name (:data:`FORMATS`):

``raw``
    One file ``<shard>.raw``: each sample's blob fields (bytes, and arrays as their raw bytes)
    stored exactly as given, back to back; then the footer: the end offset of every blob
    (u64 LE, sample-major), a JSON object ``{"n": samples, "values": {field: [...]}}`` with
    the small fields (str/int/float), and a tail of three fields: the byte lengths of the
    offsets and of the JSON (u64 LE each) and the magic ``IOSVCRW1``. For already-compressed
    data (JPEG): nothing is recompressed, and one sample can be read with a byte range once
    the footer is known.
``records``
    One Arrow IPC file ``<shard>.arrow`` (a single record batch), one column per field, each
    value encoded by its field's codec (so a sample decodes alone; codecs in
    :mod:`dataloaders._codecs`). Any pyarrow can open it; codec names are also in the
    column metadata.
``arrays``
    A zarr v3 group ``<shard>.zarr`` with one array per field, shape ``(samples, *shape)``,
    each stored as one zarr shard (``sharding_indexed``) of Blosc-compressed inner chunks of
    ``chunk`` samples. zarr itself reads these arrays; the reader here decodes the inner
    chunks straight from the shard index (no zarr machinery on the hot path).
"""

from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import google_crc32c
import numcodecs
import numcodecs.blosc
import numpy as np
import pyarrow as pa

from dataloaders._blocks import BlockChecker
from dataloaders._codecs import get_codec
from dataloaders._errors import ShardCorrupted
from dataloaders._manifest import FieldSpec

__all__ = ["FORMATS", "DecodedShard", "ShardFormat", "get_format"]

_RAW_MAGIC = b"IOSVCRW1"
_TAIL = struct.Struct("<QQ8s")
_EMPTY = 2**64 - 1  # a zarr shard index entry of a chunk that was not written


class DecodedShard(ABC):
    """One shard's samples, decodable one at a time (random order within the shard is cheap)."""

    #: Samples in the shard.
    n: int
    #: Bytes held in memory (for the cache's budget).
    nbytes: int

    @abstractmethod
    def sample(self, i: int) -> dict[str, Any]:
        """Sample ``i`` of the shard as a dict of field values."""

    def take_into(
        self, indices: Sequence[int], spec: FieldSpec, out: np.ndarray[Any, Any], rows: list[int]
    ) -> None:
        """Write array field ``spec`` of samples ``indices`` into ``out[rows]``. The default
        goes through :meth:`take`; formats override it to decode straight into ``out``."""
        out[rows] = self.take(indices, [spec])[spec.name]

    def blob_spans(
        self, indices: Sequence[int], spec: FieldSpec
    ) -> tuple[Any, np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Where bytes field ``spec`` of samples ``indices`` lies, verified: (buffer, starts,
        stops), for copying straight into a batch; None where a format has no such layout
        (then :meth:`take` makes the values)."""
        return None

    def take(self, indices: Sequence[int], fields: Sequence[FieldSpec]) -> dict[str, Any]:
        """Samples ``indices`` as columns: an array field as one ``(k, *shape)`` array, every
        other field as a list. The default builds each sample; formats override it to decode
        straight into the batch."""
        samples = [self.sample(i) for i in indices]
        out: dict[str, Any] = {}
        for spec in fields:
            values = [s[spec.name] for s in samples]
            out[spec.name] = np.stack(values) if spec.kind == "array" else values
        return out


class ShardFormat(ABC):
    """Encoder/decoder of one shard format."""

    name: ClassVar[str]
    #: Its decoded shards check the blocks they read (``checks`` of :meth:`decode`); a
    #: reader verifies the files of other formats whole before decoding them.
    checks_blocks: ClassVar[bool] = False

    @abstractmethod
    def files(self, shard: str, fields: Sequence[FieldSpec]) -> list[str]:
        """Paths of a shard's files, relative to the manifest directory."""

    def data_files(self, shard: str, fields: Sequence[FieldSpec]) -> list[str]:
        """The files a reader fetches to decode the shard (default: all of them)."""
        return self.files(shard, fields)

    @abstractmethod
    def encode(
        self, shard: str, fields: Sequence[FieldSpec], columns: dict[str, Any], n: int
    ) -> dict[str, bytes]:
        """Files (relative path -> bytes) holding ``n`` samples given as columns."""

    @abstractmethod
    def decode(
        self,
        shard: str,
        fields: Sequence[FieldSpec],
        files: dict[str, Any],
        n: int,
        checks: Mapping[str, BlockChecker] | None = None,
    ) -> DecodedShard:
        """The samples of a shard from the bytes of its files."""

    def check(self, fields: Sequence[FieldSpec]) -> None:
        """Raise ``ValueError`` if this format cannot hold ``fields``."""
        return None


# ---------------------------------------------------------------------------------------- raw
def _blob(spec: FieldSpec, value: Any) -> bytes | memoryview:
    if spec.kind == "array":
        arr = np.ascontiguousarray(value, dtype=spec.np_dtype)
        return arr.data.cast("B")
    return bytes(value) if not isinstance(value, bytes) else value


class _RawShard(DecodedShard):
    def __init__(
        self,
        fields: Sequence[FieldSpec],
        data: Any,
        n: int,
        where: str,
        check: BlockChecker | None = None,
    ) -> None:
        view = memoryview(data).cast("B")
        if len(view) < _TAIL.size:
            raise ShardCorrupted(f"{where}: too short for a raw shard")
        if check is not None:
            check.check(len(view) - _TAIL.size, len(view))
        ends_len, json_len, magic = _TAIL.unpack(view[-_TAIL.size :])
        footer_start = len(view) - _TAIL.size - json_len - ends_len
        if magic != _RAW_MAGIC or footer_start < 0:
            raise ShardCorrupted(f"{where}: not a raw shard (bad footer)")
        if check is not None:
            check.check(footer_start, len(view))
        blobs = [spec for spec in fields if spec.kind in ("bytes", "array")]
        ends = np.frombuffer(view[footer_start : footer_start + ends_len], dtype="<u8")
        try:
            values = json.loads(bytes(view[footer_start + ends_len : len(view) - _TAIL.size]))
        except ValueError:
            raise ShardCorrupted(f"{where}: unreadable footer") from None
        if values.get("n") != n or len(ends) != n * len(blobs):
            raise ShardCorrupted(f"{where}: footer lists {values.get('n')} samples, not {n}")
        self.n = n
        self.nbytes = len(view)
        self._view = view
        self._blobs = [(spec.name, spec) for spec in blobs]
        self._values = [
            (spec.name, values["values"][spec.name]) for spec in fields if spec not in blobs
        ]
        # Blobs are stored sample-major, so a blob starts where the previous one ends. A
        # memoryview indexes without building a Python int per offset up front (a list of
        # them triggers full garbage collections, 0.1 s with torch loaded).
        native = np.ascontiguousarray(ends, dtype="=u8")
        self._ends = native.data.cast("B").cast("Q")
        self._ends_i64 = native.astype(np.int64)  # the same, for vectorised span lookups
        self._nblob = len(blobs)
        self._check = check
        # Where each sample's blobs start and end (for checking a batch's blocks at once).
        last = native[len(blobs) - 1 :: len(blobs)] if blobs else native
        self._sample_ends = last.astype(np.int64)
        self._sample_starts = np.concatenate([[0], self._sample_ends[:-1]]).astype(np.int64)

    def sample(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        base = i * self._nblob
        view = self._view
        if self._check is not None and self._nblob:
            self._check.check(int(self._sample_starts[i]), int(self._sample_ends[i]))
        ends = self._ends
        for k, (name, spec) in enumerate(self._blobs):
            end = ends[base + k]
            start = ends[base + k - 1] if base + k else 0
            if spec.kind == "array":
                out[name] = np.frombuffer(bytearray(view[start:end]), spec.np_dtype).reshape(
                    spec.shape or ()
                )
            else:
                out[name] = bytes(view[start:end])
        for name, column in self._values:
            out[name] = column[i]
        return out

    def blob_spans(
        self, indices: Sequence[int], spec: FieldSpec
    ) -> tuple[Any, np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        k = next((k for k, (name, _) in enumerate(self._blobs) if name == spec.name), None)
        if k is None:
            return None
        rows = np.asarray(indices, dtype=np.int64)
        if self._check is not None:
            self._check.check_spans(self._sample_starts[rows], self._sample_ends[rows])
        ends = self._ends_i64
        at = rows * self._nblob + k
        starts = np.where(at > 0, ends[np.maximum(at - 1, 0)], 0)
        return self._view, starts, ends[at]

    def take(self, indices: Sequence[int], fields: Sequence[FieldSpec]) -> dict[str, Any]:
        if any(spec.kind == "array" for _, spec in self._blobs):
            return super().take(indices, fields)
        # Blobs (e.g. JPEG bytes) straight into per-field lists, without a dict per sample.
        out: dict[str, Any] = {}
        view, ends, nblob = self._view, self._ends, self._nblob
        if self._check is not None and nblob:
            rows = np.asarray(indices, dtype=np.int64)
            self._check.check_spans(self._sample_starts[rows], self._sample_ends[rows])
        for k, (name, _) in enumerate(self._blobs):
            column = []
            for i in indices:
                at = i * nblob + k
                column.append(bytes(view[ends[at - 1] if at else 0 : ends[at]]))
            out[name] = column
        for name, values in self._values:
            out[name] = [values[i] for i in indices]
        return out


class RawFormat(ShardFormat):
    """Blobs back to back, stored as given; a footer of blob end offsets and small fields."""

    name = "raw"
    checks_blocks = True

    def files(self, shard: str, fields: Sequence[FieldSpec]) -> list[str]:
        return [f"{shard}.raw"]

    def encode(
        self, shard: str, fields: Sequence[FieldSpec], columns: dict[str, Any], n: int
    ) -> dict[str, bytes]:
        blob_fields = [f for f in fields if f.kind in ("bytes", "array")]
        parts: list[bytes | memoryview] = []
        ends = np.empty((n, len(blob_fields)), dtype="<u8")
        offset = 0
        for i in range(n):
            for k, spec in enumerate(blob_fields):
                blob = _blob(spec, columns[spec.name][i])
                parts.append(blob)
                offset += len(blob)
                ends[i, k] = offset
        values: dict[str, list[Any]] = {}
        for spec in fields:
            if spec.kind == "int":
                values[spec.name] = [int(v) for v in columns[spec.name]]
            elif spec.kind == "float":
                values[spec.name] = [float(v) for v in columns[spec.name]]
            elif spec.kind == "str":
                values[spec.name] = [str(v) for v in columns[spec.name]]
        ends_bytes = ends.tobytes()
        text = json.dumps({"n": n, "values": values}).encode()
        parts += [ends_bytes, text, _TAIL.pack(len(ends_bytes), len(text), _RAW_MAGIC)]
        return {f"{shard}.raw": b"".join(parts)}

    def decode(
        self,
        shard: str,
        fields: Sequence[FieldSpec],
        files: dict[str, Any],
        n: int,
        checks: Mapping[str, BlockChecker] | None = None,
    ) -> DecodedShard:
        rel = f"{shard}.raw"
        return _RawShard(fields, files[rel], n, rel, (checks or {}).get(rel))


def _scalar_array(spec: FieldSpec, values: Any) -> pa.Array:
    if spec.kind == "int":
        return pa.array(np.asarray(values, dtype=np.int64))
    if spec.kind == "float":
        return pa.array(np.asarray(values, dtype=np.float64))
    return pa.array(list(values), type=pa.large_string())


# ------------------------------------------------------------------------------------ records
class _RecordsShard(DecodedShard):
    def __init__(self, fields: Sequence[FieldSpec], data: Any, n: int, where: str) -> None:
        try:
            table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardCorrupted(f"{where}: not an Arrow IPC file ({exc})") from None
        if table.num_rows != n:
            raise ShardCorrupted(f"{where}: holds {table.num_rows} samples, not {n}")
        table = table.combine_chunks()
        self.n = n
        self.nbytes = len(memoryview(data))
        self._data = data  # the table's buffers point into it
        self._blosc = numcodecs.Blosc()
        self._getters: list[tuple[str, Any]] = []
        for spec in fields:
            column = table.column(spec.name)
            chunk = column.chunk(0) if column.num_chunks else pa.array([], column.type)
            if spec.kind in ("int", "float") or (spec.kind == "str" and spec.codec == "none"):
                self._getters.append((spec.name, chunk.to_pylist()))
                continue
            _, offsets_buf, data_buf = chunk.buffers()
            offsets = np.frombuffer(offsets_buf, dtype=np.int64)[
                chunk.offset : chunk.offset + n + 1
            ]
            index = np.ascontiguousarray(offsets, dtype="=i8").data.cast("B").cast("q")
            self._getters.append(
                (spec.name, (spec, get_codec(spec.codec), memoryview(data_buf), index))
            )

    def sample(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, getter in self._getters:
            if isinstance(getter, list):
                out[name] = getter[i]
                continue
            spec, codec, view, offsets = getter
            raw = view[offsets[i] : offsets[i + 1]]
            if spec.kind == "array":
                if codec.name.startswith("blosc"):
                    arr = np.empty(spec.shape or (), spec.np_dtype)
                    self._blosc.decode(raw, out=arr)
                else:
                    data = bytearray(codec.decode(raw))
                    arr = np.frombuffer(data, spec.np_dtype).reshape(spec.shape or ())
                out[name] = arr
            elif spec.kind == "str":
                out[name] = bytes(codec.decode(raw)).decode()
            else:
                out[name] = bytes(codec.decode(raw))
        return out


class RecordsFormat(ShardFormat):
    """Arrow IPC file, one record batch, a codec per column applied to each value."""

    name = "records"

    def files(self, shard: str, fields: Sequence[FieldSpec]) -> list[str]:
        return [f"{shard}.arrow"]

    def encode(
        self, shard: str, fields: Sequence[FieldSpec], columns: dict[str, Any], n: int
    ) -> dict[str, bytes]:
        arrays, schema_fields = [], []
        for spec in fields:
            values = columns[spec.name]
            meta = {b"dataloaders": json.dumps(spec.to_json()).encode()}
            if spec.kind in ("int", "float") or (spec.kind == "str" and spec.codec == "none"):
                array = _scalar_array(spec, values)
            else:
                codec = get_codec(spec.codec)
                if spec.kind == "array":
                    dtype = spec.np_dtype
                    encoded = [codec.encode(np.ascontiguousarray(v, dtype=dtype)) for v in values]
                elif spec.kind == "str":
                    encoded = [codec.encode(v.encode()) for v in values]
                else:
                    encoded = [codec.encode(v) for v in values]
                array = pa.array(encoded, type=pa.large_binary())
            arrays.append(array)
            schema_fields.append(pa.field(spec.name, array.type, metadata=meta))
        schema = pa.schema(schema_fields)
        batch = pa.record_batch(arrays, schema=schema)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)
        return {f"{shard}.arrow": sink.getvalue().to_pybytes()}

    def decode(
        self,
        shard: str,
        fields: Sequence[FieldSpec],
        files: dict[str, Any],
        n: int,
        checks: Mapping[str, BlockChecker] | None = None,
    ) -> DecodedShard:
        # Arrow reads its buffers itself: the reader verified the file whole (no checks).
        return _RecordsShard(fields, files[f"{shard}.arrow"], n, f"{shard}.arrow")


# ------------------------------------------------------------------------------------- arrays
def _blosc_config(codec: str, itemsize: int) -> dict[str, Any]:
    name, _, level = codec.partition(":")
    parts = name.split("-")  # blosc-lz4[-bitshuffle]
    if parts[0] != "blosc" or len(parts) < 2:
        raise ValueError(f"the arrays format needs a blosc-* codec, not {codec!r}")
    default = 5 if parts[1] == "lz4" else 3
    return {
        "typesize": itemsize,
        "cname": parts[1],
        "clevel": int(level) if level else default,
        "shuffle": "bitshuffle" if name.endswith("bitshuffle") else "shuffle",
        "blocksize": 0,
    }


def _array_meta(spec: FieldSpec, n: int) -> dict[str, Any]:
    """zarr v3 metadata of one field of one shard: the whole array is one zarr shard."""
    shape = spec.shape or ()
    chunk = spec.chunk or 1
    inner = [chunk, *shape]
    outer = [max(1, -(-n // chunk)) * chunk, *shape]
    dtype = spec.np_dtype
    fill: Any = 0.0 if dtype.kind in "fc" else (False if dtype.kind == "b" else 0)
    return {
        "shape": [n, *shape],
        "data_type": dtype.name if dtype.name != "bool" else "bool",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": outer}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": inner,
                    "codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {
                            "name": "blosc",
                            "configuration": _blosc_config(spec.codec, dtype.itemsize),
                        },
                    ],
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }
        ],
        "attributes": {"dataloaders": spec.to_json()},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _chunk_key(spec: FieldSpec) -> str:
    return "c/" + "/".join("0" for _ in range(1 + len(spec.shape or ())))


class _ArraysShard(DecodedShard):
    def __init__(
        self,
        fields: Sequence[FieldSpec],
        files: dict[str, Any],
        n: int,
        shard: str,
        checks: Mapping[str, BlockChecker],
    ):
        self.n = n
        self.nbytes = 0
        self._fields: list[tuple[str, FieldSpec, memoryview, np.ndarray[Any, Any]]] = []
        self._checks: dict[str, BlockChecker] = {}
        self._cache: dict[str, tuple[int, np.ndarray[Any, Any]]] = {}
        self._blosc = numcodecs.Blosc()
        for spec in fields:
            path = f"{shard}.zarr/{spec.name}/{_chunk_key(spec)}"
            view = memoryview(files[path]).cast("B")
            self.nbytes += len(view)
            chunk = spec.chunk or 1
            n_inner = max(1, -(-n // chunk))
            index_len = 16 * n_inner + 4
            if len(view) < index_len:
                raise ShardCorrupted(f"{path}: too short for its zarr shard index")
            check = checks.get(path)
            if check is not None:
                check.check(len(view) - index_len, len(view))
                self._checks[spec.name] = check
            index_bytes = view[len(view) - index_len : len(view) - 4]
            crc = google_crc32c.value(bytes(index_bytes))
            if struct.pack("<I", crc) != bytes(view[len(view) - 4 :]):
                raise ShardCorrupted(f"{path}: zarr shard index fails its crc32c")
            index = np.frombuffer(index_bytes, dtype="<u8").reshape(n_inner, 2)
            self._fields.append((spec.name, spec, view, index))

    def _chunk(self, name: str, spec: FieldSpec, view: memoryview, index: Any, j: int) -> Any:
        cached = self._cache.get(name)
        if cached is not None and cached[0] == j:
            return cached[1]
        chunk = spec.chunk or 1
        out = np.zeros((chunk, *(spec.shape or ())), dtype=spec.np_dtype)
        offset, length = int(index[j, 0]), int(index[j, 1])
        if offset != _EMPTY:
            check = self._checks.get(name)
            if check is not None:
                check.check(offset, offset + length)
            self._blosc.decode(view[offset : offset + length], out=out)
        self._cache[name] = (j, out)
        return out

    def take_into(
        self, indices: Sequence[int], spec: FieldSpec, out: np.ndarray[Any, Any], rows: list[int]
    ) -> None:
        for name, _, view, index in self._fields:
            if name == spec.name and spec.kind == "array" and (spec.chunk or 1) == 1:
                self._decode_rows(name, view, index, indices, out.reshape(len(out), -1), rows)
                return
        super().take_into(indices, spec, out, rows)

    def _decode_rows(
        self,
        name: str,
        view: memoryview,
        index: np.ndarray[Any, Any],
        indices: Sequence[int],
        flat: np.ndarray[Any, Any],
        rows: Sequence[int],
    ) -> None:
        """One sample per zarr chunk: decode sample ``indices[k]`` into ``flat[rows[k]]``."""
        rows_index = index[np.asarray(indices, dtype=np.int64)]
        check = self._checks.get(name)
        if check is not None:
            written = rows_index[rows_index[:, 0] != _EMPTY].astype(np.int64)
            check.check_spans(written[:, 0], written[:, 0] + written[:, 1])
        decompress = numcodecs.blosc.decompress  # Blosc.decode's checks cost ~3 us
        for r, (offset, length) in zip(rows, rows_index.tolist(), strict=True):
            if offset == _EMPTY:
                flat[r] = 0
            else:
                decompress(view[offset : offset + length], flat[r])

    def take(self, indices: Sequence[int], fields: Sequence[FieldSpec]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        wanted = {spec.name for spec in fields}
        for name, spec, view, index in self._fields:
            if name not in wanted:
                continue
            chunk = spec.chunk or 1
            if spec.kind == "array" and chunk == 1:
                rows = np.empty((len(indices), *(spec.shape or ())), dtype=spec.np_dtype)
                flat = rows.reshape(len(indices), -1)
                self._decode_rows(name, view, index, indices, flat, range(len(indices)))
                out[name] = rows
                continue
            values = [self._chunk(name, spec, view, index, i // chunk)[i % chunk] for i in indices]
            if spec.kind == "array":
                out[name] = np.stack(values)
            else:
                out[name] = [v.item() for v in values]
        return out

    def sample(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, spec, view, index in self._fields:
            chunk = spec.chunk or 1
            block = self._chunk(name, spec, view, index, i // chunk)
            value = block[i % chunk]
            if spec.kind == "array":
                out[name] = value if chunk == 1 else value.copy()
            else:
                out[name] = value.item()
        return out


class ArraysFormat(ShardFormat):
    """zarr v3: per field one array (samples, *shape), one zarr shard of Blosc inner chunks."""

    name = "arrays"
    checks_blocks = True

    def check(self, fields: Sequence[FieldSpec]) -> None:
        for spec in fields:
            if spec.kind in ("bytes", "str"):
                raise ValueError(
                    f"field {spec.name!r} is {spec.kind}: the arrays format holds numbers and "
                    "numpy arrays only; use format='records' (or 'raw')"
                )

    def files(self, shard: str, fields: Sequence[FieldSpec]) -> list[str]:
        out = [f"{shard}.zarr/zarr.json"]
        for spec in fields:
            out += [
                f"{shard}.zarr/{spec.name}/zarr.json",
                f"{shard}.zarr/{spec.name}/{_chunk_key(spec)}",
            ]
        return out

    def data_files(self, shard: str, fields: Sequence[FieldSpec]) -> list[str]:
        """Only the chunk data: the metadata a reader needs is in the manifest."""
        return [f"{shard}.zarr/{spec.name}/{_chunk_key(spec)}" for spec in fields]

    def encode(
        self, shard: str, fields: Sequence[FieldSpec], columns: dict[str, Any], n: int
    ) -> dict[str, bytes]:
        self.check(fields)
        group = {"zarr_format": 3, "node_type": "group", "attributes": {}}
        out = {f"{shard}.zarr/zarr.json": json.dumps(group).encode()}
        for spec in fields:
            dtype = spec.np_dtype
            shape = spec.shape or ()
            values = columns[spec.name]
            if isinstance(values, np.ndarray) and values.dtype == dtype:
                data = np.ascontiguousarray(values).reshape(n, *shape)
            else:
                data = np.asarray(values, dtype=dtype).reshape(n, *shape)
            chunk = spec.chunk or 1
            n_inner = max(1, -(-n // chunk))
            cfg = _blosc_config(spec.codec, dtype.itemsize)
            blosc = numcodecs.Blosc(
                cname=cfg["cname"],
                clevel=cfg["clevel"],
                shuffle=numcodecs.Blosc.BITSHUFFLE
                if cfg["shuffle"] == "bitshuffle"
                else numcodecs.Blosc.SHUFFLE,
            )
            parts: list[bytes] = []
            index = np.empty((n_inner, 2), dtype="<u8")
            offset = 0
            for j in range(n_inner):
                block = data[j * chunk : (j + 1) * chunk]
                if len(block) < chunk:  # zarr stores edge chunks at full shape
                    full = np.zeros((chunk, *shape), dtype=dtype)
                    full[: len(block)] = block
                    block = full
                encoded = bytes(blosc.encode(np.ascontiguousarray(block)))
                parts.append(encoded)
                index[j] = (offset, len(encoded))
                offset += len(encoded)
            index_bytes = index.tobytes()
            parts += [index_bytes, struct.pack("<I", google_crc32c.value(index_bytes))]
            out[f"{shard}.zarr/{spec.name}/zarr.json"] = json.dumps(_array_meta(spec, n)).encode()
            out[f"{shard}.zarr/{spec.name}/{_chunk_key(spec)}"] = b"".join(parts)
        return out

    def decode(
        self,
        shard: str,
        fields: Sequence[FieldSpec],
        files: dict[str, Any],
        n: int,
        checks: Mapping[str, BlockChecker] | None = None,
    ) -> DecodedShard:
        return _ArraysShard(fields, files, n, shard, checks or {})


#: Shard formats by name.
FORMATS: dict[str, ShardFormat] = {
    f.name: f for f in (RawFormat(), RecordsFormat(), ArraysFormat())
}


def get_format(name: str) -> ShardFormat:
    """The shard format ``name``; unknown names are answered with the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown shard format {name!r}; known: {', '.join(FORMATS)}") from None

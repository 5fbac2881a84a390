"""The shard writer: samples (dicts, columns of arrays, or a directory of files) -> shards."""

from __future__ import annotations

import posixpath
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from dataloaders._blocks import BLOCK, block_sums, sums_path
from dataloaders._codecs import choose_array_codec, choose_bytes_codec, get_codec
from dataloaders._errors import ManifestError
from dataloaders._formats import get_format
from dataloaders._fs import join, open_fs
from dataloaders._manifest import MANIFEST_NAME, FieldSpec, FileEntry, Manifest, ShardEntry

__all__ = ["WriteSummary", "infer_fields", "pack_directory", "write_shards"]

#: Default shard size (bytes before compression): large enough to stream at full rate from
#: every server (2 MiB stripes), small enough that a worker's window of shards fits in RAM.
DEFAULT_SHARD_BYTES = 64 << 20
#: Target uncompressed size of one compressed block in the arrays format: Blosc's shuffle
#: needs a few KiB to find its ratio, and a smaller block keeps random access cheap.
ARRAY_BLOCK_BYTES = 16 << 10


@dataclass(frozen=True)
class WriteSummary:
    """What :func:`write_shards` wrote."""

    url: str
    format: str
    samples: int
    shards: int
    bytes: int
    raw_bytes: int
    seconds: float
    fields: tuple[FieldSpec, ...] = field(repr=False)
    manifest: Manifest = field(repr=False)

    @property
    def ratio(self) -> float:
        """Compression ratio reached: bytes of the samples / bytes stored."""
        return self.raw_bytes / self.bytes if self.bytes else 1.0

    def __str__(self) -> str:
        return (
            f"{self.samples:,} samples in {self.shards} {self.format} shards at {self.url}: "
            f"{self.raw_bytes / 2**20:,.1f} MiB -> {self.bytes / 2**20:,.1f} MiB "
            f"(ratio {self.ratio:.2f}) in {self.seconds:.1f} s"
        )


def _kind(name: str, value: Any) -> FieldSpec:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return FieldSpec(name, "bytes")
    if isinstance(value, str):
        return FieldSpec(name, "str")
    if isinstance(value, (bool, int, np.integer, np.bool_)):
        return FieldSpec(name, "int")
    if isinstance(value, (float, np.floating)):
        return FieldSpec(name, "float")
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise TypeError(f"field {name!r}: numpy dtype {value.dtype} is not numeric")
        dtype = value.dtype.newbyteorder("<") if value.dtype.itemsize > 1 else value.dtype
        return FieldSpec(name, "array", dtype=dtype.str, shape=tuple(value.shape))
    raise TypeError(
        f"field {name!r}: {type(value).__name__} values are not supported "
        "(bytes, str, int, float or numpy arrays)"
    )


def _raw_size(spec: FieldSpec, value: Any) -> int:
    if spec.kind == "bytes":
        return len(value)
    if spec.kind == "str":
        return len(value.encode())
    if spec.kind == "array":
        return int(np.asarray(value).nbytes)
    return 8


def infer_fields(
    first: list[dict[str, Any]], fmt: str, codecs: Mapping[str, str] | None
) -> tuple[str, tuple[FieldSpec, ...]]:
    """Field specs and the format from the first shard's samples.

    ``fmt="auto"`` picks ``arrays`` when every field is a number or a numpy array, ``raw`` when
    the blob fields do not compress (e.g. JPEG), else ``records``.
    """
    codecs = dict(codecs or {})
    specs = [_kind(k, v) for k, v in first[0].items()]
    unknown = set(codecs) - {s.name for s in specs}
    if unknown:
        raise ValueError(f"codecs given for unknown fields: {sorted(unknown)}")
    auto = fmt == "auto"
    if auto and all(s.kind in ("int", "float", "array") for s in specs):
        fmt = "arrays"
    out: list[FieldSpec] = []
    for spec in specs:
        codec = codecs.get(spec.name)
        chunk = None
        if spec.kind == "array":
            assert spec.dtype is not None
            codec = codec or ("none" if fmt == "raw" else choose_array_codec(np.dtype(spec.dtype)))
            size = max(1, int(np.prod(spec.shape or ())) * np.dtype(spec.dtype).itemsize)
            chunk = max(1, ARRAY_BLOCK_BYTES // size) if fmt == "arrays" else None
        elif spec.kind in ("int", "float") and fmt == "arrays":
            codec = codec or choose_array_codec(spec.np_dtype)
            chunk = 4096
        elif spec.kind in ("bytes", "str") and codec is None and fmt != "raw":
            values = [s[spec.name] for s in first]
            if spec.kind == "str":
                values = [v.encode() for v in values]
            codec = choose_bytes_codec(values)
        codec = codec or "none"
        get_codec(codec)  # validate the name now, not after a shard is built
        out.append(FieldSpec(spec.name, spec.kind, codec, spec.dtype, spec.shape, chunk))
    if auto and fmt != "arrays":
        # Nothing to compress (e.g. JPEG): raw blobs are cheaper to read and allow ranged
        # sample reads; otherwise Arrow records with a codec per column.
        plain = all(s.codec == "none" for s in out if s.kind in ("bytes", "str", "array"))
        fmt = "raw" if plain else "records"
    if fmt == "raw":
        compressed = [s.name for s in out if s.codec != "none" and s.name in codecs]
        if compressed:
            raise ValueError(f"the raw format stores blobs as given: no codec for {compressed}")
        out = [FieldSpec(s.name, s.kind, "none", s.dtype, s.shape, None) for s in out]
    get_format(fmt).check(out)
    return fmt, tuple(out)


def _check_sample(sample: Mapping[str, Any], fields: tuple[FieldSpec, ...], n: int) -> None:
    if len(sample) != len(fields) or any(f.name not in sample for f in fields):
        raise ValueError(
            f"sample {n} has fields {sorted(sample)}, the first sample had "
            f"{sorted(f.name for f in fields)}"
        )
    for spec in fields:
        if spec.kind == "array":
            value = sample[spec.name]
            if not isinstance(value, np.ndarray) or tuple(value.shape) != spec.shape:
                shape = getattr(value, "shape", None)
                raise ValueError(
                    f"sample {n}, field {spec.name!r}: shape {shape} differs from the first "
                    f"sample's {spec.shape} (array fields have a fixed shape)"
                )


def _rows(columns: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    for i in range(n):
        yield {k: v[i] for k, v in columns.items()}


def write_shards(
    samples: Iterable[Mapping[str, Any]] | Mapping[str, Any],
    url: str,
    *,
    format: str = "auto",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    codecs: Mapping[str, str] | None = None,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> WriteSummary:
    """Write samples as shards plus a ``manifest.json`` under ``url`` (any fsspec URL).

    Parameters
    ----------
    samples
        An iterable of dicts whose values are bytes, str, int, float or numpy arrays (every
        sample has the same fields; arrays keep one dtype and shape), or a mapping of field
        name to a sequence/array of equal length (columns).
    url
        Directory to write to: a local path, ``file://``, ``memory://``, ``iosvc://``...
    format
        ``"raw"`` (blobs stored as given), ``"records"`` (Arrow IPC, a codec per column),
        ``"arrays"`` (zarr v3 + Blosc) or ``"auto"`` (arrays for numeric data, raw for
        incompressible blobs such as JPEG, else records).
    shard_bytes
        Target uncompressed bytes per shard (a shard holds at least one sample).
    codecs
        Codec per field name (``"zstd:5"``, ``"blosc-lz4"``, ``"none"``...); the others are
        chosen by kind, dtype and a compressibility probe.
    overwrite
        Replace a dataset already at ``url`` (else ``FileExistsError``).
    attrs
        JSON-able metadata kept in the manifest (e.g. class names).

    Returns
    -------
    WriteSummary
        Counts, bytes before and after compression, and the manifest.
    """
    t0 = time.perf_counter()
    fs, root = open_fs(url, storage_options)
    manifest_path = join(root, MANIFEST_NAME)
    old: Manifest | None = None
    if fs.exists(manifest_path):
        if not overwrite:
            raise FileExistsError(f"{url} already holds a dataset (pass overwrite=True)")
        try:
            old = Manifest.loads(fs.cat_file(manifest_path), where=manifest_path)
        except ManifestError:
            old = None
    fs.makedirs(root, exist_ok=True)
    rows: Iterable[Mapping[str, Any]] = _rows(samples) if isinstance(samples, Mapping) else samples

    fields: tuple[FieldSpec, ...] | None = None
    fmt_name = format
    entries: list[ShardEntry] = []
    written: set[str] = set()
    made_dirs: set[str] = {root}
    # One writer thread: shard k+1 is encoded while shard k is being sent.
    pending: queue.Queue[tuple[dict[str, bytes], int] | None] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def sender() -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            if failure:
                continue
            files, _ = item
            try:
                paths = {join(root, rel): data for rel, data in files.items()}
                for path in paths:
                    parent = posixpath.dirname(path)
                    if parent not in made_dirs and isinstance(fs, LocalFileSystem):
                        fs.makedirs(parent, exist_ok=True)
                        made_dirs.add(parent)
                fs.pipe(paths)
            except BaseException as exc:  # reported by the caller's thread
                failure.append(exc)

    thread = threading.Thread(target=sender, name="dataloaders-writer", daemon=True)
    thread.start()

    def flush(buffer: list[Mapping[str, Any]], raw: int) -> None:
        assert fields is not None
        name = f"shard-{len(entries):05d}"
        columns = {f.name: [s[f.name] for s in buffer] for f in fields}
        shard_format = get_format(fmt_name)
        files = shard_format.encode(name, fields, columns, len(buffer))
        entry = ShardEntry(
            name=name,
            samples=len(buffer),
            raw_bytes=raw,
            files=tuple(FileEntry.of(rel, data) for rel, data in files.items()),
        )
        if shard_format.checks_blocks:
            sums = b"".join(block_sums(files[rel]) for rel in shard_format.data_files(name, fields))
            files[sums_path(name)] = sums
            entry = replace(entry, sums=FileEntry.of(sums_path(name), sums), block=BLOCK)
        entries.append(entry)
        written.update(files)
        pending.put((files, raw))

    try:
        buffer: list[Mapping[str, Any]] = []
        raw = 0
        count = 0
        probe: list[Mapping[str, Any]] = []
        for sample in rows:
            if fields is None:
                # Decide the schema and codecs on the first shard's worth (or 256 samples).
                probe.append(sample)
                raw += sum(_raw_size(_kind(k, v), v) for k, v in sample.items())
                if raw < shard_bytes and len(probe) < 256:
                    continue
                fmt_name, fields = infer_fields([dict(s) for s in probe], format, codecs)
                for pos, s in enumerate(probe):
                    _check_sample(s, fields, pos)
                buffer, count = list(probe), len(probe)
                if raw >= shard_bytes:
                    flush(buffer, raw)
                    buffer, raw = [], 0
                continue
            _check_sample(sample, fields, count)
            buffer.append(sample)
            count += 1
            raw += sum(_raw_size(f, sample[f.name]) for f in fields)
            if raw >= shard_bytes:
                flush(buffer, raw)
                buffer, raw = [], 0
        if fields is None and probe:
            fmt_name, fields = infer_fields([dict(s) for s in probe], format, codecs)
            for pos, s in enumerate(probe):
                _check_sample(s, fields, pos)
            buffer = list(probe)
        if buffer:
            flush(buffer, raw)
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]
    if fields is None:  # no samples: an empty dataset with an empty schema
        fmt_name = "raw" if format == "auto" else format
        fields = ()
    manifest = Manifest(fmt_name, fields, tuple(entries), attrs=dict(attrs or {}))
    # The manifest goes last: a reader never sees shards that are not all there.
    fs.pipe_file(manifest_path, manifest.dumps())
    if old is not None:
        stale = [
            join(root, f.path)
            for shard in old.shards
            for f in shard.all_files()
            if f.path not in written
        ]
        if stale:
            fs.rm(stale)
    return WriteSummary(
        url=url,
        format=fmt_name,
        samples=manifest.samples,
        shards=len(entries),
        bytes=manifest.bytes,
        raw_bytes=manifest.raw_bytes,
        seconds=time.perf_counter() - t0,
        fields=fields,
        manifest=manifest,
    )


def _directory_samples(
    fs: Any, root: str, paths: list[str], labels: dict[str, int] | None, batch: int
) -> Iterator[dict[str, Any]]:
    """Samples of the files ``paths`` (under ``root``), read in batched calls."""
    for i in range(0, len(paths), batch):
        group = paths[i : i + batch]
        datas = fs.cat(group)
        for path in group:
            rel = path[len(root) :].lstrip("/") if root != "/" else path.lstrip("/")
            sample: dict[str, Any] = {"data": datas[path], "path": rel}
            if labels is not None:
                sample["label"] = labels[rel.split("/", 1)[0]]
            yield sample


def pack_directory(
    src: str,
    url: str,
    *,
    format: str = "raw",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    codecs: Mapping[str, str] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> WriteSummary:
    """Pack every file below ``src`` into shards at ``url``.

    Samples are ``{"data": bytes, "path": relative path}``, plus ``"label"`` (the index of
    the top-level directory in sorted order) when ``src`` is an ImageFolder tree (every file
    sits in a sub-directory); the class names are kept in the manifest's ``attrs``. Files
    are read in batched calls (one ``cat`` of 256 paths), so ``src`` may be on iosvc too.
    """
    src_fs, src_root = open_fs(src, storage_options)
    if not src_fs.isdir(src_root):
        raise NotADirectoryError(f"{src} is not a directory")
    paths = sorted(src_fs.find(src_root))
    rels = [p[len(src_root) :].lstrip("/") for p in paths]
    attrs: dict[str, Any] = {"source": src}
    labels: dict[str, int] | None = None
    if rels and all("/" in r for r in rels):
        classes = sorted({r.split("/", 1)[0] for r in rels})
        labels = {c: n for n, c in enumerate(classes)}
        attrs["classes"] = classes
    return write_shards(
        _directory_samples(src_fs, src_root, paths, labels, 256),
        url,
        format=format,
        shard_bytes=shard_bytes,
        codecs=codecs,
        overwrite=overwrite,
        attrs=attrs,
        storage_options=storage_options,
    )

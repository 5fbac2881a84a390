"""``IosvcFileSystem``: iosvc as an fsspec ``AsyncFileSystem`` (protocol ``iosvc``).

Implements only the ``_``-prefixed coroutines; fsspec derives the sync API. Registered through
the ``fsspec.specs`` entry point, so ``fsspec.filesystem("iosvc")``, ``fsspec.open("iosvc://…")``,
zarr's ``FsspecStore``, pyarrow and pandas work with no import. Instances pickle as their
constructor arguments (fsspec's ``_Cached`` metaclass), so a filesystem made in a DataLoader's
parent works in its workers.

Semantics that differ from a local disk (the namespace is flat keys, like an object store):

- directories are implied by the files below them; ``mkdir`` leaves a marker so an empty
  directory can exist, and ``rm(..., recursive=True)`` removes markers with the files;
- a file written through :meth:`IosvcFileSystem.open` becomes visible at ``close`` (or at the
  end of ``fs.transaction``), never half-written; an exception inside the ``with`` leaves nothing;
- files cannot be opened for append (``"ab"``): write a new version instead.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from fsspec.asyn import AsyncFileSystem, _run_coros_in_chunks, sync
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.spec import AbstractBufferedFile

from iosvc.client._async import AsyncClient, AsyncWriter, FileInfo
from iosvc.errors import AlreadyExists, IosvcError, IsADirectory, NotFound
from iosvc.identity import JobIdentity
from iosvc.placement import normalize_path

__all__ = ["IosvcFile", "IosvcFileSystem"]


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _as_list(value: Any, n: int) -> list[Any]:
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return list(value)
    return [value] * n


class IosvcFileSystem(AsyncFileSystem):  # type: ignore[misc]
    """fsspec filesystem over an iosvc cluster.

    Parameters
    ----------
    cluster
        Path of a cluster file (default: ``$IOSVC_CLUSTER`` or the one ``iosvc up`` wrote).
    job_id, user, group, nodes
        Override the identity read from the environment (open mode only).
    chunk_size
        Chunk size of new files (also the write block size).
    """

    protocol = "iosvc"
    root_marker = ""
    async_impl = True

    def __init__(
        self,
        cluster: str | None = None,
        *,
        job_id: str | None = None,
        user: str | None = None,
        group: str | None = None,
        nodes: int | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        identity = JobIdentity.from_env()
        if job_id or user or group or nodes:
            identity = JobIdentity(
                job_id or identity.job_id,
                user or identity.user,
                group or identity.group,
                nodes or identity.nodes,
            )
        self.client = AsyncClient(cluster, identity=identity, chunk_size=chunk_size)

    @classmethod
    def _strip_protocol(cls, path: str | list[str]) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("iosvc://"):
            path = path[len("iosvc://") :]
        return path.strip("/")

    # ------------------------------------------------------------- metadata
    async def _info(self, path: str, **kwargs: Any) -> FileInfo:
        return await self.client.info(self._strip_protocol(path))

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        entries = await self.client.ls(self._strip_protocol(path))
        return entries if detail else [e["name"] for e in entries]

    async def _exists(self, path: str, **kwargs: Any) -> bool:
        try:
            await self._info(path)
        except (FileNotFoundError, ValueError):
            return False
        return True

    async def _modified(self, path: str) -> datetime:
        info = await self._info(path)
        if info["type"] != "file":
            raise IsADirectory(f"{info['name']} is a directory and has no modification time")
        return datetime.fromtimestamp(info["mtime"], tz=UTC)

    def modified(self, path: str) -> datetime:
        """Time the current version of a file was committed (UTC)."""
        result: datetime = sync(self.loop, self._modified, path)
        return result

    async def _find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        if maxdepth is not None:
            return await super()._find(path, maxdepth, withdirs, detail=detail, **kwargs)
        path = self._strip_protocol(path)
        out: dict[str, FileInfo] = {}
        try:
            info = await self._info(path)
        except FileNotFoundError:
            return {} if detail else []
        if info["type"] == "file":
            out[path] = info
        else:
            # One recursive listing (one call per server) instead of a walk.
            if withdirs and path:
                out[path] = info
            for entry in await self.client.ls(path, recursive=True):
                out[entry["name"]] = entry
                if withdirs:
                    parts = entry["name"].split("/")
                    base = len(path.split("/")) if path else 0
                    for n in range(base + 1, len(parts)):
                        parent = "/".join(parts[:n])
                        out.setdefault(parent, {"name": parent, "size": 0, "type": "directory"})
            if not withdirs:
                out = {k: v for k, v in out.items() if v["type"] == "file"}
        names = sorted(out)
        return {n: out[n] for n in names} if detail else names

    async def _mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if not create_parents:
            parent = self._parent(path)
            if parent and not await self._exists(parent):
                raise NotFound(f"parent of {path} does not exist")
        if path:  # the root always exists
            # The server answers AlreadyExists if ``path`` is a file; a directory is a no-op.
            await self.client.mkdir(path)

    async def _makedirs(self, path: str, exist_ok: bool = False) -> None:
        path = self._strip_protocol(path)
        if not exist_ok and await self._exists(path):
            raise AlreadyExists(f"{path} already exists")
        # Always leave a marker, even on a directory implied by its files: like a local
        # directory, it then outlives the files (and concurrent copies cannot race it away).
        if path:  # the root always exists
            await self.client.mkdir(path)

    async def _rm_file(self, path: str, **kwargs: Any) -> None:
        await self.client.rm(self._strip_protocol(path))

    async def _rm(
        self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None, **kw: Any
    ) -> None:
        paths = path if isinstance(path, list) else [path]
        if recursive and maxdepth is None:
            # Expand globs only: the client lists each directory itself (one call per server)
            # and also removes its marker.
            top = await self._expand_path(paths, recursive=False)
            await self.client.rm(top, recursive=True)
            return
        expanded = await self._expand_path(paths, recursive=recursive, maxdepth=maxdepth)
        try:
            # Exactly the expanded entries: with ``maxdepth`` nothing deeper may go.
            await self.client.rm(expanded)
        except FileNotFoundError:
            # Directories implied by their files have no record to remove. Every entry that
            # exists has been removed by now, so what still exists is such a directory.
            if recursive:
                return  # the entries came from a listing: only implied directories failed
            for name in expanded:
                if await self._isdir(name):
                    raise IsADirectory(
                        f"{name} is a directory with files below it: use recursive=True"
                    ) from None
            raise

    # ----------------------------------------------------------------- data
    async def _cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        return await self.client.read(self._strip_protocol(path), start or 0, end)

    async def _cat(
        self,
        path: str | list[str],
        recursive: bool = False,
        on_error: str = "raise",
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> Any:
        if kwargs:  # per-file ranges (start=, end=): no batched form
            return await super()._cat(
                path, recursive=recursive, on_error=on_error, batch_size=batch_size, **kwargs
            )
        plain = [path] if isinstance(path, str) else list(path)
        expanded = recursive or any(_has_magic(p) for p in plain)
        if expanded:
            found = await self._expand_path(path, recursive=recursive)
            # A directory has no bytes: glob and recursive cat read the files they matched.
            # In a recursive expansion every non-empty directory is a prefix of another entry.
            parents = {name.rsplit("/", 1)[0] for name in found if "/" in name}
            paths = [name for name in found if name not in parents]
        else:
            paths = list(dict.fromkeys(self._strip_protocol(plain)))
        # One batched call per home server instead of one call per file.
        results: list[Any] = list(await self.client.read_many(paths))
        # Tell a directory, or a version replaced mid-read, from a missing file.
        retry = [n for n, r in enumerate(results) if isinstance(r, FileNotFoundError)]
        again = await asyncio.gather(
            *(self.client.read(paths[n]) for n in retry), return_exceptions=True
        )
        for n, result in zip(retry, again, strict=True):
            if not isinstance(result, (bytes, IosvcError)):
                raise result  # not a per-file error (e.g. cancelled)
            results[n] = result
        if expanded:
            keep = [n for n, r in enumerate(results) if not isinstance(r, IsADirectoryError)]
            paths, results = [paths[n] for n in keep], [results[n] for n in keep]
        if on_error == "raise":
            for result in results:
                if isinstance(result, Exception):
                    raise result
        single = isinstance(path, str) and paths == [self._strip_protocol(path)]
        if not single:  # as fsspec: a dict unless one path named exactly one file
            return {
                p: r
                for p, r in zip(paths, results, strict=True)
                if not (on_error == "omit" and isinstance(r, Exception))
            }
        return results[0]

    async def _cat_ranges(
        self,
        paths: list[str],
        starts: int | list[int | None] | None,
        ends: int | list[int | None] | None,
        max_gap: int | None = None,
        batch_size: int | None = None,
        on_error: str = "return",
        **kwargs: Any,
    ) -> list[Any]:
        if max_gap is not None:
            raise NotImplementedError("max_gap")  # as fsspec's own implementation
        if not isinstance(paths, list):
            raise TypeError("paths must be a list")
        names: list[str] = self._strip_protocol(paths)
        first, last = _as_list(starts, len(names)), _as_list(ends, len(names))
        if len(first) != len(names) or len(last) != len(names):
            raise ValueError("paths, starts and ends must have the same length")
        # One stat per distinct file, and every range of a file from that same version.
        unique = list(dict.fromkeys(names))
        stats = await asyncio.gather(*(self.client.info(p) for p in unique), return_exceptions=True)
        versions = dict(zip(unique, stats, strict=True))

        async def one(name: str, start: int | None, end: int | None) -> bytes:
            info = versions[name]
            if isinstance(info, BaseException):
                raise info
            if info["type"] != "file":
                raise IsADirectory(f"{name} is a directory")
            try:
                return await self.client.read_version(info, start or 0, end)
            except NotFound:
                return await self.client.read(name, start or 0, end)  # replaced meanwhile

        out: list[Any] = await _run_coros_in_chunks(
            [one(*args) for args in zip(names, first, last, strict=True)],
            batch_size=batch_size or self.batch_size,
            nofiles=True,
            return_exceptions=True,
        )
        if on_error != "return":
            for result in out:
                if isinstance(result, BaseException):
                    raise result
        return out

    async def _pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> None:
        path = self._strip_protocol(path)
        if mode == "create" and await self._exists(path):
            raise AlreadyExists(f"{path} already exists")
        await self.client.write(path, value)

    async def _pipe(self, path: Any, value: Any = None, batch_size: Any = None, **kw: Any) -> None:
        files = {path: value} if isinstance(path, str) else path
        if kw.get("mode") == "create":
            for name, data in files.items():
                await self._pipe_file(name, data, mode="create")
            return
        # Validate every path before any write starts: ``AsyncClient.write_many`` makes the
        # coroutines of large files as it goes, and a bad path after one would strand it.
        await self.client.write_many({normalize_path(k): v for k, v in files.items()})

    async def _put_file(
        self,
        lpath: str,
        rpath: str,
        callback: Callback = DEFAULT_CALLBACK,
        mode: str = "overwrite",
        **kwargs: Any,
    ) -> None:
        rpath = self._strip_protocol(rpath)
        if os.path.isdir(lpath):
            await self._makedirs(rpath, exist_ok=True)
            return
        if mode == "create" and await self._exists(rpath):
            raise AlreadyExists(f"{rpath} already exists")
        callback.set_size(os.path.getsize(lpath))
        await self.client.put_file(lpath, rpath, progress=callback.relative_update)

    async def _get_file(
        self, rpath: str, lpath: Any, callback: Callback = DEFAULT_CALLBACK, **kwargs: Any
    ) -> None:
        rpath = self._strip_protocol(rpath)
        info = await self._info(rpath)
        if info["type"] == "directory":
            if not hasattr(lpath, "write"):
                os.makedirs(lpath, exist_ok=True)
            return
        callback.set_size(info["size"])
        if hasattr(lpath, "write"):  # a file object, as fsspec allows
            async for block in self.client.iter_chunks(rpath):
                await asyncio.to_thread(lpath.write, block)
                callback.relative_update(len(block))
            return
        await self.client.get_file(rpath, lpath, progress=callback.relative_update)

    async def _cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        info = await self._info(path1)
        if info["type"] == "directory":
            await self._makedirs(path2, exist_ok=True)
            return
        writer = self.client.open_writer(path2, chunk_size=info["chunk_size"])
        async with writer:
            async for block in self.client.iter_chunks(path1):
                await writer.write(block)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> IosvcFile:
        return IosvcFile(
            self,
            self._strip_protocol(path),
            mode,
            block_size=block_size or self.client.chunk_size,
            autocommit=autocommit,
            cache_options=cache_options,
            **kwargs,
        )

    def ukey(self, path: str) -> str:
        version: str = self.info(path).get("version") or ""
        return version

    def checksum(self, path: str) -> int:
        """Changes whenever the file is rewritten (its version id)."""
        return int(self.ukey(path)[:16] or "0", 16)


class IosvcFile(AbstractBufferedFile):  # type: ignore[misc]
    """A buffered file on iosvc.

    Reading sticks to the version that was current at open. A file that fits in one block
    is read whole at open, so a writer replacing it later cannot affect the reader; for a
    larger one, a part not yet read when the file is replaced raises ``NotFound`` (the old
    version's chunks are freed), never returns bytes of the new version.

    Writing streams full blocks to the servers as they fill and commits on close (or, inside
    ``fs.transaction``, when the transaction ends); a file closed after an exception (or
    discarded) never becomes visible.
    """

    fs: IosvcFileSystem
    closed: bool

    def __init__(self, fs: IosvcFileSystem, path: str, mode: str = "rb", **kwargs: Any) -> None:
        if mode not in ("rb", "wb", "xb"):
            raise ValueError(f"iosvc files open as 'rb', 'wb' or 'xb', not {mode!r}")
        self._writer: AsyncWriter | None = None
        self._version: FileInfo | None = None
        if mode == "rb":
            info = fs.info(path)
            if info["type"] != "file":
                raise IsADirectory(f"{path} is a directory")
            self._version = info
            kwargs.setdefault("size", info["size"])
            block_size = kwargs.get("block_size")
            # One block would be fetched by the first read anyway: fetch it now, so the
            # bytes are this version's even if the file is replaced before then.
            small = isinstance(block_size, int) and info["size"] <= block_size
            if small and "cache_type" not in kwargs:
                kwargs["cache_type"] = "all"
        elif mode == "xb" and fs.exists(path):
            raise AlreadyExists(f"{path} already exists")
        super().__init__(fs, path, mode="wb" if mode == "xb" else mode, **kwargs)
        if self._version is not None:
            self.details = self._version

    def _fetch_range(self, start: int, end: int) -> bytes:
        assert self._version is not None
        data: bytes = sync(self.fs.loop, self.fs.client.read_version, self._version, start, end)
        return data

    def _initiate_upload(self) -> None:
        self._writer = self.fs.client.open_writer(self.path, chunk_size=self.fs.client.chunk_size)

    def _upload_chunk(self, final: bool = False) -> bool:
        if self._writer is None:
            self._initiate_upload()
        assert self._writer is not None
        try:
            sync(self.fs.loop, self._writer.write, self.buffer.getbuffer())
            if final and self.autocommit:
                sync(self.fs.loop, self._writer.close)
                self._writer = None
        except BaseException:
            # A failed write or commit publishes nothing and frees the chunks already sent.
            self.discard()
            raise
        return True

    def commit(self) -> None:
        """Publish the file (end of ``fs.transaction``; with autocommit, ``close`` does it)."""
        if not self.closed:
            self.close()
        writer, self._writer = self._writer, None
        if writer is None:
            return  # discarded (an exception inside its ``with``) or already committed
        try:
            sync(self.fs.loop, writer.close)
        except BaseException:
            sync(self.fs.loop, writer.abort)
            raise

    def discard(self) -> None:
        """Give up the file: nothing becomes visible."""
        writer, self._writer = self._writer, None
        if writer is not None:
            sync(self.fs.loop, writer.abort)

    def __exit__(self, exc_type: object, *args: Any) -> None:
        # An exception inside ``with fs.open(path, "wb")`` leaves nothing visible (a crashed
        # writer never publishes half a file), unlike a local file.
        if exc_type is not None and self.mode != "rb" and not self.closed:
            self.discard()
            self.closed = True
            return
        self.close()

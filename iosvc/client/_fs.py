"""``IosvcFileSystem``: iosvc as an fsspec ``AsyncFileSystem`` (protocol ``iosvc``).

Implements only the ``_``-prefixed coroutines; fsspec derives the sync API. Registered through
the ``fsspec.specs`` entry point, so ``fsspec.filesystem("iosvc")``, ``fsspec.open("iosvc://…")``,
zarr's ``FsspecStore``, pyarrow and pandas work with no import. Instances pickle as their
constructor arguments (fsspec's ``_Cached`` metaclass), so a filesystem made in a DataLoader's
parent works in its workers.
"""

from __future__ import annotations

import os
from typing import Any

from fsspec.asyn import AsyncFileSystem, sync
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.spec import AbstractBufferedFile
from fsspec.utils import glob_translate

from iosvc.client._async import AsyncClient, AsyncWriter, FileInfo
from iosvc.errors import AlreadyExists, IosvcError, NotFound
from iosvc.identity import JobIdentity

__all__ = ["IosvcFile", "IosvcFileSystem"]


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


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
        if await self._isfile(path):
            raise AlreadyExists(f"{path} exists and is a file")
        if not create_parents:
            parent = self._parent(path)
            if parent and not await self._exists(parent):
                raise NotFound(f"parent of {path} does not exist")
        await self.client.mkdir(path)

    async def _makedirs(self, path: str, exist_ok: bool = False) -> None:
        path = self._strip_protocol(path)
        if await self._exists(path):
            if not exist_ok:
                raise AlreadyExists(f"{path} already exists")
            return
        await self.client.mkdir(path)

    async def _rm_file(self, path: str, **kwargs: Any) -> None:
        await self.client.rm(self._strip_protocol(path))

    async def _rm(
        self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None, **kw: Any
    ) -> None:
        paths = path if isinstance(path, list) else [path]
        expanded = await self._expand_path(paths, recursive=recursive, maxdepth=maxdepth)
        await self.client.rm(expanded, recursive=recursive)

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
        plain = [path] if isinstance(path, str) else list(path)
        if recursive or any(_has_magic(p) for p in plain):
            paths = await self._expand_path(path, recursive=recursive)
        else:
            paths = self._strip_protocol(plain)
        # One batched call per home server instead of one call per file.
        results = await self.client.read_many(paths)
        out: list[Any] = []
        for result in results:
            if isinstance(result, IosvcError):
                if on_error == "raise":
                    raise result
                if on_error == "omit":
                    out.append(None)
                    continue
            out.append(result)
        if len(paths) > 1 or isinstance(path, list) or paths[0] != self._strip_protocol(path):
            return {
                p: v
                for p, v, r in zip(paths, out, results, strict=True)
                if not (on_error == "omit" and isinstance(r, IosvcError))
            }
        return out[0]

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
        await self.client.write_many({self._strip_protocol(k): v for k, v in files.items()})

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
        self, rpath: str, lpath: str, callback: Callback = DEFAULT_CALLBACK, **kwargs: Any
    ) -> None:
        rpath = self._strip_protocol(rpath)
        if os.path.isdir(lpath):
            return
        info = await self._info(rpath)
        if info["type"] == "directory":
            os.makedirs(lpath, exist_ok=True)
            return
        callback.set_size(info["size"])
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

    @staticmethod
    def _glob_regex(pattern: str) -> str:
        return glob_translate(pattern)


class IosvcFile(AbstractBufferedFile):  # type: ignore[misc]
    """A buffered file on iosvc.

    Reading sticks to the version that was current at open, even if a writer replaces the
    file meanwhile. Writing streams full blocks to the servers as they fill and commits on
    close; a file closed after an exception (or discarded) never becomes visible.
    """

    fs: IosvcFileSystem

    def __init__(self, fs: IosvcFileSystem, path: str, mode: str = "rb", **kwargs: Any) -> None:
        if mode not in ("rb", "wb", "xb"):
            raise ValueError(f"iosvc files open as 'rb', 'wb' or 'xb', not {mode!r}")
        self._writer: AsyncWriter | None = None
        self._version: FileInfo | None = None
        if mode == "rb":
            info = fs.info(path)
            if info["type"] != "file":
                raise IsADirectoryError(f"{path} is a directory")
            self._version = info
            kwargs.setdefault("size", info["size"])
        elif mode == "xb" and fs.exists(path):
            raise FileExistsError(f"{path} already exists")
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
        data = self.buffer.getvalue()
        sync(self.fs.loop, self._writer.write, data)
        if final:
            sync(self.fs.loop, self._writer.close)
        return True

    def discard(self) -> None:
        if self._writer is not None:
            sync(self.fs.loop, self._writer.abort)
            self._writer = None

    def __exit__(self, exc_type: object, *args: Any) -> None:
        # An exception inside ``with fs.open(path, "wb")`` leaves nothing visible (a crashed
        # writer never publishes half a file), unlike a local file.
        if exc_type is not None and self.mode != "rb" and not self.closed:
            self.discard()
            self.closed = True
            return
        self.close()

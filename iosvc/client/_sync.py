"""``Client``: the blocking twin of :class:`AsyncClient`.

It runs the async client on fsspec's one event-loop thread (``fsspec.asyn.get_loop``), the same
loop :class:`IosvcFileSystem` uses, so there is one sync bridge in the process. fsspec resets
that loop after ``fork`` and the async client drops its channels, so a ``Client`` made before
DataLoader workers fork still works inside them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from fsspec.asyn import get_loop, sync

from iosvc.client._async import DEFAULT_RETRIES, AsyncClient, FileInfo
from iosvc.config import ClusterSpec
from iosvc.errors import IosvcError
from iosvc.identity import JobIdentity

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """Blocking client; same parameters and methods as :class:`AsyncClient`."""

    def __init__(
        self,
        cluster: ClusterSpec | str | os.PathLike[str] | None = None,
        *,
        identity: JobIdentity | None = None,
        chunk_size: int | None = None,
        retries: int = DEFAULT_RETRIES,
        timeout: float = 120.0,
        token: str | None = None,
    ) -> None:
        self.aio = AsyncClient(
            cluster,
            identity=identity,
            chunk_size=chunk_size,
            retries=retries,
            timeout=timeout,
            token=token,
        )

    def _run(self, func: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kw: Any) -> T:
        result: T = sync(get_loop(), func, *args, **kw)
        return result

    @property
    def spec(self) -> ClusterSpec:
        return self.aio.spec

    @property
    def identity(self) -> JobIdentity:
        return self.aio.identity

    def call_all(self, header: dict[str, Any]) -> list[dict[str, Any]]:
        """Send one raw operation to every server; return their reply headers in order."""
        return self._run(self.aio.call_all, header)

    def status(self) -> list[dict[str, Any]]:
        return self._run(self.aio.status)

    def info(self, path: str) -> FileInfo:
        return self._run(self.aio.info, path)

    def info_many(self, paths: Iterable[str]) -> list[FileInfo | IosvcError]:
        return self._run(self.aio.info_many, list(paths))

    def exists(self, path: str) -> bool:
        return self._run(self.aio.exists, path)

    def ls(self, path: str = "", *, recursive: bool = False) -> list[FileInfo]:
        return self._run(self.aio.ls, path, recursive=recursive)

    def mkdir(self, path: str) -> None:
        self._run(self.aio.mkdir, path)

    def rm(self, paths: str | Iterable[str], *, recursive: bool = False) -> None:
        self._run(self.aio.rm, paths, recursive=recursive)

    def read(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        return self._run(self.aio.read, path, start, end)

    def read_many(self, paths: Iterable[str]) -> list[bytes | IosvcError]:
        return self._run(self.aio.read_many, list(paths))

    def write(self, path: str, data: bytes | bytearray | memoryview) -> None:
        self._run(self.aio.write, path, data)

    def write_many(self, files: Mapping[str, bytes | bytearray | memoryview]) -> None:
        self._run(self.aio.write_many, files)

    def put_file(
        self,
        local_path: str | os.PathLike[str],
        path: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._run(self.aio.put_file, local_path, path, progress)

    def pull_files(
        self,
        files: Sequence[tuple[str | os.PathLike[str], str]],
        **options: Any,
    ) -> dict[str, IosvcError]:
        """Server-side stage-in; see :meth:`AsyncClient.pull_files`."""
        return self._run(self.aio.pull_files, files, **options)

    def pull_probe(self, local_path: str | os.PathLike[str]) -> str | None:
        return self._run(self.aio.pull_probe, local_path)

    def get_file(
        self,
        path: str,
        local_path: str | os.PathLike[str],
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._run(self.aio.get_file, path, local_path, progress)

    def close(self) -> None:
        self._run(self.aio.close)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

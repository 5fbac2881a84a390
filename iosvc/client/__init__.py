"""iosvc clients: :class:`AsyncClient`, its blocking twin :class:`Client`, and the fsspec
filesystem :class:`IosvcFileSystem` (``iosvc://``)."""

from iosvc.client._async import AsyncClient, AsyncWriter, FileInfo, fork_safe
from iosvc.client._fs import IosvcFile, IosvcFileSystem
from iosvc.client._sync import Client

__all__ = [
    "AsyncClient",
    "AsyncWriter",
    "Client",
    "FileInfo",
    "IosvcFile",
    "IosvcFileSystem",
    "fork_safe",
]

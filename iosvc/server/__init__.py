"""iosvc servers: chunk stores, namespace, admission gate and the grpc.aio service."""

from iosvc.server._cluster import LocalCluster, stop_pids
from iosvc.server._gate import DeviceModel, FifoQueue, IoGate
from iosvc.server._main import ServerOptions, run, serve, start_server
from iosvc.server._service import IoService
from iosvc.server._stores import ByteRange, ChunkStore, LocalDirStore, MemoryStore

__all__ = [
    "ByteRange",
    "ChunkStore",
    "DeviceModel",
    "FifoQueue",
    "IoGate",
    "IoService",
    "LocalCluster",
    "LocalDirStore",
    "MemoryStore",
    "ServerOptions",
    "run",
    "serve",
    "start_server",
    "stop_pids",
]

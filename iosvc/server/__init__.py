"""iosvc servers: chunk stores, namespace, admission gate and the grpc.aio service."""

from iosvc.server._cluster import LocalCluster, stop_pids
from iosvc.server._gate import DeviceModel, IoGate, JobStats
from iosvc.server._main import ServerOptions, run, serve, start_server
from iosvc.server._metrics import ServerMetrics
from iosvc.server._service import IoService
from iosvc.server._stores import ByteRange, ChunkStore, LocalDirStore, MemoryStore

__all__ = [
    "ByteRange",
    "ChunkStore",
    "DeviceModel",
    "IoGate",
    "IoService",
    "JobStats",
    "LocalCluster",
    "LocalDirStore",
    "MemoryStore",
    "ServerMetrics",
    "ServerOptions",
    "run",
    "serve",
    "start_server",
    "stop_pids",
]

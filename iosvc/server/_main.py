"""Running a server process: ``iosvc serve``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from iosvc import wire
from iosvc._malloc import tune_malloc
from iosvc.config import ClusterSpec
from iosvc.identity import load_key_file
from iosvc.server._auth import Authorizer
from iosvc.server._dataplane import DataPlaneServer
from iosvc.server._gate import DeviceModel, IoGate
from iosvc.server._metrics import ServerMetrics
from iosvc.server._service import DEFAULT_INFLIGHT_LIMIT, IoService
from iosvc.server._stores import ChunkStore, LocalDirStore, MemoryStore

__all__ = ["ServerOptions", "make_store", "serve", "start_server", "tune_malloc"]

log = logging.getLogger("iosvc.server")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Options of one server process (``iosvc serve --help`` explains each)."""

    host: str = "127.0.0.1"
    port: int = 0
    index: int | None = None
    peers: list[str] | None = None
    memory: int | None = None
    directory: str | None = None
    capacity: int | None = None
    slots: int | None = None
    policy: str = "fifo"
    metrics_port: int | None = None
    device_bandwidth: float | None = None
    device_latency: float = 0.0
    gc_ttl: float = 600.0
    gc_interval: float = 60.0
    drop_grace: float = 5.0
    key_file: str | None = None
    ready_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: CA to trust when calling peers (default: tls_cert itself, for a self-signed cluster cert)
    tls_ca: str | None = None
    inflight_limit: int | None = DEFAULT_INFLIGHT_LIMIT
    stream_idle_timeout: float = 60.0
    #: server 0 writes the cluster file here once every peer answers (multi-node clusters)
    cluster_file: str | None = None
    #: directories server-side stage-in (``pull``) may read; empty: off
    pull_roots: tuple[str, ...] = ()
    #: seconds between exchanges of per-job service with the peers (cluster-wide policies)
    fairness_interval: float = 0.1
    #: port of the data plane for bulk transfers (0: any free port; None: off; off with TLS)
    data_port: int | None = 0

    def __post_init__(self) -> None:
        if self.memory is not None and self.directory is not None:
            raise ValueError("choose --memory or --dir, not both")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")


def make_store(options: ServerOptions) -> ChunkStore:
    if options.directory is not None:
        return LocalDirStore(options.directory, capacity=options.capacity)
    return MemoryStore(capacity=options.memory or options.capacity)


async def start_server(options: ServerOptions) -> tuple[grpc.aio.Server, IoService, int]:
    """Build, recover and start a server; return it, its service and the bound port.

    The data port (:mod:`iosvc.dataplane`), if any, is ``service.data_plane``.
    """
    device = None
    if options.device_bandwidth or options.device_latency:
        device = DeviceModel(options.device_bandwidth, options.device_latency)
    metrics = ServerMetrics()
    service = IoService(
        make_store(options),
        IoGate(
            slots=options.slots, policy=options.policy, device=device, on_grant=metrics.on_grant
        ),
        index=options.index,
        peers=options.peers,
        gc_ttl=options.gc_ttl,
        drop_grace=options.drop_grace,
        auth=Authorizer(load_key_file(options.key_file) if options.key_file else None),
        tls_ca=(options.tls_ca or options.tls_cert) if options.tls_cert else None,
        inflight_limit=options.inflight_limit,
        stream_idle_timeout=options.stream_idle_timeout,
        pull_roots=options.pull_roots,
    )
    await service.load()
    metrics.watch(service)
    if options.metrics_port is not None:
        service.metrics_port = metrics.serve(options.host, options.metrics_port)
    server = grpc.aio.server(options=wire.CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((service.handler(),))
    address = f"{options.host}:{options.port}"
    try:
        if options.tls_cert and options.tls_key:
            credentials = wire.server_credentials(options.tls_cert, options.tls_key)
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind": port taken, or an address not on this node
        port = 0
    if port == 0:
        raise OSError(
            f"could not bind {address}: the port is in use or the address is not on this node"
        )
    if options.data_port is not None and not options.tls_cert:
        # Bulk reads over plain TCP; with TLS they stay on gRPC, which encrypts them.
        service.data_plane = DataPlaneServer(service, options.stream_idle_timeout)
        await service.data_plane.start(options.host, options.data_port)
    try:
        await server.start()
    except BaseException:
        if service.data_plane is not None:
            await service.data_plane.close()
        raise
    return server, service, port


async def serve(options: ServerOptions) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully (in-flight calls get 5 s)."""
    server, service, port = await start_server(options)
    address = f"{options.host}:{port}"
    log.info("iosvc server listening on %s (%s)", address, type(service.store).__name__)
    if service.data_plane is not None:
        log.info("data port %s", service.data_plane.port)
    if options.ready_file:
        tmp = Path(options.ready_file + ".tmp")
        # The endpoints go into the cluster file: readers then need no gRPC call first.
        tmp.write_text(f"{address}\n{os.getpid()}\n{json.dumps(service.endpoints())}\n")
        os.replace(tmp, options.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def gc_loop() -> None:
        while True:
            await asyncio.sleep(options.gc_interval)
            try:
                freed = await service.collect_garbage()
                if freed:
                    log.info("garbage collection freed %d bytes", freed)
            except Exception:
                log.exception("garbage collection failed")

    async def fairness_loop() -> None:
        # Only policies with scope = "cluster" use it; checked every round, so a live
        # `iosvc policy set` turns it on or off.
        while True:
            await asyncio.sleep(options.fairness_interval)
            if service.cluster_wide:
                try:
                    await service.exchange_service()
                except Exception:
                    log.exception("service exchange with peers failed")

    gc_task = asyncio.create_task(gc_loop())
    fairness_task = asyncio.create_task(fairness_loop())
    announce = None
    if options.cluster_file and service.index == 0:
        announce = asyncio.create_task(_write_cluster_file(service, options))
    await stop.wait()
    log.info("stopping")
    gc_task.cancel()
    fairness_task.cancel()
    if announce is not None:
        announce.cancel()
    await server.stop(grace=5)
    if service.data_plane is not None:
        await service.data_plane.close()
    await service.close()
    with contextlib.suppress(FileNotFoundError):
        if options.ready_file:
            os.unlink(options.ready_file)


async def _write_cluster_file(service: IoService, options: ServerOptions) -> None:
    """Server 0 of a multi-node cluster: once every peer answers, publish the cluster file.

    Clients of the job find the burst buffer through it (``IOSVC_CLUSTER``); it appears only
    when the whole cluster can serve, so a job step started after it never sees a half cluster.
    """
    assert options.cluster_file is not None
    waiting = set(range(len(service.peers))) - {0}
    started = time.monotonic()
    while waiting:
        for peer in sorted(waiting):
            if await service._peer_call(peer, {"op": "status"}) is not None:
                waiting.discard(peer)
        if waiting:
            if time.monotonic() - started > 300:
                log.error("peers %s never answered; no cluster file written", sorted(waiting))
                return
            await asyncio.sleep(0.2)
    # Each server's endpoints, so readers need no gRPC call before their first read; none
    # if a peer cannot say (older than them): clients then ask each server.
    endpoints = [service.endpoints()]
    for peer in range(1, len(service.peers)):
        endpoints.append(await service._peer_call(peer, {"op": "endpoints"}) or {})
    storage = f"dir {options.directory}" if options.directory else "memory"
    extra: dict[str, Any] = {}
    if options.tls_cert:
        extra["tls_ca"] = options.tls_ca or options.tls_cert
    spec = ClusterSpec(
        servers=tuple(service.peers),
        storage=storage,
        secure=service.auth.secure,
        endpoints=tuple(endpoints) if all(endpoints) else (),
        extra=extra,
    )
    spec.save(options.cluster_file)
    log.info("all %d servers up; wrote %s", len(service.peers), options.cluster_file)


def run(options: ServerOptions) -> None:
    """Entry point of ``iosvc serve``: uvloop + :func:`serve`."""
    import uvloop

    tune_malloc()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(options))

"""Prometheus metrics of one server (``/metrics`` on ``--metrics-port``).

Per-job counters are labelled ``job``, ``user`` and ``group`` so dashboards can sum them by any
level of a sharing policy; they are counted when a request is let through the gate, so they
never go down (the scheduler's own tree forgets idle jobs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from iosvc.identity import JobIdentity

if TYPE_CHECKING:
    from iosvc.server._service import IoService

__all__ = ["ServerMetrics"]

_LABELS = ("job", "user", "group")


class ServerMetrics:
    """Counters fed by the gate, gauges read from the service at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.served_bytes = Counter(
            "iosvc_served_bytes", "Bytes let through the scheduler", _LABELS, registry=self.registry
        )
        self.requests = Counter(
            "iosvc_requests", "Requests let through the scheduler", _LABELS, registry=self.registry
        )
        self.wait_seconds = Counter(
            "iosvc_queue_wait_seconds",
            "Seconds requests waited in the fair-share queue",
            _LABELS,
            registry=self.registry,
        )
        self.wait = Histogram(
            "iosvc_queue_wait",
            "Queueing delay per request (seconds)",
            buckets=(0.0001, 0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0),
            registry=self.registry,
        )
        self.port: int | None = None
        self._server: Any = None
        self._children: dict[JobIdentity, tuple[Any, Any, Any]] = {}

    def on_grant(self, identity: JobIdentity, nbytes: int, waited: float, ops: int = 1) -> None:
        children = self._children.get(identity)
        if children is None:
            # Looked up once per job: labels() validates and locks on every call, which was
            # a few percent of a server's CPU at one call per chunk.
            labels = (identity.job_id, identity.user, identity.group)
            children = self._children[identity] = (
                self.served_bytes.labels(*labels),
                self.requests.labels(*labels),
                self.wait_seconds.labels(*labels),
            )
        served, requests, wait_seconds = children
        served.inc(nbytes)
        requests.inc(ops)
        wait_seconds.inc(waited)
        self.wait.observe(waited)

    def watch(self, service: IoService) -> None:
        self.registry.register(_ServiceCollector(service))

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; return the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class _ServiceCollector(Collector):
    def __init__(self, service: IoService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        # Runs in the HTTP thread: read plain numbers only, never walk the scheduler's tree.
        s = self.service
        yield GaugeMetricFamily("iosvc_used_bytes", "Bytes stored", value=s.store.used_bytes)
        if s.store.capacity is not None:
            yield GaugeMetricFamily("iosvc_capacity_bytes", "Capacity", value=s.store.capacity)
        yield GaugeMetricFamily("iosvc_files", "Files homed here", value=len(s.namespace))
        yield GaugeMetricFamily("iosvc_queued_requests", "Requests queued", value=s.gate.queued)
        yield GaugeMetricFamily("iosvc_busy_slots", "I/O slots in use", value=s.gate.busy)
        if s.data_plane is not None:
            yield GaugeMetricFamily(
                "iosvc_data_connections",
                "Open connections to the data port",
                value=s.data_plane.connections,
            )
            yield CounterMetricFamily(
                "iosvc_data_sent_bytes",
                "Payload bytes sent over the data port",
                value=s.data_plane.bytes_sent,
            )
            yield CounterMetricFamily(
                "iosvc_data_received_bytes",
                "Payload bytes received and stored over the data port",
                value=s.data_plane.bytes_received,
            )

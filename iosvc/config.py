"""Cluster files: how clients find a running cluster.

A cluster file is JSON written by ``iosvc up`` (or by a Slurm job script) listing the servers in
order. Clients look for it, in order: an explicit argument, ``$IOSVC_CLUSTER``, then the default
location ``$XDG_RUNTIME_DIR/iosvc/cluster.json`` or ``~/.iosvc/cluster.json``. It is read when a
client is built, never at import time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iosvc.errors import InvalidArgument, NotFound
from iosvc.wire import DEFAULT_CHUNK_SIZE

__all__ = ["ClusterSpec", "default_cluster_file", "find_cluster_file"]


def default_cluster_file() -> Path:
    """Where ``iosvc up`` writes the cluster file when not told otherwise."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "iosvc" if runtime else Path.home() / ".iosvc"
    return base / "cluster.json"


def find_cluster_file(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the cluster file path (argument, ``IOSVC_CLUSTER``, default)."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("IOSVC_CLUSTER")
    return Path(env) if env else default_cluster_file()


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The servers of one cluster, in placement order.

    Parameters
    ----------
    servers
        ``host:port`` of each server; the position is the server's index in placement.
    chunk_size
        Default chunk size for new files.
    pids
        Process ids of locally started servers (``iosvc up``), for ``iosvc down``.
    storage
        Human description of the storage (``memory 1 GiB`` / ``dir /path``).
    secure
        Whether servers require signed job tokens.
    endpoints
        Each server's ``endpoints`` answer when the file was written (its data port, process
        instance, in-place host and the calls its port answers), or empty. With them a
        client reads without gRPC (metadata and chunks alike go over the data ports, see
        :mod:`iosvc.dataplane`), so a process may fork DataLoader workers after reading. A
        stale entry (the server restarted) fails the data port's ``hello``; the client then
        reads the file again and, if it lists nothing newer, asks the server.
    """

    servers: tuple[str, ...]
    chunk_size: int = DEFAULT_CHUNK_SIZE
    pids: tuple[int, ...] = ()
    storage: str = ""
    secure: bool = False
    endpoints: tuple[dict[str, Any], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.servers:
            raise InvalidArgument("a cluster needs at least one server")
        for address in self.servers:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise InvalidArgument(f"server address must be host:port, got {address!r}")
        if not 4096 <= self.chunk_size <= 16 * 1024 * 1024:
            raise InvalidArgument("chunk_size must be between 4 KiB and 16 MiB")
        if self.endpoints and (
            len(self.endpoints) != len(self.servers)
            or not all(isinstance(e, dict) for e in self.endpoints)
        ):
            raise InvalidArgument("endpoints must list one object per server")

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> ClusterSpec:
        """Read a cluster file; ``NotFound`` with the next step if there is none."""
        where = find_cluster_file(path)
        try:
            data = json.loads(where.read_text())
        except FileNotFoundError:
            raise NotFound(
                f"no iosvc cluster file at {where}; start a local cluster with `iosvc up` "
                "or point IOSVC_CLUSTER at a cluster file"
            ) from None
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"cluster file {where} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterSpec:
        """Build from the JSON form; unknown keys are kept in ``extra``."""
        if not isinstance(data, dict) or "servers" not in data:
            raise InvalidArgument("cluster file must be an object with a 'servers' list")
        known = {"servers", "chunk_size", "pids", "storage", "secure", "endpoints"}
        endpoints = data.get("endpoints", ())
        if not isinstance(endpoints, list | tuple):
            raise InvalidArgument("endpoints must list one object per server")
        return cls(
            servers=tuple(data["servers"]),
            chunk_size=int(data.get("chunk_size", DEFAULT_CHUNK_SIZE)),
            pids=tuple(data.get("pids", ())),
            storage=str(data.get("storage", "")),
            secure=bool(data.get("secure", False)),
            endpoints=tuple(endpoints),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["servers"] = list(self.servers)
        data["pids"] = list(self.pids)
        data["endpoints"] = list(self.endpoints)
        if not self.endpoints:
            del data["endpoints"]
        extra = data.pop("extra")
        data.update(extra)
        return data

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write atomically (temp file + rename) so a reader never sees half a file."""
        where = find_cluster_file(path)
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, where)
        return where

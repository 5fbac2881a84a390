"""The embedded local cluster: N server processes on loopback (``iosvc up``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from iosvc import wire
from iosvc.config import ClusterSpec
from iosvc.errors import Unavailable
from iosvc.identity import JobIdentity, issue_token, new_key_file

__all__ = ["LocalCluster", "stop_pids"]


class LocalCluster:
    """Start and stop a cluster of real server processes on this machine.

    Each server binds port 0 and reports its address through a ready file; once all are up
    the cluster tells every server the full peer list (no port races).

    Parameters
    ----------
    servers
        Number of server processes.
    memory
        Capacity of each server's DRAM store in bytes (the default store).
    directory
        Use node-local disk instead: server *i* keeps its data in ``directory/server-i``.
    server_args
        Extra ``iosvc serve`` options, e.g. ``["--device-bandwidth", "400MB/s"]``.
    cluster_file
        Where to write the cluster file (default: none for the Python API).
    workdir
        Where logs and ready files go (default: a temporary directory).
    env
        Extra environment variables for the servers.
    tls_cert, tls_key
        Serve TLS with this certificate and key (PEM); clients trust ``tls_ca``.
    tls_ca
        CA file clients and peers trust (default: ``tls_cert``, a self-signed certificate);
        recorded in the cluster file as ``tls_ca``.
    pull_roots
        Directories the servers may read for server-side stage-in (``iosvc serve
        --pull-root``); none by default.
    """

    def __init__(
        self,
        servers: int = 2,
        *,
        memory: int | None = None,
        directory: str | os.PathLike[str] | None = None,
        capacity: int | None = None,
        server_args: list[str] | None = None,
        cluster_file: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 30.0,
        secure: bool = False,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        pull_roots: list[str | os.PathLike[str]] | None = None,
    ) -> None:
        if servers < 1:
            raise ValueError("a cluster needs at least one server")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        self.n_servers = servers
        self.memory = memory
        self.directory = Path(directory) if directory is not None else None
        self.capacity = capacity
        self.server_args = list(server_args or [])
        self.cluster_file = cluster_file
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="iosvc-cluster-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = env or {}
        self.secure = secure
        self.tls_cert = str(Path(tls_cert).resolve()) if tls_cert is not None else None
        self.tls_key = str(Path(tls_key).resolve()) if tls_key is not None else None
        ca = tls_ca if tls_ca is not None else tls_cert
        self.tls_ca = str(Path(ca).resolve()) if ca is not None else None
        self.key_file = self.workdir / "cluster.key"
        self.admin_token_file = self.workdir / "admin.token"
        self._admin_token: str | None = None
        self.startup_timeout = startup_timeout
        self.pull_roots = [str(Path(p).resolve()) for p in pull_roots or ()]
        self.procs: list[subprocess.Popen[bytes] | None] = []
        self.addresses: list[str] = []
        self.spec: ClusterSpec | None = None

    # ------------------------------------------------------------ processes
    def _command(self, index: int, port: int, peers: list[str] | None) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "iosvc.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        cmd += ["--ready-file", str(self._ready_file(index))]
        if self.directory is not None:
            cmd += ["--dir", str(self.directory / f"server-{index}")]
            if self.capacity is not None:
                cmd += ["--capacity", str(self.capacity)]
        else:
            cap = self.memory or self.capacity
            if cap is not None:
                cmd += ["--memory", str(cap)]
        if peers is not None:
            cmd += ["--index", str(index), "--peers", ",".join(peers)]
        if self.secure:
            cmd += ["--key-file", str(self.key_file)]
        if self.tls_cert and self.tls_key and self.tls_ca:
            cmd += ["--tls-cert", self.tls_cert, "--tls-key", self.tls_key, "--tls-ca", self.tls_ca]
        for root in self.pull_roots:
            cmd += ["--pull-root", root]
        return cmd + self.server_args

    def _ready_file(self, index: int) -> Path:
        return self.workdir / f"server-{index}.ready"

    def _spawn(self, index: int, port: int, peers: list[str] | None) -> subprocess.Popen[bytes]:
        self._ready_file(index).unlink(missing_ok=True)
        env = {**os.environ, **self.env}
        with open(self.workdir / f"server-{index}.log", "ab") as log:
            return subprocess.Popen(
                self._command(index, port, peers),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # `iosvc down` and Ctrl-C of the shell are separate
            )

    def _wait_ready(self, index: int) -> tuple[str, dict[str, Any]]:
        """The server's address and its ``endpoints`` (ready file: address, pid, endpoints)."""
        deadline = time.monotonic() + self.startup_timeout
        ready = self._ready_file(index)
        proc = self.procs[index]
        while time.monotonic() < deadline:
            if ready.exists():
                address, _, endpoints = ready.read_text().splitlines()[:3]
                return address, json.loads(endpoints)
            if proc is not None and proc.poll() is not None:
                log = (self.workdir / f"server-{index}.log").read_text(errors="replace")[-2000:]
                raise Unavailable(f"server {index} exited with {proc.returncode} at start:\n{log}")
            time.sleep(0.02)
        raise Unavailable(f"server {index} not ready after {self.startup_timeout:.0f} s")

    def start(self) -> ClusterSpec:
        """Start every server, configure the peer list, write the cluster file."""
        if self.secure:
            self._make_keys()
        try:
            self.procs = [self._spawn(i, 0, None) for i in range(self.n_servers)]
            ready = [self._wait_ready(i) for i in range(self.n_servers)]
            self.addresses = [address for address, _ in ready]
            for i, address in enumerate(self.addresses):
                header = {"op": "configure", "index": i, "peers": self.addresses}
                _call(address, header, self._admin_token, self.tls_ca)
        except BaseException:
            self.stop()
            raise
        storage = (
            f"dir {self.directory}"
            if self.directory is not None
            else f"memory {_human(self.memory) if self.memory else 'unbounded'}"
        )
        self.spec = ClusterSpec(
            servers=tuple(self.addresses),
            pids=tuple(p.pid for p in self.procs if p is not None),
            storage=storage,
            secure=self.secure,
            endpoints=tuple(endpoints for _, endpoints in ready),
            extra={"workdir": str(self.workdir)}
            | ({"tls_ca": self.tls_ca} if self.tls_ca else {})
            | (
                {"key_file": str(self.key_file), "admin_token_file": str(self.admin_token_file)}
                if self.secure
                else {}
            ),
        )
        if self.cluster_file is not None:
            self.spec.save(self.cluster_file)
        return self.spec

    def _make_keys(self) -> None:
        """A fresh cluster key and an admin token, both readable only by their owner."""
        self.key_file.unlink(missing_ok=True)
        key = new_key_file(self.key_file)
        admin = JobIdentity("admin", os.environ.get("USER", "root") or "root", "admin", 1)
        self._admin_token = issue_token(key, admin, 30 * 24 * 3600, admin=True)
        self.admin_token_file.unlink(missing_ok=True)
        fd = os.open(self.admin_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._admin_token + "\n")

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Stop one server abruptly (fault tests)."""
        proc = self.procs[index]
        if proc is not None:
            proc.send_signal(sig)
            proc.wait(10)
            self.procs[index] = None

    def restart(self, index: int) -> None:
        """Start server ``index`` again on its old address (its data back if on disk)."""
        if self.procs[index] is not None:
            raise RuntimeError(f"server {index} is still running")
        port = int(self.addresses[index].rpartition(":")[2])
        self.procs[index] = self._spawn(index, port, self.addresses)
        _, endpoints = self._wait_ready(index)
        if self.spec is not None and self.spec.endpoints:
            # A new data port and instance: clients made from here on need no lookup.
            changed = list(self.spec.endpoints)
            changed[index] = endpoints
            self.spec = dataclasses.replace(self.spec, endpoints=tuple(changed))
            if self.cluster_file is not None:
                self.spec.save(self.cluster_file)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every server (graceful), SIGKILL what is left after ``timeout``."""
        stop_pids([p.pid for p in self.procs if p is not None and p.poll() is None], timeout)
        for proc in self.procs:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1)
        self.procs = []
        if self.cluster_file is not None:
            Path(self.cluster_file).unlink(missing_ok=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_pids(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Gracefully stop processes; return the pids that had to be killed."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass  # not our child: fall back to a signal probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _call(
    address: str, header: dict[str, object], token: str | None, tls_ca: str | None = None
) -> dict[str, object]:
    header = {**header, "id": ["iosvc-admin", "root", "root", 1]}
    if token is not None:
        header = {**header, "id": None, "tok": token}
    with wire.sync_channel(address, tls_ca) as channel:
        try:
            reply = channel.unary_unary(wire.METHOD_CALL)(wire.pack(header), timeout=10)
        except grpc.RpcError as exc:
            raise wire.error_from_rpc(exc, address) from None
    return wire.unpack(reply)[0]

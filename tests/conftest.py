"""Shared fixtures: real server processes on loopback ports, real files."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping

import pytest

from iosvc.client import Client
from iosvc.config import ClusterSpec
from iosvc.server import LocalCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 2-server in-memory cluster shared by the session (tests use unique prefixes)."""
    workdir = tmp_path_factory.mktemp("cluster")
    with LocalCluster(2, memory=2 << 30, workdir=workdir) as running:
        yield running


@pytest.fixture(scope="session")
def spec(cluster: LocalCluster) -> ClusterSpec:
    assert cluster.spec is not None
    return cluster.spec


@pytest.fixture(scope="session")
def cluster_file(spec: ClusterSpec, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("clusterfile") / "cluster.json"
    spec.save(path)
    return str(path)


@pytest.fixture
def use_cluster(cluster_file: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point IOSVC_CLUSTER at the session cluster (what `iosvc up` users get by default)."""
    monkeypatch.setenv("IOSVC_CLUSTER", cluster_file)
    return cluster_file


@pytest.fixture
def client(spec: ClusterSpec) -> Client:
    return Client(spec)


@pytest.fixture
def prefix() -> str:
    """A fresh directory name so tests sharing the cluster never see each other's files."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fresh_cluster(tmp_path: os.PathLike[str]) -> Iterator[LocalCluster]:
    """A private 2-server cluster for tests that kill, fill or restart servers."""
    with LocalCluster(2, memory=256 << 20, workdir=tmp_path) as running:
        yield running


CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def iosvc_cli() -> CliRunner:
    """Run the ``iosvc`` command as a user would: ``iosvc_cli("ls", env={...})``."""

    def run(
        *args: str, env: Mapping[str, str] | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "iosvc.cli", *args],
            env={**os.environ, "COLUMNS": "150", **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run

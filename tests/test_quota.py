"""Per-user quotas: cluster-wide usage, clear refusals, nothing half-visible, persistence."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iosvc.client import Client
from iosvc.config import ClusterSpec
from iosvc.errors import InvalidArgument, NotFound, QuotaExceeded
from iosvc.identity import JobIdentity
from iosvc.server import LocalCluster

KiB = 1 << 10
ALICE = JobIdentity("j1", "alice", "g", 1)
BOB = JobIdentity("j2", "bob", "g", 1)


@pytest.fixture
def disk_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(2, directory=tmp_path / "data", workdir=tmp_path / "run") as cluster:
        yield cluster


def as_user(spec: ClusterSpec, who: JobIdentity) -> Client:
    return Client(spec, identity=who)


def set_quota(spec: ClusterSpec, user: str, nbytes: int | None) -> None:
    Client(spec).call_all({"op": "quota_set", "user": user, "bytes": nbytes})


def test_quota_counts_files_on_every_server(disk_cluster: LocalCluster) -> None:
    spec = disk_cluster.spec
    assert spec is not None
    set_quota(spec, "alice", 100 * KiB)
    alice, bob = as_user(spec, ALICE), as_user(spec, BOB)
    for i in range(9):  # 90 KiB spread over both servers by their paths
        alice.write(f"alice/f{i}", os.urandom(10 * KiB))
    homes = {alice.aio.placement.home(f"alice/f{i}") for i in range(9)}
    assert homes == {0, 1}
    time.sleep(1.1)  # peers' usage is at most 1 s stale
    with pytest.raises(QuotaExceeded, match=r"user alice would use .* over the quota"):
        alice.write("alice/too-much", os.urandom(20 * KiB))
    with pytest.raises(NotFound):
        alice.read("alice/too-much")  # nothing half-visible
    assert alice.read("alice/f0") and len(alice.read("alice/f8")) == 10 * KiB
    alice.write("alice/f0", os.urandom(10 * KiB))  # replacing one's own file: same usage
    bob.write("bob/big", os.urandom(200 * KiB))  # others are not limited by alice's quota
    alice.rm("alice/f1")
    time.sleep(1.1)
    alice.write("alice/after-rm", os.urandom(15 * KiB))  # 10 KiB freed + 5 KiB headroom
    [shown0, shown1] = Client(spec).call_all({"op": "quota_show"})
    used = shown0["usage"].get("alice", 0) + shown1["usage"].get("alice", 0)
    assert used == 95 * KiB and shown0["quotas"] == {"alice": 100 * KiB}


def test_quota_survives_a_restart(disk_cluster: LocalCluster) -> None:
    spec = disk_cluster.spec
    assert spec is not None
    set_quota(spec, "alice", 30 * KiB)
    as_user(spec, ALICE).write("alice/a", os.urandom(25 * KiB))
    for i in range(2):
        disk_cluster.kill(i)
        disk_cluster.restart(i)
    replies = Client(spec).call_all({"op": "quota_show"})
    assert all(r["quotas"] == {"alice": 30 * KiB} for r in replies)
    time.sleep(1.1)
    with pytest.raises(QuotaExceeded):
        as_user(spec, ALICE).write("alice/b", os.urandom(10 * KiB))


def test_quota_arguments_are_checked(cluster: LocalCluster) -> None:
    spec = cluster.spec
    assert spec is not None
    for bad in ({"user": "", "bytes": 1}, {"user": "x", "bytes": -1}, {"user": "x", "bytes": "1"}):
        with pytest.raises(InvalidArgument):
            Client(spec).call_all({"op": "quota_set", **bad})


def test_cli_quota_set_and_show(cluster_file: str, iosvc_cli: Any) -> None:
    def iosvc(*args: str) -> subprocess.CompletedProcess[str]:
        return iosvc_cli(*args, env={"IOSVC_CLUSTER": cluster_file})

    out = iosvc("quota", "set", "carol", "5GiB")
    assert out.returncode == 0 and "quota of carol: 5GiB" in out.stdout, out.stderr
    shown = iosvc("quota", "show", "carol")
    assert "carol" in shown.stdout and "5GiB" in shown.stdout
    assert iosvc("quota", "set", "carol", "none").returncode == 0
    bad = iosvc("quota", "set", "carol", "lots")
    assert bad.returncode == 1 and "iosvc: error" in bad.stderr

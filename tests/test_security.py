"""Secure mode: signed job tokens, authorisation, admin operations."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from iosvc import wire
from iosvc.client import Client
from iosvc.errors import AlreadyExists, PermissionDenied, Unauthenticated
from iosvc.identity import (
    JobIdentity,
    issue_token,
    load_key_file,
    new_key_file,
    read_claims,
    verify_token,
)
from iosvc.server import LocalCluster

ALICE = JobIdentity("1001", "alice", "climate", 4)
BOB = JobIdentity("1002", "bob", "bio", 1)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("secure")
    with LocalCluster(2, memory=256 << 20, workdir=workdir, secure=True) as cluster:
        yield cluster


def client_for(cluster: LocalCluster, who: JobIdentity, **kw: object) -> Client:
    key = load_key_file(cluster.key_file)
    assert cluster.spec is not None
    return Client(cluster.spec, token=issue_token(key, who, 3600, **kw))  # type: ignore[arg-type]


def admin(cluster: LocalCluster) -> Client:
    assert cluster.spec is not None
    return Client(cluster.spec, token=cluster.admin_token_file.read_text().strip())


# --------------------------------------------------------------- tokens (unit)
def test_token_round_trip_and_tampering(tmp_path: Path) -> None:
    key = new_key_file(tmp_path / "k")
    token = issue_token(key, ALICE, 60)
    assert verify_token(key, token).identity == ALICE
    assert read_claims(token).identity == ALICE
    body, mac = token.split(".")
    forged = issue_token(b"x" * 32, JobIdentity("1001", "alice", "climate", 400), 60)
    flipped = mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")  # never the MAC itself
    for bad in (forged, f"{forged.split('.')[0]}.{mac}", f"{body}.{flipped}", "junk", ""):
        with pytest.raises(Unauthenticated):
            verify_token(key, bad)
    with pytest.raises(Unauthenticated, match="expired"):
        verify_token(key, issue_token(key, ALICE, 1), now=10**12)


def test_key_file_must_be_private(tmp_path: Path) -> None:
    new_key_file(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_key_file(tmp_path / "k")


# ---------------------------------------------------------- against servers
def _raw_status(cluster: LocalCluster, header: dict[str, object]) -> grpc.StatusCode:
    assert cluster.spec is not None
    with grpc.insecure_channel(cluster.spec.servers[0]) as channel:
        try:
            channel.unary_unary(wire.METHOD_CALL)(wire.pack(header), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_requests_without_valid_token_are_refused(secure: LocalCluster) -> None:
    key = load_key_file(secure.key_file)
    stat = {"op": "stat", "paths": ["alice/x"]}
    declared = {**stat, "id": ALICE.to_wire()}  # open-mode style: declared identity only
    assert _raw_status(secure, declared) == grpc.StatusCode.UNAUTHENTICATED
    forged = issue_token(b"k" * 32, ALICE, 60)
    assert _raw_status(secure, {**stat, "tok": forged}) == grpc.StatusCode.UNAUTHENTICATED
    expired = issue_token(key, ALICE, 1e-9)
    assert _raw_status(secure, {**stat, "tok": expired}) == grpc.StatusCode.UNAUTHENTICATED
    good = issue_token(key, ALICE, 60)
    # more nodes (or another job) than the token says: refused, nothing served
    bigger = {**stat, "tok": good, "id": ["1001", "alice", "climate", 64]}
    assert _raw_status(secure, bigger) == grpc.StatusCode.PERMISSION_DENIED
    other_job = {**stat, "tok": good, "id": ["9999", "alice", "climate", 4]}
    assert _raw_status(secure, other_job) == grpc.StatusCode.PERMISSION_DENIED
    assert _raw_status(secure, {**stat, "tok": good}) == grpc.StatusCode.OK


def test_users_own_their_prefix_and_read_published_datasets(secure: LocalCluster) -> None:
    alice, bob, root = client_for(secure, ALICE), client_for(secure, BOB), admin(secure)
    alice.write("alice/results.bin", os.urandom(3 << 20))
    alice.write_many({"alice/small/1": b"1", "alice/small/2": b"2"})
    assert alice.read("alice/small/1") == b"1"
    with pytest.raises(PermissionDenied):
        bob.read("alice/results.bin")
    assert isinstance(bob.read_many(["alice/small/1"])[0], PermissionDenied)
    with pytest.raises(PermissionDenied):
        bob.ls("alice")
    with pytest.raises(PermissionDenied):
        bob.write("alice/evil", b"x")
    with pytest.raises(PermissionDenied):
        bob.rm("alice/small/1")
    with pytest.raises(PermissionDenied):
        bob.write("toplevel", b"x")
    root.write("datasets/era5/t2m.bin", b"published")
    assert bob.read("datasets/era5/t2m.bin") == b"published"
    with pytest.raises(PermissionDenied, match="read-only"):
        bob.write("datasets/era5/t2m.bin", b"overwritten")
    assert {e["name"] for e in bob.ls("")} == {"datasets"}  # the root shows only what bob may read
    assert alice.read("alice/small/2") == b"2"


def test_info_many_refuses_only_the_paths_a_user_may_not_read(secure: LocalCluster) -> None:
    alice, bob = client_for(secure, ALICE), client_for(secure, BOB)
    alice.write_many({f"alice/i/{n}": b"a" for n in range(20)})
    bob.write_many({f"bob/i/{n}": b"b" for n in range(20)})
    paths = [p for n in range(20) for p in (f"alice/i/{n}", f"bob/i/{n}")]
    got = bob.info_many(paths)  # batches mixing both users' files, on each server
    for path, entry in zip(paths, got, strict=True):
        if path.startswith("alice/"):
            assert isinstance(entry, PermissionDenied), path
        else:
            assert isinstance(entry, dict) and entry["name"] == path
    with pytest.raises(PermissionDenied):
        bob.info("alice/i/0")


def test_chunks_of_a_published_file_cannot_be_swapped(secure: LocalCluster) -> None:
    root, bob = admin(secure), client_for(secure, BOB)
    root.write("datasets/big.bin", os.urandom(3 << 20))
    info = bob.info("datasets/big.bin")  # bob may read it, so he can learn its chunk keys
    home = bob.aio.placement.home("datasets/big.bin")

    async def swap() -> None:
        writer = bob.aio.open_writer("bob/decoy")
        writer.uid = info["version"]  # aim at the dataset's chunks
        writer.home = home
        await writer.write(os.urandom(2 << 20))
        await writer.close()

    with pytest.raises(AlreadyExists):
        bob._run(swap)
    assert bob.read("datasets/big.bin") == root.read("datasets/big.bin")


def test_admin_operations_need_an_admin_token(secure: LocalCluster) -> None:
    with pytest.raises(PermissionDenied, match="admin"):
        client_for(secure, ALICE).call_all({"op": "policy_set", "policy": "job-fair"})
    replies = admin(secure).call_all({"op": "policy_set", "policy": "job-fair"})
    assert replies[0]["policy"]["policy"] == "job-fair"


def test_cli_up_secure_and_token_issue(tmp_path: Path) -> None:
    env = {**os.environ, "IOSVC_CLUSTER": str(tmp_path / "c.json")}
    env.pop("IOSVC_TOKEN", None)

    def iosvc(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "iosvc.cli", *args],
            capture_output=True,
            text=True,
            env={**env, **(extra or {})},
            timeout=120,
        )

    up = iosvc("up", "--secure", "--servers", "2")
    assert up.returncode == 0, up.stderr
    try:
        assert "admin token" in up.stdout
        issued = iosvc(
            "token", "issue", "--job", "7", "--user", "eve", "--group", "g", "--ttl", "1h"
        )
        assert issued.returncode == 0, issued.stderr
        token = issued.stdout.strip()
        (tmp_path / "f").write_text("hi")
        ok = iosvc("put", str(tmp_path / "f"), "eve/f", extra={"IOSVC_TOKEN": token})
        assert ok.returncode == 0, ok.stderr
        denied = iosvc("put", str(tmp_path / "f"), "mallory/f", extra={"IOSVC_TOKEN": token})
        assert denied.returncode == 1 and "may write only under eve/" in denied.stderr
        anonymous = iosvc("ls", "eve")
        assert anonymous.returncode == 1 and "token" in anonymous.stderr
        status = iosvc("status", extra={"IOSVC_TOKEN": token})
        assert "secure mode" in status.stdout
    finally:
        iosvc("down")


def test_quota_set_needs_an_admin_token(secure: LocalCluster) -> None:
    with pytest.raises(PermissionDenied, match="admin"):
        client_for(secure, ALICE).call_all({"op": "quota_set", "user": "alice", "bytes": 10})
    replies = admin(secure).call_all({"op": "quota_set", "user": "alice", "bytes": 1 << 30})
    assert all(r["quotas"]["alice"] == 1 << 30 for r in replies)
    admin(secure).call_all({"op": "quota_set", "user": "alice", "bytes": None})

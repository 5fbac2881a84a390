"""The data plane: bulk reads and writes over the servers' plain-TCP data ports."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iosvc import dataplane, wire
from iosvc.client import AsyncClient, Client
from iosvc.config import ClusterSpec
from iosvc.errors import DataCorruption, InvalidArgument
from iosvc.identity import JobIdentity, issue_token, load_key_file
from iosvc.placement import Placement
from iosvc.server import LocalCluster

ID = ["job", "user", "group", 1]


def status(spec: ClusterSpec) -> list[dict[str, Any]]:
    return Client(spec).status()


def data_address(spec: ClusterSpec, server: int = 0) -> tuple[str, int]:
    port = status(spec)[server]["data_port"]
    assert isinstance(port, int)
    return spec.servers[server].rpartition(":")[0], port


class Raw:
    """A hand-driven data connection, for what a well-behaved client never sends."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, header: dict[str, Any]) -> None:
        self.send(dataplane.frame(header))

    def exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            part = self.sock.recv(n - len(out))
            if not part:
                raise EOFError("closed")
            out += part
        return out

    def reply(self) -> tuple[dict[str, Any], bytes]:
        (size,) = struct.unpack("<I", self.exact(4))
        header = msgpack.unpackb(self.exact(size))
        return header, self.exact(header.get("n", 0))

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(spec: ClusterSpec) -> Iterator[Raw]:
    conn = Raw(data_address(spec))
    yield conn
    conn.close()


def test_large_reads_go_over_the_data_port(spec: ClusterSpec, prefix: str) -> None:
    data = os.urandom(9 << 20)
    client = Client(spec, chunk_size=1 << 20)
    client.write(f"{prefix}/big", data)
    before = sum(s["data_bytes_sent"] for s in status(spec))
    assert client.read(f"{prefix}/big") == data
    assert client.read(f"{prefix}/big", 1000, 5 << 20) == data[1000 : 5 << 20]
    moved = sum(s["data_bytes_sent"] for s in status(spec)) - before
    assert moved >= len(data) + (5 << 20) - 1000  # other tests may read meanwhile

    async def into() -> bytes:
        async with AsyncClient(spec) as ac:
            info = await ac.info(f"{prefix}/big")
            buf = bytearray(len(data) + 7)
            assert await ac.read_into(info, memoryview(buf)[3:], 0) == len(data)
            return bytes(buf[3 : 3 + len(data)])

    assert asyncio.run(into()) == data


def test_reads_through_grpc_when_the_data_plane_is_off(
    spec: ClusterSpec, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOSVC_DATA_PLANE", "0")
    data = os.urandom(3 << 20)
    client = Client(spec, chunk_size=1 << 20)
    client.write(f"{prefix}/f", data)
    assert client.read(f"{prefix}/f") == data


def test_servers_without_a_data_port_are_read_through_grpc(tmp_path: Path) -> None:
    with LocalCluster(
        2, memory=64 << 20, workdir=tmp_path, server_args=["--data-port", "-1"]
    ) as cl:
        assert cl.spec is not None
        assert all(s["data_port"] is None for s in status(cl.spec))
        client = Client(cl.spec, chunk_size=1 << 20)
        data = os.urandom(5 << 20)
        client.write("f", data)
        assert client.read("f") == data


def test_a_read_request_streams_pieces_then_end(
    raw: Raw, client: Client, spec: ClusterSpec, prefix: str
) -> None:
    data = os.urandom(3 * 4096)
    path = f"{prefix}/pieces"
    Client(spec, chunk_size=4096).write(path, data)
    info = client.info(path)
    placement = Placement(len(spec.servers))
    home = placement.home(path)
    server = placement.chunk_server(home, 0)
    # the same server holds chunk 0 and, with 2 servers, chunk 2
    keys = [i for i in range(3) if placement.chunk_server(home, i) == server]
    chunks = [[f"c/{home}/{info['version']}/{i}", 0, 4096, True] for i in keys]
    chunks.append([chunks[0][0], 100, 50, False])  # a piece of chunk 0
    conn = Raw(data_address(spec, server))
    conn.request({"op": "read", "id": ID, "chunks": chunks})
    got = {}
    for _ in chunks:
        header, payload = conn.reply()
        assert header["n"] == len(payload)
        got[header["i"]] = (header, payload)
    for n, i in enumerate(keys):
        header, payload = got[n]
        assert payload == data[i * 4096 : (i + 1) * 4096]
        assert header["ck"] == info["checksums"][i]
    assert got[len(keys)][1] == data[100:150]
    assert conn.reply() == ({"end": True, "n": 0}, b"")
    # a chunk this server does not hold is NotFound, and named so
    missing = f"c/{home}/{'0' * len(info['version'])}/0"
    conn.request({"op": "read", "id": ID, "chunks": [[missing, 0, 10, True]]})
    header, _ = conn.reply()
    assert header["error"] == "NotFound" and "removed or replaced" in header["msg"]
    conn.close()


@pytest.mark.parametrize(
    "header",
    [
        {"op": "read", "chunks": [["c/0/abc/0", 0, 10, True]]},  # no identity
        {"op": "read", "id": ["j", "u", "g", 0], "chunks": []},  # zero nodes
        {"op": "read", "id": ID, "chunks": "x"},
        {"op": "read", "id": ID, "chunks": [["m/abc", 0, 10, False]]},  # metadata key
        {"op": "read", "id": ID, "chunks": [["c/0/../../etc/passwd/0", 0, 10, False]]},
        {"op": "read", "id": ID, "chunks": [["c/0/abc/0", 0, 1 << 30, False]]},  # too long
        {"op": "read", "id": ID, "chunks": [["c/0/abc/0", -1, 10, False]]},
        {"op": "read", "id": ID, "chunks": [["c/0/abc/0", 0, 10]]},
        {"op": "delete", "id": ID},  # not a data-port operation
        {"op": "call", "call": {"op": "rm", "id": ID, "paths": ["x"]}},  # not a read's
        {"op": "call", "call": {"op": "policy_set", "id": ID, "policy": "job-fair"}},
        {"op": "call", "call": 7},
        {"op": "call"},
        {"op": "call", "call": {"op": "stat", "id": ID, "paths": 5}},
        {"op": "call", "call": {"op": "stat", "paths": ["a"]}},  # no identity
    ],
)
def test_bad_requests_get_an_error_and_the_connection_keeps_serving(
    raw: Raw, header: dict[str, Any]
) -> None:
    raw.request(header)
    reply, _ = raw.reply()
    assert reply["error"] in {"InvalidArgument", "Unauthenticated"}, reply
    assert reply["msg"]
    call = header.get("call")
    if isinstance(call, dict) and call.get("op") in ("rm", "policy_set"):
        assert "not served on the data port" in reply["msg"]
    # the stream is still in step: a good request on the same connection is answered
    raw.request({"op": "read", "id": ID, "chunks": []})
    assert raw.reply()[0] == {"end": True, "n": 0}


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff" + b"x" * 10,  # header length over the limit
        (5).to_bytes(4, "little") + b"\xc1\xc1\xc1\xc1\xc1",  # invalid msgpack
        (1).to_bytes(4, "little") + msgpack.packb(7),  # header not a map
        dataplane.frame({"op": "write", "id": ID, "key": "c/0/abc/0", "ck": 1}),  # no "n"
        dataplane.frame({"op": "write", "id": ID, "key": "c/0/abc/0", "ck": 1, "n": 1 << 40}),
    ],
)
def test_malformed_frames_are_refused_and_closed(raw: Raw, data: bytes) -> None:
    raw.send(data)
    reply, _ = raw.reply()
    assert reply["error"] == "InvalidArgument"
    assert raw.closed()


def test_a_stalled_request_is_cut(tmp_path: Path) -> None:
    args = ["--stream-idle-timeout", "1"]
    with LocalCluster(1, memory=64 << 20, workdir=tmp_path, server_args=args) as cl:
        assert cl.spec is not None
        conn = Raw(data_address(cl.spec))
        conn.send(b"\x10\x00")  # half a length prefix, then nothing
        start = time.monotonic()
        assert conn.closed()
        assert time.monotonic() - start < 8
        # the server is fine
        assert Client(cl.spec).status()[0]["data_connections"] == 0
        conn.close()


def test_forged_identity_on_a_secure_cluster_is_refused(tmp_path: Path) -> None:
    with LocalCluster(1, memory=64 << 20, workdir=tmp_path, secure=True) as cl:
        assert cl.spec is not None
        admin = Client(cl.spec, token=cl.admin_token_file.read_text().strip())
        port = admin.status()[0]["data_port"]
        conn = Raw(("127.0.0.1", port))
        conn.request({"op": "read", "id": ID, "chunks": []})  # declared, not signed
        assert conn.reply()[0]["error"] == "Unauthenticated"
        alice = JobIdentity("1", "alice", "g", 1)
        bad = issue_token(os.urandom(32), alice, 3600)  # signed with another key
        conn.request({"op": "read", "id": ID, "tok": bad, "chunks": []})
        assert conn.reply()[0]["error"] == "Unauthenticated"
        good = issue_token(load_key_file(cl.key_file), alice, 3600)
        conn.request({"op": "read", "id": ID, "tok": good, "chunks": []})  # claims another
        assert conn.reply()[0]["error"] == "PermissionDenied"
        conn.request({"op": "read", "id": alice.to_wire(), "tok": good, "chunks": []})
        assert conn.reply()[0] == {"end": True, "n": 0}
        # a read's metadata operations are checked alike
        stat = {"op": "stat", "paths": ["alice/f"]}
        conn.request({"op": "call", "call": {**stat, "id": ID}})
        assert conn.reply()[0]["error"] == "Unauthenticated"
        conn.request({"op": "call", "call": {**stat, "id": ID, "tok": good}})
        assert conn.reply()[0]["error"] == "PermissionDenied"
        conn.request({"op": "call", "call": {**stat, "id": alice.to_wire(), "tok": good}})
        header, body = conn.reply()
        assert header["end"] and wire.unpack(body)[0]["recs"] == [None]
        # and so are the paths a job may read
        bob = {"op": "stat", "paths": ["bob/x"], "id": alice.to_wire(), "tok": good}
        conn.request({"op": "call", "call": bob})
        assert conn.reply()[0]["error"] == "PermissionDenied"
        conn.close()
        # and a client with a token reads over the data port
        client = Client(cl.spec, token=good)
        data = os.urandom(3 << 20)
        client.write("alice/f", data)
        assert client.read("alice/f") == data
        assert admin.status()[0]["data_bytes_sent"] >= len(data)


def test_a_reader_needs_no_grpc_when_the_cluster_file_lists_the_endpoints(
    spec: ClusterSpec, cluster_file: str, prefix: str
) -> None:
    """Metadata, listings, small and large reads all go over the data ports: a reader
    opens no gRPC channel, so the process it runs in may still fork."""
    assert len(spec.endpoints) == len(spec.servers)
    writer = Client(spec, chunk_size=1 << 20)
    big, small = os.urandom(3 << 20), os.urandom(100)
    writer.write(f"{prefix}/big", big)
    writer.write(f"{prefix}/small", small)

    async def read() -> None:
        async with AsyncClient(spec) as client:
            assert (await client.info(f"{prefix}/big"))["size"] == len(big)
            assert await client.read(f"{prefix}/big") == big
            assert await client.read_many([f"{prefix}/small", f"{prefix}/big"]) == [small, big]
            names = [f["name"] for f in await client.ls(prefix)]
            assert sorted(names) == [f"{prefix}/big", f"{prefix}/small"]
            assert isinstance(await client.info_many([f"{prefix}/none"]), list)
            assert client._channels == {}

    asyncio.run(read())
    # in a fresh process: gRPC never started, so it could fork workers that read
    code = (
        "import fsspec, iosvc.client as c\n"
        f"assert fsspec.filesystem('iosvc').cat('{prefix}/big') == open(0, 'rb').read()\n"
        "print(c.fork_safe())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=big,
        capture_output=True,
        env={**os.environ, "IOSVC_CLUSTER": cluster_file},
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == b"True"


def test_a_dead_pooled_connection_costs_a_reader_no_grpc(spec: ClusterSpec, prefix: str) -> None:
    """A pooled connection the server closed (after its idle time, or a restart) is no
    reason to ask for the port again: the next connection to it checks it."""
    data = os.urandom(3 << 20)
    Client(spec, chunk_size=1 << 20).write(f"{prefix}/f", data)

    async def read() -> None:
        async with AsyncClient(spec) as client:
            assert await client.read(f"{prefix}/f") == data
            ports = dict(client._data._ports)
            idle = [fd for fds in client._data._idle.values() for fd in fds]
            assert idle
            for fd in idle:  # as the server's idle close would
                with socket.socket(fileno=os.dup(fd)) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            assert await client.read(f"{prefix}/f") == data
            assert (await client.info(f"{prefix}/f"))["size"] == len(data)
            assert client._data._ports == ports and client._channels == {}

    asyncio.run(read())


def test_servers_that_answer_no_calls_on_their_data_port_are_asked_over_grpc(
    spec: ClusterSpec, prefix: str
) -> None:
    """Endpoints without ``calls`` (servers older than them): metadata through gRPC, chunks
    over the data port, as before."""
    older = dataclasses.replace(
        spec, endpoints=tuple({k: v for k, v in e.items() if k != "calls"} for e in spec.endpoints)
    )
    data = os.urandom(3 << 20)
    Client(spec, chunk_size=1 << 20).write(f"{prefix}/f", data)

    async def read() -> None:
        async with AsyncClient(older) as client:
            assert await client.read(f"{prefix}/f") == data
            assert client._channels  # the stat went through gRPC

    asyncio.run(read())


@pytest.mark.parametrize("data_plane", ["1", "0"])
def test_a_batch_of_small_files_larger_than_a_message_is_read_whole(
    tmp_path: Path, data_plane: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_small inlines up to half a message of files; the others are read by chunks
    (a batch over the message limit failed whole, over gRPC as over the data port)."""
    monkeypatch.setenv("IOSVC_DATA_PLANE", data_plane)
    with LocalCluster(1, memory=160 << 20, workdir=tmp_path) as cl:
        assert cl.spec is not None
        client = Client(cl.spec)
        files = {f"s/{i}": os.urandom((2 << 20) - 64 - i) for i in range(40)}  # 80 MiB
        client.write_many(files)
        assert client.read_many(list(files)) == list(files.values())


def test_a_client_of_a_stale_cluster_file_asks_the_restarted_server(tmp_path: Path) -> None:
    """A restarted server has a new data port and instance, which the cluster writes into
    its cluster file: a client made from the file before the restart finds them there (no
    gRPC); one given the old endpoints otherwise fails its hello and asks the server."""
    cluster_file = tmp_path / "cluster.json"
    with LocalCluster(
        2, directory=tmp_path / "d", workdir=tmp_path / "w", cluster_file=cluster_file
    ) as cl:
        assert cl.spec is not None
        old = cl.spec
        data = os.urandom(3 << 20)  # chunks on both servers
        Client(old, chunk_size=1 << 20).write("f", data)
        from_file = Client(cluster_file)
        cl.kill(1)
        cl.restart(1)  # its data back from disk, on a new data port
        assert cl.spec.endpoints[1]["instance"] != old.endpoints[1]["instance"]
        assert ClusterSpec.load(cluster_file).endpoints == cl.spec.endpoints
        stale = Client(old)
        assert stale.aio._data._ports[1] == (
            old.endpoints[1]["data_port"],
            old.endpoints[1]["instance"],
        )
        assert stale.read("f") == data
        fresh = cl.spec.endpoints[1]
        assert stale.aio._data._ports[1] == (fresh["data_port"], fresh["instance"])
        assert stale.aio._channels  # asked over gRPC
        assert from_file.read("f") == data
        assert from_file.aio._data._ports[1] == (fresh["data_port"], fresh["instance"])
        assert from_file.aio._channels == {}


def test_reads_survive_a_server_restart(tmp_path: Path) -> None:
    """Pooled connections to a restarted server are dead and its data port is new: the
    client notices, asks the port again and reads."""
    with LocalCluster(2, directory=tmp_path / "d", workdir=tmp_path) as cl:
        assert cl.spec is not None
        data = os.urandom(6 << 20)

        async def go() -> None:
            async with AsyncClient(cl.spec, chunk_size=1 << 20) as client:
                await client.write("f", data)
                assert await client.read("f") == data
                cl.kill(1)
                cl.restart(1)  # its data port is bound anew
                assert await client.read("f") == data

        asyncio.run(go())


def test_a_corrupt_payload_is_caught_and_the_connection_dropped(
    spec: ClusterSpec, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client checks every whole chunk it receives over the data port."""
    data = os.urandom(2 << 20)
    client = Client(spec, chunk_size=1 << 20)
    client.write(f"{prefix}/c", data)
    real = dataplane.recv_exact

    async def flip(loop: Any, sock: socket.socket, view: memoryview) -> None:
        await real(loop, sock, view)
        if view.nbytes > 4096:
            view[100] ^= 0xFF

    monkeypatch.setattr(dataplane, "recv_exact", flip)
    with pytest.raises(DataCorruption, match="checksum"):
        client.read(f"{prefix}/c")
    monkeypatch.setattr(dataplane, "recv_exact", real)
    assert client.read(f"{prefix}/c") == data


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    junk=st.one_of(
        st.binary(max_size=64),
        st.builds(  # a well-framed header of random msgpack
            lambda obj: dataplane.frame(obj) if isinstance(obj, dict) else msgpack.packb(obj),
            st.recursive(
                st.none()
                | st.integers(-(2**63), 2**64 - 1)
                | st.text(max_size=8)
                | st.binary(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4)
                ),
                max_leaves=12,
            ),
        ),
    )
)
def test_any_bytes_on_the_data_port_leave_the_server_serving(
    spec: ClusterSpec, junk: bytes
) -> None:
    conn = Raw(data_address(spec))
    conn.sock.settimeout(0.5)
    conn.send(junk)
    try:  # an error frame, or nothing yet (a frame still incomplete), or a close
        header, _ = conn.reply()
        assert "error" in header or header == {"end": True, "n": 0}
    except (TimeoutError, EOFError, ConnectionResetError):
        pass
    conn.close()
    good = Raw(data_address(spec))
    good.request({"op": "read", "id": ID, "chunks": []})
    assert good.reply()[0] == {"end": True, "n": 0}
    good.close()


# ------------------------------------------------------------------------------ writes
def test_writes_go_over_the_data_port(spec: ClusterSpec, prefix: str) -> None:
    data = os.urandom(9 << 20)
    client = Client(spec, chunk_size=1 << 20)
    before = sum(s["data_bytes_received"] for s in status(spec))
    client.write(f"{prefix}/w", data)
    assert sum(s["data_bytes_received"] for s in status(spec)) - before >= len(data)
    assert client.read(f"{prefix}/w") == data
    # and the same through gRPC only
    os.environ["IOSVC_DATA_PLANE"] = "0"
    try:
        grpc_only = Client(spec, chunk_size=1 << 20)
    finally:
        del os.environ["IOSVC_DATA_PLANE"]
    grpc_only.write(f"{prefix}/g", data[::-1])
    assert client.read(f"{prefix}/g") == data[::-1]


def _chunk_frame(key: str, payload: bytes, ck: int | None = None, **auth: Any) -> bytes:
    header = {"op": "write", "id": ID, "key": key, "n": len(payload), **auth}
    header["ck"] = xxhash.xxh3_64_intdigest(payload) if ck is None else ck
    return dataplane.frame(header) + payload


def test_a_refused_chunk_fails_its_segment_and_the_connection_keeps_serving(
    raw: Raw, spec: ClusterSpec
) -> None:
    uid = uuid.uuid4().hex
    good, bad = os.urandom(5000), os.urandom(7000)
    raw.send(_chunk_frame(f"c/0/{uid}/0", good))
    raw.send(_chunk_frame(f"c/0/{uid}/1", bad, ck=12345))  # wrong checksum
    raw.send(_chunk_frame(f"c/0/{uid}/2", good))  # after the failure: read and dropped
    raw.request({"op": "flush"})
    reply, _ = raw.reply()
    assert reply["chunks"] == 1 and reply["bytes"] == len(good)
    assert reply["failed"][0] == "DataCorruption" and "checksum" in reply["failed"][1]
    for bad_key in ["m/abc", "c/0/../../x/0"]:  # refused before any byte is stored
        raw.send(_chunk_frame(bad_key, good))
        raw.request({"op": "flush"})
        reply, _ = raw.reply()
        assert reply["chunks"] == 0 and reply["failed"][0] == "InvalidArgument", reply
    raw.send(_chunk_frame(f"c/0/{uid}/3", good))
    raw.request({"op": "flush"})
    assert raw.reply()[0] == {"end": True, "n": 0, "chunks": 1, "bytes": len(good)}


def test_a_corrupted_write_raises_and_commits_nothing(
    spec: ClusterSpec, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(spec, chunk_size=1 << 20)
    real = dataplane.send_frame

    async def flip(loop: Any, sock: socket.socket, head: bytes, payload: Any = b"") -> None:
        if len(payload) > 4096:
            payload = bytearray(payload)
            payload[7] ^= 0xFF
        await real(loop, sock, head, payload)

    monkeypatch.setattr(dataplane, "send_frame", flip)
    with pytest.raises(DataCorruption, match="checksum"):
        client.write(f"{prefix}/corrupt", os.urandom(3 << 20))
    monkeypatch.setattr(dataplane, "send_frame", real)
    assert not client.exists(f"{prefix}/corrupt")


def test_a_stalled_write_is_cut_and_nothing_is_committed(tmp_path: Path) -> None:
    args = ["--stream-idle-timeout", "1"]
    with LocalCluster(1, memory=64 << 20, workdir=tmp_path, server_args=args) as cl:
        assert cl.spec is not None
        conn = Raw(data_address(cl.spec))
        payload = os.urandom(1000)
        conn.send(_chunk_frame(f"c/0/{uuid.uuid4().hex}/0", payload)[:-500])  # half a chunk
        start = time.monotonic()
        assert conn.closed()
        assert time.monotonic() - start < 8
        conn.close()
        assert Client(cl.spec).status()[0]["data_bytes_received"] == 0


def test_writes_need_a_valid_token_on_a_secure_cluster(tmp_path: Path) -> None:
    with LocalCluster(1, memory=64 << 20, workdir=tmp_path, secure=True) as cl:
        assert cl.spec is not None
        admin = Client(cl.spec, token=cl.admin_token_file.read_text().strip())
        conn = Raw(("127.0.0.1", admin.status()[0]["data_port"]))
        conn.send(_chunk_frame(f"c/0/{uuid.uuid4().hex}/0", b"x" * 100))  # declared only
        conn.request({"op": "flush"})
        reply, _ = conn.reply()
        assert reply["chunks"] == 0 and reply["failed"][0] == "Unauthenticated"
        conn.close()
        assert admin.status()[0]["used"] == 0


def test_hello_names_the_server_instance_a_client_asked_for(raw: Raw, spec: ClusterSpec) -> None:
    """A port number a restarted server left may belong to another process since: clients
    say which instance they expect, and any other one refuses and closes."""

    async def endpoints() -> dict[str, Any]:
        async with AsyncClient(spec) as ac:
            reply, _ = await ac.call(0, {"op": "endpoints"})
            return reply

    instance = asyncio.run(endpoints())["instance"]
    raw.request({"op": "hello", "to": instance})
    assert raw.reply()[0] == {"end": True, "n": 0}
    raw.request({"op": "read", "id": ID, "chunks": []})  # and the connection serves on
    assert raw.reply()[0] == {"end": True, "n": 0}
    other = Raw(data_address(spec))
    other.request({"op": "hello", "to": "0" * 32})
    reply, _ = other.reply()
    assert reply["error"] == "Unavailable" and "restarted" in reply["msg"]
    assert other.closed()
    other.close()


def test_chunks_of_a_dropped_version_are_refused(raw: Raw, spec: ClusterSpec) -> None:
    """An aborted writer's chunk still on its way (received on a data connection after the
    abort's drop went over gRPC) is refused, not stored as an orphan."""
    uid = uuid.uuid4().hex

    async def drop() -> None:
        async with AsyncClient(spec) as ac:
            await ac.call(0, {"op": "drop", "uids": [uid]})

    asyncio.run(drop())
    key = f"c/0/{uid}/0"
    raw.send(_chunk_frame(key, os.urandom(4096)))
    raw.request({"op": "flush"})
    reply, _ = raw.reply()
    assert reply["chunks"] == 0 and reply["failed"][0] == "Cancelled", reply
    raw.request({"op": "read", "id": ID, "chunks": [[key, 0, 4096, True]]})
    assert raw.reply()[0]["error"] == "NotFound"  # nothing was stored


def test_concurrent_first_reads_ask_each_server_for_its_port_once(
    spec: ClusterSpec, prefix: str
) -> None:
    """A worker's first reads start together: one ``endpoints`` call per server, not one
    per read, and a caller cancelled meanwhile does not cancel the others' answer (where
    the cluster file does not list the endpoints)."""
    client = AsyncClient(dataclasses.replace(spec, endpoints=()))
    asked: list[int] = []
    ask = client._data._ask_port

    async def counted(server: int) -> Any:
        asked.append(server)
        await asyncio.sleep(0.05)  # every caller arrives while it is being asked
        return await ask(server)

    client._data._ask_port = counted

    async def main() -> list[Any]:
        cancelled = asyncio.ensure_future(client._data.port(0))
        waiting = [asyncio.ensure_future(client._data.port(s)) for s in (0, 1, 0, 1, 0)]
        await asyncio.sleep(0.01)
        cancelled.cancel()
        got = await asyncio.gather(*waiting)
        again = await client._data.port(1)  # answered: not asked again
        await client.close()
        return [*got, again]

    got = asyncio.run(main())
    assert sorted(asked) == [0, 1]
    assert got[0] == got[2] == got[4] and got[1] == got[3] == got[5]
    assert all(isinstance(port, tuple) for port in got)


# ----------------------------------------------------------------- buffered frame reader
def _frames(headers: list[dict[str, Any]], payloads: list[bytes]) -> bytes:
    return b"".join(dataplane.frame(h) + p for h, p in zip(headers, payloads, strict=True))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40_000), min_size=1, max_size=8),
    pieces=st.integers(1, 50_000),
    buffer=st.sampled_from([64, 4096, 16 * 1024]),
)
def test_frame_reader_parses_frames_however_the_bytes_arrive(
    sizes: list[int], pieces: int, buffer: int
) -> None:
    """Headers and payloads come out whole and in order whether the stream arrives in one
    piece or a few bytes at a time, with headers larger than the buffer too."""
    payloads = [os.urandom(n) for n in sizes]
    headers = [{"i": k, "n": n, "pad": "x" * (k * 30)} for k, n in enumerate(sizes)]
    stream = _frames(headers, payloads)

    async def run() -> list[tuple[dict[str, Any], bytes]]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)

        async def send() -> None:
            for at in range(0, len(stream), pieces):
                await loop.sock_sendall(b, stream[at : at + pieces])
                await asyncio.sleep(0)

        sender = asyncio.ensure_future(send())
        reader = dataplane.FrameReader(loop, a, buffer)
        got = []
        for _ in sizes:
            header = await reader.header()
            view = memoryview(bytearray(header["n"]))
            await reader.into(view)
            got.append((header, bytes(view)))
        await sender
        assert reader.buffered == 0
        a.close()
        b.close()
        return got

    got = asyncio.run(run())
    assert [h for h, _ in got] == headers
    assert [p for _, p in got] == payloads


def test_frame_reader_names_a_connection_closed_mid_frame() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        whole = dataplane.frame({"i": 0, "n": 10})
        b.sendall(whole + b"12345")  # the payload cut short
        b.close()
        reader = dataplane.FrameReader(loop, a)
        header = await reader.header()
        with pytest.raises(dataplane.FrameError, match="closed"):
            await reader.into(memoryview(bytearray(header["n"])))
        a.close()

    asyncio.run(run())


def test_frame_reader_refuses_an_oversized_header() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.sendall(struct.pack("<I", 100) + b"\x80" * 100)
        reader = dataplane.FrameReader(loop, a)
        with pytest.raises(InvalidArgument, match="over 50"):
            await reader.header(limit=50)
        a.close()
        b.close()

    asyncio.run(run())


def test_numeric_hosts_connect_without_a_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A numeric address is connected to at once (asyncio's lookup runs in a thread pool
    that a worker's first read would start); a name is still looked up."""
    from iosvc.client import _dataplane

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    looked_up: list[str] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        lookup = loop.getaddrinfo

        async def counted(host: str, *args: Any, **kwargs: Any) -> Any:
            looked_up.append(host)
            return await lookup(host, *args, **kwargs)

        monkeypatch.setattr(loop, "getaddrinfo", counted)
        for host in ("127.0.0.1", "localhost"):
            sock = await _dataplane._connect(loop, host, port)
            assert sock.getpeername()[1] == port
            sock.close()

    asyncio.run(run())
    listener.close()
    assert looked_up == ["localhost"]


def test_frame_reader_offers_an_emptied_buffer_whole() -> None:
    """Once everything buffered is handed out, the next recv may fill the whole buffer (a
    run of replies is then one recv, not two)."""

    async def run() -> list[int]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        offered: list[int] = []
        recv_into = loop.sock_recv_into

        async def spy(sock: socket.socket, buf: Any) -> int:
            offered.append(len(buf))
            return await recv_into(sock, buf)

        loop.sock_recv_into = spy  # type: ignore[method-assign]
        reader = dataplane.FrameReader(loop, a, 4096)
        run_of = b"".join(dataplane.frame({"i": k, "path": "p" * 60, "n": 0}) for k in range(30))
        for _ in range(3):
            b.sendall(run_of)
            for _ in range(30):
                await reader.header()
        a.close()
        b.close()
        return offered

    offered = asyncio.run(run())
    assert offered and set(offered) == {4096}


@pytest.mark.parametrize("extra", [b"", b"\x01\x02"])
def test_a_connection_goes_back_to_the_pool_only_when_nothing_follows_the_end(
    extra: bytes,
) -> None:
    """Bytes after a read's last frame would be read as the next request's replies: such a
    connection is closed, not pooled."""
    from iosvc.client import _dataplane

    async def run() -> tuple[list[bytes], int]:
        mine, theirs = socket.socketpair()
        mine.setblocking(False)

        async def never(server: int) -> None:
            return None

        pool = _dataplane.DataConnections(("127.0.0.1:1",), never)
        replies = (
            dataplane.frame({"i": 0, "n": 3})
            + b"abc"
            + dataplane.frame({"end": True, "n": 0})
            + extra
        )
        theirs.sendall(replies)
        got = []
        frames = _dataplane.read_frames(pool, 0, mine, {"chunks": []}, lambda h: None)
        async for _, payload, _ in frames:
            got.append(bytes(payload))
        pooled = len(pool._idle.get(0, []))
        pool.reset()
        theirs.close()
        return got, pooled

    got, pooled = asyncio.run(run())
    assert got == [b"abc"]
    assert pooled == (0 if extra else 1)

"""End-to-end behaviour of the clients against a real 2-server cluster."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from iosvc.client import AsyncClient, Client
from iosvc.config import ClusterSpec
from iosvc.errors import DataCorruption, InvalidArgument, IsADirectory, NotFound, Unavailable
from iosvc.server import LocalCluster

CS = 64 * 1024  # small chunks so multi-chunk striping is exercised with little data


@pytest.fixture
def small_chunks(spec: ClusterSpec) -> Client:
    return Client(spec, chunk_size=CS)


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 5 * CS + 17])
def test_roundtrip_sizes(small_chunks: Client, prefix: str, size: int) -> None:
    data = os.urandom(size)
    small_chunks.write(f"{prefix}/f", data)
    assert small_chunks.read(f"{prefix}/f") == data
    info = small_chunks.info(f"{prefix}/f")
    assert info["type"] == "file" and info["size"] == size
    assert len(info["checksums"]) == -(-size // CS)


def test_chunks_are_striped_over_every_server(small_chunks: Client, prefix: str) -> None:
    before = [s["used"] for s in small_chunks.status()]
    small_chunks.write(f"{prefix}/striped", os.urandom(8 * CS))
    after = [s["used"] for s in small_chunks.status()]
    # 8 chunks round-robin over 2 servers: 4 chunks (plus checksum trailers) on each.
    assert [a - b >= 4 * CS for a, b in zip(after, before, strict=True)] == [True, True]


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 10), (CS - 5, CS + 5), (3 * CS, 4 * CS), (10, None), (-100, None), (0, -1), (7, 7)],
)
def test_range_reads(small_chunks: Client, prefix: str, start: int, end: int | None) -> None:
    data = os.urandom(4 * CS + 100)
    small_chunks.write(f"{prefix}/r", data)
    assert small_chunks.read(f"{prefix}/r", start, end) == data[start:end]


def test_read_into_reused_buffer(small_chunks: Client, prefix: str) -> None:
    data = os.urandom(3 * CS + 11)
    small_chunks.write(f"{prefix}/big", data)

    async def go() -> bytes:
        aio = AsyncClient(small_chunks.spec)
        info = await aio.info(f"{prefix}/big")
        window = bytearray(CS + 3)
        out = bytearray()
        for start in range(0, info["size"], len(window)):
            n = await aio.read_into(info, window, start)
            out += window[:n]
        return bytes(out)

    assert asyncio.run(go()) == data


def test_batched_small_files(client: Client, prefix: str) -> None:
    files = {f"{prefix}/s/{i:04d}": os.urandom(i % 5000) for i in range(600)}
    client.write_many(files)
    paths = list(files)
    results = client.read_many([*paths, f"{prefix}/s/missing"])
    assert results[:-1] == [files[p] for p in paths]
    assert isinstance(results[-1], NotFound)
    assert len(client.ls(f"{prefix}/s")) == 600


def test_read_many_mixes_small_and_multi_chunk_files(small_chunks: Client, prefix: str) -> None:
    big = os.urandom(3 * CS)
    small_chunks.write(f"{prefix}/big", big)
    small_chunks.write(f"{prefix}/small", b"tiny")
    assert small_chunks.read_many([f"{prefix}/small", f"{prefix}/big"]) == [b"tiny", big]


def test_a_whole_small_file_is_read_in_one_call(
    small_chunks: Client, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-file read asks the file's home server once: a single-chunk file comes back
    inline, a larger one's record comes back instead of a separate stat."""
    small_chunks.write(f"{prefix}/small", b"tiny")
    big = os.urandom(3 * CS + 5)
    small_chunks.write(f"{prefix}/big", big)
    ops: list[str] = []
    call = small_chunks.aio.call

    async def counted(server: int, header: dict[str, Any], payload: Any = b"") -> Any:
        ops.append(header["op"])
        return await call(server, header, payload)

    monkeypatch.setattr(small_chunks.aio, "call", counted)
    assert small_chunks.read(f"{prefix}/small") == b"tiny"
    assert ops == ["read_small"]
    ops.clear()
    assert small_chunks.read(f"{prefix}/big") == big
    assert "stat" not in ops and ops[0] == "read_small"
    # Ranges still read just their bytes; missing files and directories keep their errors
    # (a directory's files may all live on other servers than its name's home).
    assert small_chunks.read(f"{prefix}/big", 7, CS + 9) == big[7 : CS + 9]
    with pytest.raises(NotFound):
        small_chunks.read(f"{prefix}/missing")
    with pytest.raises(IsADirectory):
        small_chunks.read(prefix)
    # A directory whose only file is homed on another server than the directory's name:
    # its home server does not know it (read_small says NotFound); the fallback asks all.
    home = small_chunks.aio.placement.home
    name = next(
        f"{prefix}/d{i}" for i in range(100) if home(f"{prefix}/d{i}") != home(f"{prefix}/d{i}/f")
    )
    small_chunks.write(f"{name}/f", b"x")
    with pytest.raises(IsADirectory):
        small_chunks.read(name)


def test_ls_info_dirs_and_rm(client: Client, prefix: str) -> None:
    client.write_many({f"{prefix}/a/x": b"1", f"{prefix}/a/b/y": b"22", f"{prefix}/c": b"333"})
    names = {(e["name"], e["type"]) for e in client.ls(prefix)}
    assert names == {(f"{prefix}/a", "directory"), (f"{prefix}/c", "file")}
    assert client.info(f"{prefix}/a")["type"] == "directory"
    assert client.ls(f"{prefix}/c") == [client.info(f"{prefix}/c")]
    deep = [e["name"] for e in client.ls(prefix, recursive=True)]
    assert deep == [f"{prefix}/a/b/y", f"{prefix}/a/x", f"{prefix}/c"]
    client.rm(f"{prefix}/a", recursive=True)
    assert not client.exists(f"{prefix}/a")
    assert client.exists(f"{prefix}/c")
    with pytest.raises(NotFound):
        client.ls(f"{prefix}/nothing")
    with pytest.raises(NotFound):
        client.rm(f"{prefix}/nothing")


def test_info_many_answers_each_path_in_order(client: Client, prefix: str) -> None:
    files = {f"{prefix}/f{i}": bytes(i) for i in range(40)}  # homed on both servers
    client.write_many(files)
    client.write(f"{prefix}/big", os.urandom(5 << 20))
    paths = [f"{prefix}/big", *files, f"{prefix}/gone", prefix]
    got = client.info_many(paths)
    assert got[: len(paths) - 2] == [client.info(p) for p in paths[:-2]]
    assert isinstance(got[-2], NotFound)
    assert got[-1] == {"name": prefix, "size": 0, "type": "directory"}  # implied by files
    assert client.info_many([]) == []
    # Errors are each path's own: the root, a malformed path, batches of > 256 paths.
    many = [*files, "bad/../path", "/", *[f"{prefix}/none{i}" for i in range(300)]]
    got = client.info_many(many)
    assert got[:40] == [client.info(p) for p in files]
    assert isinstance(got[40], InvalidArgument) and got[41]["type"] == "directory"
    missing = got[42:]
    assert all(isinstance(e, NotFound) for e in missing) and len({id(e) for e in missing}) == 300


def test_info_many_with_a_server_down_answers_the_others(fresh_cluster: LocalCluster) -> None:
    assert fresh_cluster.spec is not None
    client = Client(fresh_cluster.spec, retries=1, timeout=5)
    paths = [f"d/f{i}" for i in range(20)]
    client.write_many({p: b"x" for p in paths})
    fresh_cluster.kill(1, signal.SIGKILL)
    got = client.info_many(paths)
    homes = [client.aio.placement.home(p) for p in paths]
    assert set(homes) == {0, 1}
    for path, home, entry in zip(paths, homes, got, strict=True):
        if home == 0:
            assert isinstance(entry, dict) and entry["name"] == path
        else:
            assert isinstance(entry, Unavailable)
    down = [e for h, e in zip(homes, got, strict=True) if h == 1]
    assert len({id(e) for e in down}) == len(down)  # raised later one by one, each its own


def test_read_files_with_a_server_down_fails_each_file_once(
    fresh_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files read together whose shared request cannot be served get the failure each (their
    own exception objects), without each being retried on its own."""
    from iosvc.client import AsyncClient

    assert fresh_cluster.spec is not None
    client = Client(fresh_cluster.spec, retries=2, timeout=5, chunk_size=64 * 1024)
    files = {f"rf/f{i}": os.urandom(200_000 + i) for i in range(3)}  # chunks on both servers
    client.write_many(files)
    infos = client.info_many(list(files))
    got = client._run(client.aio.read_files, infos, bytearray)
    assert [bytes(v) for v in got] == list(files.values())  # type: ignore[arg-type]
    fetches: list[int] = []
    fetch_many = AsyncClient._fetch_many

    async def counted(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
        fetches.append(len(args[0]))
        return await fetch_many(self, *args, **kwargs)

    monkeypatch.setattr(AsyncClient, "_fetch_many", counted)
    fresh_cluster.kill(1, signal.SIGKILL)
    got = client._run(client.aio.read_files, infos, bytearray)
    assert all(isinstance(e, Unavailable) for e in got)
    assert len({id(e) for e in got}) == len(got)
    assert fetches == [3]  # one attempt for the three, none file by file


def test_mkdir_marker_lists_empty_directory(client: Client, prefix: str) -> None:
    client.mkdir(f"{prefix}/empty")
    assert client.info(f"{prefix}/empty")["type"] == "directory"
    assert client.ls(prefix) == [{"name": f"{prefix}/empty", "size": 0, "type": "directory"}]
    with pytest.raises(IsADirectory):
        client.read(f"{prefix}/empty")


def test_missing_file_is_file_not_found(client: Client, prefix: str) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        client.read(f"{prefix}/missing")


def test_writer_invisible_until_close(spec: ClusterSpec, prefix: str) -> None:
    async def go() -> None:
        aio = AsyncClient(spec, chunk_size=CS)
        writer = aio.open_writer(f"{prefix}/w")
        await writer.write(os.urandom(3 * CS))
        with pytest.raises(NotFound):  # reading a file still being written
            await aio.read(f"{prefix}/w")
        await writer.write(b"tail")
        await writer.close()
        assert (await aio.info(f"{prefix}/w"))["size"] == 3 * CS + 4

    asyncio.run(go())


def test_aborted_writer_leaves_nothing_and_frees_chunks(spec: ClusterSpec, prefix: str) -> None:
    async def go() -> None:
        aio = AsyncClient(spec, chunk_size=CS)
        writer = aio.open_writer(f"{prefix}/gone")
        await writer.write(os.urandom(6 * CS))
        await writer.abort()
        assert not await aio.exists(f"{prefix}/gone")
        # Every chunk it sent is gone (checked chunk by chunk: the servers' byte counts also
        # move with other tests' versions freed after their grace period).
        version = {
            "name": f"{prefix}/gone",
            "size": 6 * CS,
            "chunk_size": CS,
            "version": writer.uid,
            "checksums": [0] * 6,
        }
        for i in range(6):
            with pytest.raises(NotFound):
                await aio.read_version(version, i * CS, (i + 1) * CS)

    asyncio.run(go())


def test_rewrite_replaces_atomically_and_frees_old_version(client: Client, prefix: str) -> None:
    client.write(f"{prefix}/v", os.urandom(3 << 20))
    used = sum(s["used"] for s in client.status())
    new = os.urandom(3 << 20)
    client.write(f"{prefix}/v", new)
    assert client.read(f"{prefix}/v") == new
    deadline = asyncio.run(_settle(client, used))
    assert deadline, "old version's chunks were not freed"


async def _settle(client: Client, used: int) -> bool:
    for _ in range(300):  # the old version is dropped after the servers' grace (5 s)
        if sum(s["used"] for s in await client.aio.status()) <= used + 1024:
            return True
        await asyncio.sleep(0.05)
    return False


def test_two_writers_last_close_wins_never_mixed(spec: ClusterSpec, prefix: str) -> None:
    a_data, b_data = b"A" * (5 * CS), b"B" * (5 * CS)

    async def go() -> bytes:
        aio = AsyncClient(spec, chunk_size=CS)
        a = aio.open_writer(f"{prefix}/same")
        b = aio.open_writer(f"{prefix}/same")
        for i in range(5):  # interleave their chunks
            await a.write(a_data[i * CS : (i + 1) * CS])
            await b.write(b_data[i * CS : (i + 1) * CS])
        await b.close()
        await a.close()  # closes last: wins
        return await aio.read(f"{prefix}/same")

    assert asyncio.run(go()) == a_data


def test_open_version_survives_concurrent_rewrite(small_chunks: Client, prefix: str) -> None:
    old = os.urandom(4 * CS)
    small_chunks.write(f"{prefix}/x", old)
    info = small_chunks.info(f"{prefix}/x")
    small_chunks.write(f"{prefix}/x", b"new")
    # the replaced version stays readable for the servers' drop grace (5 s by default)
    assert small_chunks._run(small_chunks.aio.read_version, info) == old
    assert small_chunks.read(f"{prefix}/x") == b"new"


def test_file_cannot_replace_a_directory_marker(client: Client, prefix: str) -> None:
    client.mkdir(f"{prefix}/d")
    with pytest.raises(IsADirectory):
        client.write(f"{prefix}/d", b"x")
    with pytest.raises(IsADirectory):
        client.write(f"{prefix}/d", os.urandom(3 << 20))
    assert client.info(f"{prefix}/d")["type"] == "directory"


def test_corrupt_chunk_detected_by_checksum(client: Client, prefix: str) -> None:
    client.write(f"{prefix}/c", b"x" * 100)
    info = client.info(f"{prefix}/c")
    info["checksums"] = [info["checksums"][0] ^ 1]  # what a flipped bit would look like
    with pytest.raises(DataCorruption, match="checksum"):
        client._run(client.aio.read_version, info)


@pytest.mark.parametrize(
    "bad", ["a/../b", "../etc/passwd", "a//b", "a/./b", "a\x00b", "x" * 300, "a/" * 2100, ""]
)
def test_bad_paths_rejected_before_io(client: Client, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        client.write(bad, b"data")


def test_absolute_and_url_paths_name_the_same_file(client: Client, prefix: str) -> None:
    client.write(f"/{prefix}/abs", b"1")
    assert client.read(f"iosvc://{prefix}/abs") == b"1"
    assert client.read(f"{prefix}/abs/") == b"1"


def test_identity_travels_with_every_commit(spec: ClusterSpec, prefix: str) -> None:
    from iosvc.identity import JobIdentity

    who = JobIdentity("job-77", "alice", "climate", 4)
    c = Client(spec, identity=who)
    c.write(f"{prefix}/owned", b"x")
    assert c.info(f"{prefix}/owned")["owner"] == ["job-77", "alice", "climate", 4]


def _in_forked_child(client: Client, prefix: str) -> object:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        try:
            client.write(f"{prefix}/child", b"from child")
            queue.put(client.read(f"{prefix}/child"))
        except BaseException as exc:  # report, do not hang the parent
            queue.put(exc)

    proc = ctx.Process(target=child)
    proc.start()
    got = queue.get(timeout=60)
    proc.join(60)
    return got


def test_client_made_before_fork_works_in_child(spec: ClusterSpec, prefix: str) -> None:
    """DataLoader workers fork after the dataset made its client (but before any I/O)."""
    import subprocess
    import sys

    # A fresh interpreter: this test process has used gRPC already.
    code = f"""
import multiprocessing as mp
from iosvc.client import Client
from iosvc.config import ClusterSpec
client = Client(ClusterSpec.from_dict({spec.to_dict()!r}))
def child(q):
    client.write("{prefix}/forked", b"made before fork")
    q.put(client.read("{prefix}/forked"))
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
print(q.get(timeout=60))
p.join(60)
print(client.read("{prefix}/forked"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["b'made", "before", "fork'"] * 2, out.stderr


def test_fork_safe_says_when_workers_must_not_fork(spec: ClusterSpec, prefix: str) -> None:
    """``fork_safe`` (what the DataLoader asks) turns False with the first gRPC channel."""
    import subprocess
    import sys

    code = f"""
import iosvc.client
from dataloaders._loader import grpc_used_before_fork
from iosvc.config import ClusterSpec
url = "iosvc:///{prefix}/x"
print(iosvc.client.fork_safe(), grpc_used_before_fork(url))
client = iosvc.client.Client(ClusterSpec.from_dict({spec.to_dict()!r}))
print(iosvc.client.fork_safe(), grpc_used_before_fork(url))
client.read("{prefix}/read")  # over the data ports: no gRPC
print(iosvc.client.fork_safe(), grpc_used_before_fork(url))
client.write("{prefix}/x", b"x")
print(iosvc.client.fork_safe(), grpc_used_before_fork(url), grpc_used_before_fork("/tmp/x"))
"""
    Client(spec).write(f"{prefix}/read", b"r")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert lines == ["True False", "True False", "True False", "False True False"], out.stderr


def test_fork_after_grpc_use_fails_clearly_instead_of_hanging(client: Client, prefix: str) -> None:
    from iosvc.errors import ForkedAfterGrpc

    client.write(f"{prefix}/parent", b"from parent")  # gRPC now runs in this process
    got = _in_forked_child(client, prefix)
    assert isinstance(got, ForkedAfterGrpc) and "forkserver" in str(got)
    assert client.read(f"{prefix}/parent") == b"from parent"  # the parent still works


def test_cluster_files_round_trip_and_bad_ones_are_named(tmp_path: Path) -> None:
    endpoints = ({"data_port": 4001, "instance": "a", "in_place_host": None},) * 2
    spec = ClusterSpec(servers=("h:1", "h:2"), endpoints=endpoints, extra={"workdir": "/w"})
    assert ClusterSpec.load(spec.save(tmp_path / "c.json")) == spec
    assert "endpoints" not in ClusterSpec(servers=("h:1",)).to_dict()  # as older files
    with pytest.raises(NotFound, match="iosvc up"):
        ClusterSpec.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        ClusterSpec.load(tmp_path / "bad.json")
    for data in (
        {"servers": ["h:1", "h:2"], "endpoints": [{}]},  # one per server
        {"servers": ["h:1"], "endpoints": [7]},
        {"servers": ["h:1"], "endpoints": {"data_port": 1}},
        {"servers": ["h"]},
        {},
    ):
        with pytest.raises(InvalidArgument):
            ClusterSpec.from_dict(data)

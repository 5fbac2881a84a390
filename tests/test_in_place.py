"""Reads in place: same-host clients read chunk files themselves after the server admits them.

Real servers on local-disk stores (``--dir``), real files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_dataloaders.helpers import needs_collapse, tmpfs

from dataloaders._huge import HUGE_PAGE, huge_bytes, tmpfs_huge_pages
from iosvc import wire
from iosvc.client import Client
from iosvc.client._mapped import MappedFile
from iosvc.errors import DataCorruption, NotFound, QuotaExceeded
from iosvc.identity import JobIdentity
from iosvc.server import LocalCluster, _stores
from iosvc.server._stores import LocalDirStore

MiB = 1 << 20


@pytest.fixture(scope="module")
def disk_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("in-place")
    with LocalCluster(2, directory=root / "data", workdir=root / "work") as cluster:
        # The tests below count chunks of 1 MiB: what clients of this spec write.
        assert cluster.spec is not None
        cluster.spec = dataclasses.replace(cluster.spec, chunk_size=MiB)
        yield cluster


def _in_place(client: Client) -> int:
    return sum(s["in_place_reads"] for s in client.status())


def test_same_host_reads_go_in_place_and_match(
    disk_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert disk_cluster.spec is not None
    who = JobIdentity("77", "ann", "g", 2)
    client = Client(disk_cluster.spec, identity=who)
    data = os.urandom(5 * MiB + 123)
    client.write("ip/data", data)
    before = _in_place(client)
    assert client.read("ip/data") == data
    assert client.read("ip/data", 1000, 3 * MiB + 7) == data[1000 : 3 * MiB + 7]
    info = client.info("ip/data")
    buffer = bytearray(len(data))
    assert client._run(client.aio.read_into, info, buffer) == len(data)
    assert bytes(buffer) == data
    assert _in_place(client) - before == 6 + 4 + 6  # chunk pieces of the three reads
    # Every piece was still admitted by the servers' schedulers, charged to the job.
    served = sum(
        row[4] for s in client.call_all({"op": "stats"}) for row in s["jobs"] if row[0] == "77"
    )
    assert served >= 2 * len(data) + (3 * MiB + 7 - 1000)
    # Turned off, the same reads come through gRPC.
    monkeypatch.setenv("IOSVC_READ_IN_PLACE", "0")
    before = _in_place(client)
    assert client.read("ip/data") == data
    assert _in_place(client) == before


def test_a_corrupt_chunk_file_is_caught_in_place(disk_cluster: LocalCluster) -> None:
    assert disk_cluster.spec is not None and disk_cluster.directory is not None
    client = Client(disk_cluster.spec)
    data = os.urandom(2 * MiB)
    client.write("ip/corrupt", data)
    uid = client.info("ip/corrupt")["version"]
    files = [p for p in disk_cluster.directory.rglob(f"*{uid}*")]
    assert len(files) == 2
    raw = bytearray(files[0].read_bytes())
    raw[100] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    with pytest.raises(DataCorruption, match="failed its checksum"):
        client.read("ip/corrupt")


def test_a_chunk_file_gone_from_under_the_server_is_a_clear_error(
    disk_cluster: LocalCluster,
) -> None:
    assert disk_cluster.spec is not None and disk_cluster.directory is not None
    client = Client(disk_cluster.spec)
    client.write("ip/gone", os.urandom(3 * MiB))
    uid = client.info("ip/gone")["version"]
    victim = next(iter(disk_cluster.directory.rglob(f"*{uid}!1")))
    victim.unlink()
    # In place the file is missing; the read falls back to the server, which says so.
    with pytest.raises(NotFound, match="removed or replaced during read"):
        client.read("ip/gone")


def test_memory_servers_send_bytes_as_before(client: Client, prefix: str) -> None:
    before = _in_place(client)
    data = os.urandom(3 * MiB)
    client.write(f"{prefix}/m", data)
    assert client.read(f"{prefix}/m") == data
    assert _in_place(client) == before


def test_store_directories_are_private_to_the_server_user(disk_cluster: LocalCluster) -> None:
    assert disk_cluster.directory is not None
    for server_dir in Path(disk_cluster.directory).iterdir():
        assert server_dir.stat().st_mode & 0o077 == 0


def test_read_into_lets_go_of_the_callers_buffer(
    disk_cluster: LocalCluster, client: Client, prefix: str
) -> None:
    """A reused buffer must not stay exported after a read (dataloaders pool them)."""
    assert disk_cluster.spec is not None
    for c in (client, Client(disk_cluster.spec)):  # memory servers, then in place
        c.write(f"{prefix}/b", os.urandom(3 * MiB))
        buffer = bytearray(3 * MiB)
        c._run(c.aio.read_into, c.info(f"{prefix}/b"), buffer)
        buffer.extend(b"x")  # BufferError while a memoryview of it is alive


# ------------------------------------------------------------------ mapped chunk files
def _maps_of(path_part: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(path_part in line for line in f)


def test_map_gives_the_file_mapped_from_chunk_files(disk_cluster: LocalCluster) -> None:
    assert disk_cluster.spec is not None
    client = Client(disk_cluster.spec, identity=JobIdentity("78", "bob", "g", 1))
    data = os.urandom(5 * MiB + 123)  # a partial last chunk, not page-aligned
    client.write("ip/map", data)
    info = client.info("ip/map")
    before = _in_place(client)
    view = client._run(client.aio.map, info)
    assert view is not None and view.readonly
    assert bytes(view) == data
    assert _in_place(client) - before == 6  # every chunk admitted by its server
    # The pages are the chunk files' own: one mapping per chunk file, gone with the views.
    version = info["version"]
    assert _maps_of(version) == 6
    sliced = view[MiB : 2 * MiB]
    del view
    assert _maps_of(version) == 6  # a slice still holds the mapping
    assert bytes(sliced) == data[MiB : 2 * MiB]
    del sliced
    assert _maps_of(version) == 0


def test_chunks_read_in_place_are_admitted_in_runs(disk_cluster: LocalCluster) -> None:
    """A server admits the chunks it lets a client read in place in runs of IN_PLACE_RUN,
    each one request that stands for its chunks: the job is charged and credited every
    chunk and its bytes as if admitted one by one, and every chunk is answered with its
    file."""
    from iosvc.server._service import IN_PLACE_RUN

    assert disk_cluster.spec is not None
    who = JobIdentity("79", "cy", "g", 1)
    chunk = 64 * 1024
    client = Client(disk_cluster.spec, identity=who, chunk_size=chunk)
    n_chunks = 2 * IN_PLACE_RUN + 6  # 38 per server: one full run and a short one each
    data = os.urandom(n_chunks * chunk - 5)
    client.write("ip/runs", data)
    info = client.info("ip/runs")

    def served() -> tuple[int, int]:
        rows = [
            row for s in client.call_all({"op": "stats"}) for row in s["jobs"] if row[0] == "79"
        ]
        return sum(r[4] for r in rows), sum(r[5] for r in rows)

    assert client._run(client.aio.map, info) is not None  # learns that it may map here
    (bytes0, ops0), before = served(), _in_place(client)
    view = client._run(client.aio.map, info)
    assert view is not None and bytes(view) == data
    (bytes1, ops1) = served()
    assert _in_place(client) - before == n_chunks
    assert ops1 - ops0 == n_chunks  # counted (and charged) per chunk
    assert bytes1 - bytes0 == len(data)
    del view
    client.close()


def test_read_files_maps_and_receives_many_files_in_one_request_per_server(
    disk_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large files mapped, small ones received into the caller's buffers, all in one read
    request per server; a file gone meanwhile gets its own error, the others their bytes."""
    from iosvc.client import AsyncClient

    assert disk_cluster.spec is not None
    client = Client(disk_cluster.spec)
    files = {"ip/many/big": os.urandom(3 * MiB + 5), "ip/many/small": os.urandom(10_000)}
    files |= {f"ip/many/tiny{k}": os.urandom(100 + k) for k in range(4)}
    for path, data in files.items():
        client.write(path, data)
    infos = [client.info(p) for p in files]
    buffers: list[bytearray] = []

    def buffer(size: int) -> bytearray:
        buffers.append(bytearray(size + 7))  # larger than asked: the view is cut to size
        return buffers[-1]

    streams: list[int] = []
    stream = AsyncClient._stream_chunks

    async def counted(self: AsyncClient, server: int, *args: Any) -> Any:
        streams.append(server)
        return await stream(self, server, *args)

    monkeypatch.setattr(AsyncClient, "_stream_chunks", counted)
    got = client._run(client.aio.read_files, infos, buffer, map_from=MiB)
    assert [bytes(v) for v in got] == list(files.values())  # type: ignore[arg-type]
    assert sorted(streams) == [0, 1]  # one request per server, for all six files
    assert isinstance(got[0], memoryview) and got[0].readonly  # mapped
    assert len(buffers) == 5 and got[1].obj is buffers[0]  # type: ignore[union-attr]
    # A version whose chunks are gone (the info of a version never written): that file's
    # error, the others still read.
    infos[1] = {**infos[1], "version": uuid.uuid4().hex}
    got = client._run(client.aio.read_files, infos, buffer, map_from=MiB)
    assert isinstance(got[1], NotFound)
    assert [bytes(v) for k, v in enumerate(got) if k != 1] == [  # type: ignore[arg-type]
        d for k, d in enumerate(files.values()) if k != 1
    ]
    client.close()


def test_read_files_reads_again_what_could_not_be_read_in_place(
    disk_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces of several files sharing streams, every other one failing to be read in place
    (fetched again through the servers): each byte lands in its own file's place."""
    from iosvc.client import AsyncClient

    assert disk_cluster.spec is not None
    client = Client(disk_cluster.spec)
    files = {
        "ip/again/big1": os.urandom(3 * MiB + 5),
        "ip/again/big2": os.urandom(2 * MiB + 77),
        "ip/again/small": os.urandom(300_000),
        "ip/again/mid": os.urandom(MiB + 3),
    }
    for path, data in files.items():
        client.write(path, data)
    infos = [client.info(p) for p in files]
    read_in_place = AsyncClient._read_in_place
    calls = [0]

    def flaky(self: AsyncClient, *args: Any) -> Any:
        calls[0] += 1
        return None if calls[0] % 2 else read_in_place(self, *args)

    monkeypatch.setattr(AsyncClient, "_read_in_place", flaky)
    for map_from in (MiB, None):
        got = client._run(client.aio.read_files, infos, bytearray, map_from=map_from)
        assert [bytes(v) for v in got] == list(files.values())  # type: ignore[arg-type]
    assert calls[0] > 8
    client.close()


def test_a_failed_read_files_stops_its_other_streams(
    disk_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When one stream fails, the others are cancelled before read_files answers: none goes
    on writing into buffers the caller already has back."""
    from iosvc.client import AsyncClient

    assert disk_cluster.spec is not None
    client = Client(disk_cluster.spec)
    data = os.urandom(6 * MiB)
    client.write("ip/stop/slow", data)
    client.write("ip/stop/gone", b"x" * 1000)
    infos = [client.info("ip/stop/slow"), client.info("ip/stop/gone")]
    infos[1] = {**infos[1], "version": uuid.uuid4().hex}  # NotFound on its server
    stream_chunks = AsyncClient._stream_chunks
    finished: list[bool] = []

    async def slow(self: AsyncClient, server: int, plan: Any, *args: Any) -> Any:
        if {p.read.info["name"] for p in plan} == {"ip/stop/slow"} and not finished:
            finished.append(False)
            await asyncio.sleep(0.5)
            finished[0] = True
        return await stream_chunks(self, server, plan, *args)

    monkeypatch.setattr(AsyncClient, "_stream_chunks", slow)
    got = client._run(client.aio.read_files, infos, bytearray, map_from=None)
    assert isinstance(got[1], NotFound)
    assert bytes(got[0]) == data  # read again on its own
    time.sleep(0.8)  # what the slow stream would need to finish, had it not been cancelled
    assert finished == [False]
    client.close()


def test_read_files_splits_long_requests(disk_cluster: LocalCluster) -> None:
    """More pieces for one server than one request may carry (servers refuse lists over
    4096): asked in several requests, all read."""
    assert disk_cluster.spec is not None
    client = Client(disk_cluster.spec)
    files = {f"ip/long/f{i}": b"%d" % i for i in range(9000)}
    client.write_many(files)
    infos = client.info_many(list(files))
    got = client._run(client.aio.read_files, infos, bytearray)
    assert [bytes(v) for v in got] == list(files.values())  # type: ignore[arg-type]
    client.close()


def test_map_with_default_chunks_maps_one_file_per_chunk(disk_cluster: LocalCluster) -> None:
    """Default chunks (2 MiB, a huge page each) from a store on any disk: mapped correctly,
    one mapping per chunk file, the whole file at a 2 MiB boundary."""
    assert disk_cluster.spec is not None
    client = Client(disk_cluster.spec, chunk_size=wire.DEFAULT_CHUNK_SIZE)
    data = os.urandom(5 * MiB + 123)
    client.write("ip/map-default", data)
    info = client.info("ip/map-default")
    assert info["chunk_size"] == 2 * MiB
    view = client._run(client.aio.map, info)
    assert view is not None and bytes(view) == data
    assert _maps_of(info["version"]) == 3
    assert int(np.frombuffer(view, dtype=np.uint8).ctypes.data) % HUGE_PAGE == 0
    del view
    client.close()


def test_a_mapped_file_outlives_its_removal(disk_cluster: LocalCluster) -> None:
    """A server never rewrites a chunk file in place: removing it unlinks, and the mapping
    keeps its pages (no SIGBUS for a reader of a removed file)."""
    assert disk_cluster.spec is not None
    client = Client(disk_cluster.spec)
    data = os.urandom(3 * MiB)
    client.write("ip/map-rm", data)
    view = client._run(client.aio.map, client.info("ip/map-rm"))
    assert view is not None
    client.rm("ip/map-rm")
    client.write("ip/map-rm", os.urandom(3 * MiB))  # a new version under the same name
    assert bytes(view) == data


def test_a_corrupt_chunk_file_is_caught_when_mapped(disk_cluster: LocalCluster) -> None:
    assert disk_cluster.spec is not None and disk_cluster.directory is not None
    client = Client(disk_cluster.spec)
    client.write("ip/map-bad", os.urandom(2 * MiB))
    uid = client.info("ip/map-bad")["version"]
    victim = next(iter(disk_cluster.directory.rglob(f"*{uid}!1")))
    raw = bytearray(victim.read_bytes())
    raw[5] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(DataCorruption, match=r"chunk 1 .* failed its checksum"):
        client._run(client.aio.map, client.info("ip/map-bad"))
    # A caller that checks the bytes itself as it reads them maps without the chunk check.
    view = client._run(functools.partial(client.aio.map, verify=False), client.info("ip/map-bad"))
    assert view is not None and bytes(view[MiB : 2 * MiB]) == bytes(raw[:MiB])


def test_a_truncated_chunk_file_is_never_mapped(disk_cluster: LocalCluster) -> None:
    """Pages past a file's end fault with SIGBUS: a short chunk file is read through the
    server instead, which finds it corrupt."""
    assert disk_cluster.spec is not None and disk_cluster.directory is not None
    client = Client(disk_cluster.spec)
    client.write("ip/map-short", os.urandom(2 * MiB))
    uid = client.info("ip/map-short")["version"]
    victim = next(iter(disk_cluster.directory.rglob(f"*{uid}!0")))
    os.truncate(victim, MiB // 2)
    with pytest.raises(DataCorruption):
        client._run(client.aio.map, client.info("ip/map-short"))


def test_map_declines_where_it_cannot_help(
    disk_cluster: LocalCluster, client: Client, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert disk_cluster.spec is not None
    data = os.urandom(2 * MiB + 5)
    # Memory servers say so (endpoints), so even a new client's first map declines and
    # the caller reads into its own buffer (a copy into fresh memory would be worse, and
    # is no file of the servers': the dataloaders' node cache keeps only what they read).
    client.write(f"{prefix}/mm", data)
    info = client.info(f"{prefix}/mm")
    before = _in_place(client)
    assert client._run(client.aio.map, info) is None
    assert client._run(client.aio.map, info) is None
    assert client.read(f"{prefix}/mm") == data and _in_place(client) == before
    # A server that does not say (older than the answer; a cluster file without its
    # endpoints) is learnt from its first read: that one map is a correct copy, then map
    # declines.
    old_servers = Client(dataclasses.replace(client.spec, endpoints=()))
    asked = old_servers.aio._ask_data_port

    async def silent(server: int) -> Any:
        got = await asked(server)
        old_servers.aio._sends_bytes.discard(server)
        return got

    monkeypatch.setattr(old_servers.aio._data, "_ask_port", silent)
    first = old_servers._run(old_servers.aio.map, info)
    assert first is not None and bytes(first) == data
    assert old_servers._run(old_servers.aio.map, info) is None
    # Disk servers on this host say they can be mapped: the first map is in place.
    on_disk = Client(disk_cluster.spec)
    on_disk.write("ip/first", data)
    before = _in_place(on_disk)
    view = on_disk._run(on_disk.aio.map, on_disk.info("ip/first"))
    assert view is not None and bytes(view) == data
    assert _in_place(on_disk) - before == 3
    # An empty file, and reads in place turned off.
    on_disk.write("ip/empty", b"")
    assert on_disk._run(on_disk.aio.map, on_disk.info("ip/empty")) is None
    on_disk.write("ip/off", data)
    monkeypatch.setenv("IOSVC_READ_IN_PLACE", "0")
    assert on_disk._run(on_disk.aio.map, on_disk.info("ip/off")) is None


def test_servers_that_do_not_say_are_asked_once(
    disk_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the data plane (TLS, or turned off), servers older than ``in_place_host``
    are asked once per client, not at every map (their files are mapped all the same)."""
    assert disk_cluster.spec is not None
    monkeypatch.setenv("IOSVC_DATA_PLANE", "0")
    plain = Client(dataclasses.replace(disk_cluster.spec, endpoints=()))  # older servers
    prefix = "ip/asked"
    asked: list[int] = []
    grpc_call = plain.aio._grpc_call

    async def old_servers(server: int, request: dict[str, Any], payload: Any = b"") -> Any:
        reply = await grpc_call(server, request, payload)
        if request["op"] != "endpoints":
            return reply
        asked.append(server)
        header, body = wire.unpack(reply)
        header.pop("in_place_host", None)
        return wire.pack(header, body)

    monkeypatch.setattr(plain.aio, "_grpc_call", old_servers)
    data = os.urandom(2 * MiB + 5)
    plain.write(f"{prefix}/asked", data)
    info = plain.info(f"{prefix}/asked")
    before = _in_place(plain)
    for _ in range(3):
        view = plain._run(plain.aio.map, info)
        assert view is not None and bytes(view) == data
    assert _in_place(plain) - before == 3 * 3  # mapped in place, 3 chunks each time
    assert sorted(asked) == [0, 1]


def _pmd_mapped(view: memoryview) -> int:
    """Bytes of ``view``'s pages this process maps as whole 2 MiB pages (tmpfs files)."""
    start = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
    end = start + len(view)
    total = 0
    with open("/proc/self/smaps") as f:
        for vma in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", f.read()):
            lo, hi = (int(x, 16) for x in vma.split(None, 1)[0].split("-"))
            pmd = re.search(r"^ShmemPmdMapped:\s+(\d+) kB", vma, re.M)
            if lo < end and hi > start and pmd:
                total += int(pmd[1]) << 10
    return total


@needs_collapse
def test_chunk_files_on_a_plain_tmpfs_are_huge_pages_mapped_whole(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On a tmpfs without ``huge=`` (/dev/shm), chunks of 2 MiB and more are written into
    2 MiB pages, and a same-host reader maps them as such (at aligned addresses)."""
    with (
        tmpfs(tmp_path / "plain", "size=64m,mode=0700") as mount,
        LocalCluster(1, directory=mount / "data", workdir=tmp_path / "work") as cluster,
    ):
        assert cluster.spec is not None
        client = Client(cluster.spec, chunk_size=2 * MiB)
        request.addfinalizer(client.close)
        data = os.urandom(5 * MiB + 123)  # chunks of 2 MiB, 2 MiB and 1 MiB + 123 bytes
        client.write("ip/huge", data)
        chunks = [str(p) for p in (mount / "data").rglob(f"*{client.info('ip/huge')['version']}*")]
        assert len(chunks) == 3
        assert huge_bytes(chunks) == 4 * MiB  # the whole 2 MiB pages; the last chunk has none
        view = client._run(client.aio.map, client.info("ip/huge"))
        assert view is not None and bytes(view) == data
        assert _pmd_mapped(view) == 4 * MiB
        assert client.read("ip/huge", MiB, 3 * MiB) == data[MiB : 3 * MiB]  # the server's read


def test_chunk_files_off_tmpfs_are_not_collapsed(tmp_path: Path) -> None:
    if tmpfs_huge_pages(str(tmp_path)) is not None:
        pytest.skip("the temporary directory is on a tmpfs here")
    assert not LocalDirStore(tmp_path / "store")._collapse


@needs_collapse
def test_a_chunk_the_kernel_will_not_collapse_is_written_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stores, "collapse_new_range", lambda fd, start, end: False)
    with tmpfs(tmp_path / "plain", "size=16m,mode=0700") as mount:
        store = LocalDirStore(mount / "store")
        assert store._collapse
        value = os.urandom(4 * MiB + 8)
        asyncio.run(store.set("c/0/v/0", value))
        assert asyncio.run(store.get("c/0/v/0")) == value
        assert huge_bytes([store.local_path("c/0/v/0") or ""]) == 0
        monkeypatch.undo()
        monkeypatch.setenv("IOSVC_HUGE_PAGES", "0")  # the servers' opt-out
        assert not LocalDirStore(mount / "store")._collapse


def test_a_mapped_file_starts_at_a_huge_page_boundary() -> None:
    """So that chunk files of 2 MiB multiples are mapped in whole huge pages; nothing of
    the spare reservation stays mapped."""
    for size in (1, 5 * MiB + 123):
        region = MappedFile(size)
        assert region._address % HUGE_PAGE == 0
        with open("/proc/self/maps") as f:
            mine = [line for line in f if int(line.split("-")[0], 16) == region._address]
        assert len(mine) == 1
        start, end = (int(x, 16) for x in mine[0].split()[0].split("-"))
        assert end - start == -(-size // 4096) * 4096  # nothing after it either
        del region


@needs_collapse
def test_a_full_tmpfs_refuses_a_huge_chunk_and_keeps_what_it_has(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=5m,mode=0700") as mount:
        store = LocalDirStore(mount / "store")
        assert store._collapse
        kept = os.urandom(2 * MiB + 8)
        asyncio.run(store.set("c/0/v/0", kept))
        with pytest.raises(QuotaExceeded, match="disk full"):
            asyncio.run(store.set("c/0/v/1", bytes(4 * MiB + 8)))
        assert not list((mount / "store" / ".tmp").iterdir())  # no half-written file left
        assert asyncio.run(store.get("c/0/v/0")) == kept
        assert huge_bytes([store.local_path("c/0/v/0") or ""]) == 2 * MiB
        asyncio.run(store.set("c/0/v/1", bytes(MiB)))  # what fits still does

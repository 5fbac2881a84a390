"""Server-side stage-in (``pull``): servers read their chunks from a file system they mount.

Real server processes with ``--pull-root``, real files; the client only checksums.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
import xxhash

from iosvc import wire
from iosvc.client import Client
from iosvc.errors import DataCorruption, InvalidArgument, NotFound, PermissionDenied
from iosvc.identity import JobIdentity, issue_token, load_key_file
from iosvc.server import LocalCluster
from iosvc.staging import Catalog, Stager, copy_files, load_sites

MiB = 1 << 20


@pytest.fixture(scope="module")
def pfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'parallel file system': a directory the servers may pull from."""
    return tmp_path_factory.mktemp("pfs")


@pytest.fixture(scope="module")
def puller(pfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("pull-cluster")
    with LocalCluster(2, memory=512 << 20, workdir=workdir, pull_roots=[pfs]) as cluster:
        yield cluster


@pytest.fixture
def client(puller: LocalCluster) -> Client:
    assert puller.spec is not None
    return Client(puller.spec)


def _tree(root: Path) -> dict[str, bytes]:
    files = {
        "small/a.bin": os.urandom(10_000),
        "small/exactly-one-chunk.bin": os.urandom(MiB),
        "small/empty.bin": b"",
        "large/six.bin": os.urandom(6 * MiB + 17),
        "large/two.bin": os.urandom(MiB + 1),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _pulled(client: Client) -> int:
    return sum(s["pulled_bytes"] for s in client.status())


def test_pulled_files_are_identical_and_no_byte_went_through_the_client(
    client: Client, pfs: Path, tmp_path: Path
) -> None:
    root = pfs / tmp_path.name
    files = _tree(root)
    before = _pulled(client)
    done: list[tuple[str, int]] = []
    failed = client.pull_files(
        [(root / rel, f"{tmp_path.name}/{rel}") for rel in files],
        on_done=lambda path, size: done.append((path, size)),
    )
    assert failed == {}
    assert sorted(done) == sorted((f"{tmp_path.name}/{r}", len(d)) for r, d in files.items())
    for rel, data in files.items():
        assert client.read(f"{tmp_path.name}/{rel}") == data
    # Every byte was read by the servers themselves.
    assert _pulled(client) - before == sum(len(d) for d in files.values())
    # Stored chunks carry the same checksums a pushed write gives (reads verify them).
    info = client.info(f"{tmp_path.name}/large/six.bin")
    data = files["large/six.bin"]
    cs = info["chunk_size"]
    assert info["checksums"] == [
        xxhash.xxh3_64_intdigest(data[i : i + cs]) for i in range(0, len(data), cs)
    ]


def test_the_manifest_check_refuses_a_file_before_it_is_visible(
    client: Client, pfs: Path, tmp_path: Path
) -> None:
    root = pfs / tmp_path.name
    files = _tree(root)
    expected = {f"{tmp_path.name}/{rel}": xxhash.xxh3_128_hexdigest(d) for rel, d in files.items()}
    refuse = {f"{tmp_path.name}/large/six.bin", f"{tmp_path.name}/small/a.bin"}

    def accept(path: str, digest: object) -> None:
        assert digest.hexdigest() == expected[path]  # type: ignore[attr-defined]
        if path in refuse:
            raise DataCorruption(f"{path} does not match its manifest")

    used = sum(s["used"] for s in client.status())
    failed = client.pull_files(
        [(root / rel, f"{tmp_path.name}/{rel}") for rel in files],
        hasher=xxhash.xxh3_128,
        accept=accept,
    )
    assert set(failed) == refuse
    assert all(isinstance(e, DataCorruption) for e in failed.values())
    for path in refuse:
        assert not client.exists(path)
    assert client.exists(f"{tmp_path.name}/large/two.bin")
    # The refused large file's chunks were stored, then freed: only the accepted files stay.
    kept = sum(len(d) for r, d in files.items() if f"{tmp_path.name}/{r}" not in refuse)
    grown = sum(s["used"] for s in client.status()) - used
    assert kept <= grown < kept + 64 * 1024  # + records and checksum trailers


def test_probe_and_pull_outside_the_roots_are_refused(
    client: Client, pfs: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the buffer")
    reason = client.pull_probe(outside)
    assert reason is not None and "outside this server's pull roots" in reason
    failed = client.pull_files([(outside, f"{tmp_path.name}/secret")])
    assert isinstance(failed[f"{tmp_path.name}/secret"], PermissionDenied)
    assert not client.exists(f"{tmp_path.name}/secret")
    # A symlink inside the root leads nowhere outside it: neither a linked directory ...
    (pfs / f"{tmp_path.name}-dir").symlink_to(tmp_path)
    linked = pfs / f"{tmp_path.name}-dir" / "secret.txt"
    assert "outside" in (client.pull_probe(linked) or "")
    # ... nor a linked file.
    (pfs / f"{tmp_path.name}-file").symlink_to(outside)
    assert client.pull_probe(pfs / f"{tmp_path.name}-file") is not None
    assert client.pull_files([(pfs / f"{tmp_path.name}-file", f"{tmp_path.name}/s2")])
    assert client.pull_probe(pfs / "missing.bin") is not None
    assert client.pull_probe(pfs) is not None  # a directory is no file


def test_servers_without_pull_roots_refuse_and_say_how(
    fresh_cluster: LocalCluster, pfs: Path
) -> None:
    assert fresh_cluster.spec is not None
    client = Client(fresh_cluster.spec)
    (pfs / "plain.bin").write_bytes(b"x" * 100)
    reason = client.pull_probe(pfs / "plain.bin")
    assert reason is not None and "--pull-root" in reason
    failed = client.pull_files([(pfs / "plain.bin", "p/plain.bin")])
    assert isinstance(failed["p/plain.bin"], PermissionDenied)


def _raw_pull(cluster: LocalCluster, server: int, files: list[object]) -> dict[str, object]:
    assert cluster.spec is not None
    header = {"op": "pull", "files": files, "id": ["1", "u", "g", 1]}
    with grpc.insecure_channel(cluster.spec.servers[server]) as channel:
        reply = channel.unary_unary(wire.METHOD_CALL)(wire.pack(header), timeout=10)
    out: dict[str, object] = wire.unpack(reply)[0]
    return out


def test_a_chunk_read_differently_at_the_server_is_never_stored(
    puller: LocalCluster, client: Client, pfs: Path, tmp_path: Path
) -> None:
    src = pfs / f"{tmp_path.name}.bin"
    src.write_bytes(os.urandom(50_000))
    st = src.stat()
    path = f"{tmp_path.name}/x.bin"
    home = client.aio.placement.home(path)
    uid = "a" * 32
    rec = {"p": path, "s": st.st_size, "cs": MiB, "u": uid, "ck": [12345]}
    entry = {
        "src": str(src),
        "s": st.st_size,
        "mt": st.st_mtime_ns,
        "cs": MiB,
        "chunks": [[0, f"c/{home}/{uid}/0", 12345]],  # not the file's checksum
        "rec": rec,
    }
    reply = _raw_pull(puller, home, [entry])
    assert reply["errors"][0][0] == "DataCorruption"  # type: ignore[index]
    assert not client.exists(path)
    # The client's view of the file is not the server's (another size or mtime): refused.
    stale = {**entry, "mt": st.st_mtime_ns - 1, "chunks": []}
    reply = _raw_pull(puller, home, [stale])
    assert reply["errors"][0][0] == "NotFound"  # type: ignore[index]
    assert "differs here" in reply["errors"][0][1]  # type: ignore[index]


@pytest.mark.parametrize(
    "files, message",
    [
        ("nope", "must be a list"),
        ([["src"]], "must be a map"),
        ([{"src": "/x", "s": 1, "mt": 0}], "without 'cs'"),
        ([{"src": "/x", "s": "1", "mt": 0, "cs": MiB}], "must be integers"),
        ([{"src": "/x", "s": 1, "mt": 0, "cs": 10}], "out of range"),
        ([{"src": "/x", "s": 1, "mt": 0, "cs": 64 * MiB}], "out of range"),  # > chunk max
        ([{"src": "/x", "s": 1, "mt": 0, "cs": MiB, "chunks": [[0, "k"]]}], "index, key"),
        ([{"src": "/x", "s": 1, "mt": 0, "cs": MiB, "chunks": [[0, "bad", 1]]}], "malformed"),
        (
            [{"src": "/x", "s": 1, "mt": 0, "cs": MiB, "chunks": [[1, f"c/0/{'a' * 32}/0", 1]]}],
            "is not chunk 1",
        ),
        (
            [
                {
                    "src": "/x",
                    "s": 80 * MiB,
                    "mt": 0,
                    "cs": 16 * MiB,
                    "chunks": [[i, f"c/0/{'a' * 32}/{i}", 1] for i in range(5)],
                }
            ],
            "over the",
        ),
    ],
)
def test_malformed_pull_requests_get_invalid_argument(
    puller: LocalCluster, files: object, message: str
) -> None:
    assert puller.spec is not None
    header = msgpack.packb({"op": "pull", "files": files, "id": ["1", "u", "g", 1]})
    frame = len(header).to_bytes(4, "little") + header
    with (
        grpc.insecure_channel(puller.spec.servers[0]) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        channel.unary_unary(wire.METHOD_CALL)(frame, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")


def test_in_secure_mode_only_admins_may_pull(tmp_path: Path) -> None:
    pfs = tmp_path / "pfs"
    pfs.mkdir()
    (pfs / "d.bin").write_bytes(os.urandom(3 * MiB))
    with LocalCluster(
        2, memory=256 << 20, workdir=tmp_path / "c", secure=True, pull_roots=[pfs]
    ) as cluster:
        assert cluster.spec is not None
        key = load_key_file(cluster.key_file)
        alice = JobIdentity("7", "alice", "climate", 1)
        user = Client(cluster.spec, token=issue_token(key, alice, 600))
        failed = user.pull_files([(pfs / "d.bin", "alice/d.bin")])
        assert isinstance(failed["alice/d.bin"], PermissionDenied)
        assert "admin" in str(failed["alice/d.bin"])
        admin = Client(cluster.spec, token=cluster.admin_token_file.read_text().strip())
        assert admin.pull_files([(pfs / "d.bin", "datasets/d.bin")]) == {}
        assert user.read("datasets/d.bin") == (pfs / "d.bin").read_bytes()


def test_missing_local_files_fail_alone(client: Client, pfs: Path, tmp_path: Path) -> None:
    root = pfs / tmp_path.name
    root.mkdir()
    (root / "ok.bin").write_bytes(b"fine")
    failed = client.pull_files(
        [(root / "gone.bin", f"{tmp_path.name}/gone"), (root / "ok.bin", f"{tmp_path.name}/ok")]
    )
    assert set(failed) == {f"{tmp_path.name}/gone"} and isinstance(
        failed[f"{tmp_path.name}/gone"], NotFound
    )
    assert client.read(f"{tmp_path.name}/ok") == b"fine"
    with pytest.raises(InvalidArgument):
        client.pull_files([(root / "ok.bin", "../escape")])


def test_stage_into_a_buffer_that_pulls(
    puller: LocalCluster, client: Client, pfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`iosvc stage --into-buffer` uses the servers' reads when they see the site, and still
    refuses a source file that no longer matches its manifest."""
    from iosvc.client import IosvcFileSystem

    assert puller.spec is not None
    cluster_file = tmp_path / "cluster.json"
    puller.spec.save(cluster_file)
    monkeypatch.setenv("IOSVC_CLUSTER", str(cluster_file))
    IosvcFileSystem.clear_instance_cache()
    site = pfs / f"site-{tmp_path.name}"
    (site / "beta").mkdir(parents=True)
    files = _tree(site / "alpha" / "ds")
    sites = tmp_path / "sites.toml"
    sites.write_text(
        f'[sites.alpha]\nurl = "{site}/alpha"\n'
        f'[sites.beta]\nurl = "{site}/beta"\nbuffer = "iosvc:///{tmp_path.name}"\n'
    )
    try:
        with Catalog(tmp_path / "catalog.db") as catalog:
            stager = Stager(catalog, load_sites(sites), verify="transfer")
            stager.register("ds", name="ds", site="alpha")
            before = _pulled(client)
            results = stager.stage("ds", to="beta", into_buffer=True)
            assert [(r.site, r.state) for r in results] == [
                ("beta", "verified"),
                ("beta:buffer", "verified"),
            ]
            assert _pulled(client) - before == sum(len(d) for d in files.values())
            assert f"{len(files)} files read by the buffer's servers" in results[1].detail
            assert "servers" not in results[0].detail  # the site copy was a plain one
            for rel, data in files.items():
                assert client.read(f"{tmp_path.name}/ds/{rel}") == data
            # A source that no longer matches its manifest is refused, the others copied.
            dataset = catalog.dataset("ds")
            (site / "beta" / "ds" / "small" / "a.bin").write_bytes(b"tampered")
            result = copy_files(f"{site}/beta/ds", f"iosvc:///{tmp_path.name}/again", dataset.files)
            assert list(result.failed) == ["small/a.bin"]
            assert "manifest" in result.failed["small/a.bin"]
            assert result.copied == len(files) - 1
            assert not client.exists(f"{tmp_path.name}/again/small/a.bin")
            assert client.read(f"{tmp_path.name}/again/large/six.bin") == files["large/six.bin"]
    finally:
        IosvcFileSystem.clear_instance_cache()


def test_a_full_buffer_refuses_what_does_not_fit_and_keeps_serving(tmp_path: Path) -> None:
    pfs = tmp_path / "pfs"
    pfs.mkdir()
    big, small = pfs / "big.bin", pfs / "small.bin"
    big.write_bytes(os.urandom(12 * MiB))
    small.write_bytes(os.urandom(1000))
    with LocalCluster(2, memory=4 * MiB, workdir=tmp_path / "c", pull_roots=[pfs]) as cluster:
        assert cluster.spec is not None
        client = Client(cluster.spec)
        failed = client.pull_files([(big, "full/big.bin"), (small, "full/small.bin")])
        assert list(failed) == ["full/big.bin"]
        assert isinstance(failed["full/big.bin"], OSError)  # QuotaExceeded is ENOSPC
        assert not client.exists("full/big.bin")
        assert client.read("full/small.bin") == small.read_bytes()
        # What the refused file had stored was freed again.
        assert sum(s["used"] for s in client.status()) < 64 * 1024


def test_iosvc_put_lets_the_servers_read_what_they_mount(
    puller: LocalCluster, client: Client, pfs: Path, tmp_path: Path, iosvc_cli: Any
) -> None:
    assert puller.spec is not None
    cluster_file = tmp_path / "cluster.json"
    puller.spec.save(cluster_file)
    root = pfs / tmp_path.name
    files = _tree(root)
    before = _pulled(client)
    proc = iosvc_cli(
        "put", "-r", str(root), f"{tmp_path.name}/", "--cluster-file", str(cluster_file)
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{len(files)} files read by the servers" in proc.stderr
    assert _pulled(client) - before == sum(len(d) for d in files.values())
    for rel, data in files.items():
        assert client.read(f"{tmp_path.name}/{root.name}/{rel}") == data
    # Outside the pull roots the same command pushes the bytes itself.
    elsewhere = tmp_path / "local"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "sub" / "x.bin").write_bytes(b"pushed")
    proc = iosvc_cli("put", "-r", str(elsewhere), "pushed/", "--cluster-file", str(cluster_file))
    assert proc.returncode == 0, proc.stderr
    assert "read by the servers" not in proc.stderr
    assert client.read("pushed/local/sub/x.bin") == b"pushed"


def test_a_directory_swapped_for_a_link_after_a_pull_leads_nowhere(
    client: Client, pfs: Path, tmp_path: Path
) -> None:
    """The check is made on the opened file, not on a remembered path (a cache of resolved
    directories once let a directory replaced by a link lead outside the roots)."""
    inside = pfs / f"{tmp_path.name}-swap"
    inside.mkdir()
    (inside / "f.bin").write_bytes(b"inside")
    assert client.pull_probe(inside / "f.bin") is None
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.bin").write_bytes(b"outside")
    os.utime(outside / "f.bin", ns=((inside / "f.bin").stat().st_atime_ns,) * 2)
    (inside / "f.bin").unlink()
    inside.rmdir()
    inside.symlink_to(outside)
    reason = client.pull_probe(inside / "f.bin")
    assert reason is not None and "outside this server's pull roots" in reason

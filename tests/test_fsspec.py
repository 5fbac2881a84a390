"""``IosvcFileSystem`` against fsspec's own conformance suites, plus iosvc-specific semantics."""

from __future__ import annotations

import gc
import io
import os
import pickle
import posixpath
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import fsspec.tests.abstract as abstract
import pytest

from iosvc.client import IosvcFileSystem


@pytest.fixture
def iosvc_fs(cluster_file: str) -> IosvcFileSystem:
    return IosvcFileSystem(cluster=cluster_file)


class IosvcFixtures(abstract.AbstractFixtures):  # type: ignore[misc]
    """The fixtures fsspec's abstract tests need, pointed at the session cluster."""

    @pytest.fixture
    def fs(self, iosvc_fs: IosvcFileSystem) -> IosvcFileSystem:
        return iosvc_fs

    @pytest.fixture
    def fs_join(self) -> Callable[..., str]:
        return posixpath.join

    @pytest.fixture
    def fs_path(self, iosvc_fs: IosvcFileSystem, prefix: str) -> Iterator[str]:
        yield prefix
        if iosvc_fs.exists(prefix):
            iosvc_fs.rm(prefix, recursive=True)


class TestIosvcCopy(abstract.AbstractCopyTests, IosvcFixtures):  # type: ignore[misc]
    pass


class TestIosvcGet(abstract.AbstractGetTests, IosvcFixtures):  # type: ignore[misc]
    pass


class TestIosvcPut(abstract.AbstractPutTests, IosvcFixtures):  # type: ignore[misc]
    pass


class TestIosvcOpen(abstract.AbstractOpenTests, IosvcFixtures):  # type: ignore[misc]
    pass


class TestIosvcPipe(abstract.AbstractPipeTests, IosvcFixtures):  # type: ignore[misc]
    pass


# --------------------------------------------------------------------------- iosvc's own tests
CS = 4096  # the smallest chunk size, so multi-chunk files stay tiny


@pytest.fixture
def fs(iosvc_fs: IosvcFileSystem, prefix: str) -> Iterator[IosvcFileSystem]:
    yield iosvc_fs
    if iosvc_fs.exists(prefix):
        iosvc_fs.rm(prefix, recursive=True)


@pytest.fixture
def small(cluster_file: str, fs: IosvcFileSystem) -> IosvcFileSystem:
    """4 KiB chunks (and write blocks): multi-chunk, multi-block files with little data."""
    return IosvcFileSystem(cluster=cluster_file, chunk_size=CS)


def test_fsspec_open_binary_and_text(use_cluster: str, fs: IosvcFileSystem, prefix: str) -> None:
    url = f"iosvc://{prefix}/dir/data.bin"
    data = os.urandom(10_000)
    with fsspec.open(url, "wb") as f:
        f.write(data)
    with fsspec.open(url, "rb") as f:
        assert f.read() == data
        f.seek(-10, 2)
        assert f.read() == data[-10:]
    text = "héllo\nwörld\n"
    with fsspec.open(f"iosvc://{prefix}/t.txt", "w", encoding="utf-8") as f:
        f.write(text)
    with fsspec.open(f"iosvc://{prefix}/t.txt", "r", encoding="utf-8") as f:
        assert f.readlines() == ["héllo\n", "wörld\n"]
    # The protocol in a URL and a leading slash name the same key.
    assert fs.cat_file(f"/{prefix}/t.txt") == text.encode()
    with fsspec.open(f"iosvc://{prefix}/t.txt", "rb", cluster=use_cluster) as f:
        assert f.read() == text.encode()


@pytest.mark.parametrize(
    ("start", "end"),
    [(None, None), (0, 10), (CS - 5, CS + 5), (-100, None), (-100, -10), (0, -1), (7, 7),
     (5 * CS, None), (10, 5)],
)  # fmt: skip
def test_cat_file_ranges(
    small: IosvcFileSystem, prefix: str, start: int | None, end: int | None
) -> None:
    data = os.urandom(3 * CS + 100)
    small.pipe_file(f"{prefix}/r", data)
    assert small.cat_file(f"{prefix}/r", start=start, end=end) == data[start:end]


def test_cat_file_errors(fs: IosvcFileSystem, prefix: str) -> None:
    fs.pipe_file(f"{prefix}/d/f", b"x")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{prefix}/missing")
    with pytest.raises(IsADirectoryError):
        fs.cat_file(f"{prefix}/d")


def test_cat_ranges(small: IosvcFileSystem, prefix: str) -> None:
    a, b = os.urandom(3 * CS), b"0123456789"
    small.pipe({f"{prefix}/a": a, f"{prefix}/b": b})
    small.mkdir(f"{prefix}/dir")
    paths = [f"{prefix}/a", f"{prefix}/a", f"{prefix}/b", f"{prefix}/b", f"{prefix}/a"]
    starts = [0, CS - 3, -4, 2, 2 * CS]
    ends = [5, CS + 3, None, -2, None]
    assert small.cat_ranges(paths, starts, ends) == [
        a[:5], a[CS - 3 : CS + 3], b[-4:], b[2:-2], a[2 * CS :]
    ]  # fmt: skip
    # The same start and end for every path.
    assert small.cat_ranges([f"{prefix}/a", f"{prefix}/b"], 1, 3) == [a[1:3], b[1:3]]
    # Per-range errors come back in place (what zarr's get_partial_values expects)...
    out = small.cat_ranges([f"{prefix}/b", f"{prefix}/nope", f"{prefix}/dir"], 0, 2)
    assert out[0] == b"01"
    assert isinstance(out[1], FileNotFoundError)
    assert isinstance(out[2], IsADirectoryError)
    # ...or the first one is raised.
    with pytest.raises(FileNotFoundError):
        small.cat_ranges([f"{prefix}/b", f"{prefix}/nope"], 0, 2, on_error="raise")
    with pytest.raises(ValueError, match="same length"):
        small.cat_ranges([f"{prefix}/a"], [0, 1], [2, 3])


def test_cat_many_files_batched(small: IosvcFileSystem, prefix: str) -> None:
    files = {f"{prefix}/s/{i:03d}": os.urandom(i * 7) for i in range(50)}
    files[f"{prefix}/s/big"] = os.urandom(3 * CS + 1)  # multi-chunk: not inline in the batch
    small.pipe(files)
    assert small.cat(list(files)) == files
    assert small.cat(f"{prefix}/s/00*") == {k: v for k, v in files.items() if "/00" in k}
    # A single path without magic gives its bytes, not a dict.
    assert small.cat(f"{prefix}/s/big") == files[f"{prefix}/s/big"]


def test_cat_with_missing_files(fs: IosvcFileSystem, prefix: str) -> None:
    fs.pipe({f"{prefix}/a": b"A", f"{prefix}/d/b": b"B"})
    paths = [f"{prefix}/a", f"{prefix}/missing", f"{prefix}/d/b", f"{prefix}/d"]
    with pytest.raises(FileNotFoundError):
        fs.cat(paths)
    assert fs.cat(paths, on_error="omit") == {f"{prefix}/a": b"A", f"{prefix}/d/b": b"B"}
    out = fs.cat(paths, on_error="return")
    assert out[f"{prefix}/a"] == b"A" and out[f"{prefix}/d/b"] == b"B"
    assert isinstance(out[f"{prefix}/missing"], FileNotFoundError)
    # A directory named outright is an error of its own kind, not "missing".
    assert isinstance(out[f"{prefix}/d"], IsADirectoryError)
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{prefix}/missing")
    with pytest.raises(IsADirectoryError):
        fs.cat(f"{prefix}/d")


def test_cat_recursive_and_glob_read_only_files(fs: IosvcFileSystem, prefix: str) -> None:
    fs.pipe({f"{prefix}/d/a": b"A", f"{prefix}/d/e/b": b"B", f"{prefix}/d/e/f/c": b"C"})
    fs.mkdir(f"{prefix}/d/empty")
    assert fs.cat(f"{prefix}/d", recursive=True) == {
        f"{prefix}/d/a": b"A",
        f"{prefix}/d/e/b": b"B",
        f"{prefix}/d/e/f/c": b"C",
    }
    assert fs.cat(f"{prefix}/d/a", recursive=True) == b"A"  # one file named: its bytes
    assert fs.cat(f"{prefix}/d/empty", recursive=True) == {}
    assert fs.cat(f"{prefix}/d/*") == {f"{prefix}/d/a": b"A"}
    assert fs.cat(f"{prefix}/d/**/b") == {f"{prefix}/d/e/b": b"B"}


def test_pipe(fs: IosvcFileSystem, prefix: str) -> None:
    files = {f"{prefix}/p/{i}": str(i).encode() * i for i in range(20)}
    fs.pipe(files)
    assert fs.cat(sorted(files)) == files
    fs.pipe(f"{prefix}/one", b"1")
    assert fs.cat_file(f"{prefix}/one") == b"1"
    # A bad path fails the whole call before anything is written (and strands nothing).
    with pytest.raises(ValueError, match="segment"):
        fs.pipe({f"{prefix}/big": os.urandom(2 << 20), f"{prefix}/../escape": b""})
    gc.collect()
    assert not fs.exists(f"{prefix}/big")
    with pytest.raises(FileExistsError):
        fs.pipe({f"{prefix}/one": b"2"}, mode="create")
    assert fs.cat_file(f"{prefix}/one") == b"1"


def test_put_get_files_and_directories(small: IosvcFileSystem, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "empty").mkdir(parents=True)
    files = {"a.bin": os.urandom(5 * CS + 3), "sub/b.txt": b"bee", "zero": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    small.put(str(src), f"{prefix}/up", recursive=True)
    assert small.find(f"{prefix}/up") == sorted(f"{prefix}/up/{n}" for n in files)
    assert small.isdir(f"{prefix}/up/sub/empty")  # an empty directory travels as a marker
    for name, data in files.items():
        assert small.cat_file(f"{prefix}/up/{name}") == data

    small.get(f"{prefix}/up", str(tmp_path / "down"), recursive=True)
    for name, data in files.items():
        assert (tmp_path / "down" / name).read_bytes() == data
    assert (tmp_path / "down" / "sub" / "empty").is_dir()

    small.put_file(str(src / "a.bin"), f"{prefix}/single")
    small.get_file(f"{prefix}/single", str(tmp_path / "single"))
    assert (tmp_path / "single").read_bytes() == files["a.bin"]
    buffer = io.BytesIO()
    small.get_file(f"{prefix}/single", buffer)  # fsspec allows a file object
    assert buffer.getvalue() == files["a.bin"]
    # A file is never silently skipped because the local target is a directory.
    with pytest.raises(IsADirectoryError):
        small.get_file(f"{prefix}/single", str(tmp_path / "down"))
    with pytest.raises(FileNotFoundError):
        small.get_file(f"{prefix}/nothing", str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()


def test_namespace_semantics(fs: IosvcFileSystem, prefix: str) -> None:
    fs.pipe({f"{prefix}/a": b"0123", f"{prefix}/d/b": b"bb", f"{prefix}/d/e/c": b"c"})
    assert fs.ls(prefix, detail=False) == [f"{prefix}/a", f"{prefix}/d"]
    entries = {e["name"]: e for e in fs.ls(prefix, detail=True)}
    assert entries[f"{prefix}/a"]["type"] == "file" and entries[f"{prefix}/a"]["size"] == 4
    assert entries[f"{prefix}/d"]["type"] == "directory"
    assert fs.ls(f"{prefix}/a", detail=False) == [f"{prefix}/a"]  # a file lists itself
    assert prefix in fs.ls("", detail=False)
    with pytest.raises(FileNotFoundError):
        fs.ls(f"{prefix}/nope")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{prefix}/nope")
    assert fs.info(f"{prefix}/d") == {"name": f"{prefix}/d", "size": 0, "type": "directory"}
    assert fs.isfile(f"{prefix}/a") and fs.isdir(f"{prefix}/d") and not fs.isdir(f"{prefix}/a")
    assert fs.exists(f"{prefix}/d/e") and not fs.exists(f"{prefix}/d/x")
    assert not fs.exists(f"{prefix}/bad/../path")  # invalid, so it cannot exist
    assert fs.find(prefix) == [f"{prefix}/a", f"{prefix}/d/b", f"{prefix}/d/e/c"]
    assert fs.find(prefix, withdirs=True) == [
        prefix, f"{prefix}/a", f"{prefix}/d", f"{prefix}/d/b", f"{prefix}/d/e", f"{prefix}/d/e/c"
    ]  # fmt: skip
    assert fs.find(prefix, maxdepth=1) == [f"{prefix}/a"]
    assert fs.find(f"{prefix}/a") == [f"{prefix}/a"]
    assert fs.find(f"{prefix}/nope") == []
    assert fs.glob(f"{prefix}/*") == [f"{prefix}/a", f"{prefix}/d"]
    assert fs.glob(f"{prefix}/**/c") == [f"{prefix}/d/e/c"]
    assert fs.glob(f"iosvc://{prefix}/d/?") == [f"{prefix}/d/b", f"{prefix}/d/e"]
    assert fs.du(prefix) == 7
    assert fs.size(f"{prefix}/a") == 4
    assert fs.modified(f"{prefix}/a").tzinfo is not None

    # A rewrite changes the version key (what caches compare).
    key = fs.ukey(f"{prefix}/a")
    fs.pipe_file(f"{prefix}/a", b"new")
    assert fs.ukey(f"{prefix}/a") != key


def test_mkdir_makedirs(fs: IosvcFileSystem, prefix: str) -> None:
    fs.mkdir(f"{prefix}/m/n")  # parents are implied
    assert fs.isdir(f"{prefix}/m/n") and fs.isdir(f"{prefix}/m")
    assert fs.ls(f"{prefix}/m/n") == []
    fs.mkdir(f"{prefix}/m/n")  # again: no error, like an object store
    with pytest.raises(FileNotFoundError):
        fs.mkdir(f"{prefix}/x/y", create_parents=False)
    fs.pipe_file(f"{prefix}/file", b"f")
    with pytest.raises(FileExistsError):
        fs.mkdir(f"{prefix}/file")
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{prefix}/file", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{prefix}/m")
    fs.makedirs(f"{prefix}/m", exist_ok=True)
    fs.makedirs("", exist_ok=True)  # the root

    # A directory made explicitly outlives its files; an implied one goes with them.
    fs.pipe({f"{prefix}/implied/f": b"1", f"{prefix}/m/n/f": b"2"})
    fs.rm([f"{prefix}/implied/f", f"{prefix}/m/n/f"])
    assert not fs.exists(f"{prefix}/implied")
    assert fs.isdir(f"{prefix}/m/n")
    # Making a directory over one implied by files pins it too.
    fs.pipe_file(f"{prefix}/k/f", b"3")
    fs.makedirs(f"{prefix}/k", exist_ok=True)
    fs.rm(f"{prefix}/k/f")
    assert fs.isdir(f"{prefix}/k")


def test_rm(fs: IosvcFileSystem, prefix: str) -> None:
    files = [f"{prefix}/d/a", f"{prefix}/d/e/b", f"{prefix}/d/e/f/c", f"{prefix}/keep"]
    fs.pipe(dict.fromkeys(files, b"x"))
    fs.mkdir(f"{prefix}/d/empty")
    with pytest.raises(FileNotFoundError):
        fs.rm(f"{prefix}/missing")
    with pytest.raises(IsADirectoryError):
        fs.rm(f"{prefix}/d")  # has files: needs recursive=True
    assert fs.find(prefix) == sorted(files)
    fs.rm(f"{prefix}/d/empty")  # an empty directory goes without recursive, like rmdir
    assert not fs.exists(f"{prefix}/d/empty")

    fs.rm(f"{prefix}/d", recursive=True, maxdepth=2)  # nothing deeper than 2 levels goes
    assert fs.find(prefix) == [f"{prefix}/d/e/f/c", f"{prefix}/keep"]
    fs.mkdir(f"{prefix}/d/e/marker")
    fs.rm(f"{prefix}/d", recursive=True)
    assert fs.find(prefix, withdirs=True) == [prefix, f"{prefix}/keep"]
    assert not fs.exists(f"{prefix}/d")

    fs.pipe({f"{prefix}/g/1.txt": b"1", f"{prefix}/g/2.txt": b"2", f"{prefix}/g/3.bin": b"3"})
    fs.rm(f"{prefix}/g/*.txt")
    assert fs.find(f"{prefix}/g") == [f"{prefix}/g/3.bin"]


def test_cp_and_mv(small: IosvcFileSystem, prefix: str) -> None:
    data = os.urandom(4 * CS + 5)
    small.pipe_file(f"{prefix}/src/big", data)
    small.cp_file(f"{prefix}/src/big", f"{prefix}/copy")
    assert small.cat_file(f"{prefix}/copy") == data
    small.mv(f"{prefix}/src", f"{prefix}/dst", recursive=True)
    assert not small.exists(f"{prefix}/src")
    assert small.cat_file(f"{prefix}/dst/big") == data


@pytest.mark.parametrize("size", [10, 5 * CS + 7], ids=["one-block", "many-blocks"])
def test_exception_in_with_leaves_nothing(small: IosvcFileSystem, prefix: str, size: int) -> None:
    path = f"{prefix}/f"
    with pytest.raises(RuntimeError), small.open(path, "wb") as f:
        f.write(os.urandom(size))  # more than a block: blocks already went to the servers
        raise RuntimeError("boom")
    assert not small.exists(path)
    # Over an existing file, the old version stays.
    small.pipe_file(path, b"old")
    with pytest.raises(RuntimeError), small.open(path, "wb") as f:
        f.write(os.urandom(size))
        raise RuntimeError("boom")
    assert small.cat_file(path) == b"old"


def test_write_visible_only_at_close(small: IosvcFileSystem, prefix: str) -> None:
    path = f"{prefix}/f"
    data = os.urandom(3 * CS)
    with small.open(path, "wb") as f:
        f.write(data)
        assert not small.exists(path)
    assert small.cat_file(path) == data
    with pytest.raises(FileExistsError):
        small.open(path, "xb")
    with small.open(f"{prefix}/new", "xb") as f:
        f.write(b"x")
    assert small.cat_file(f"{prefix}/new") == b"x"
    with pytest.raises(ValueError, match="'ab'"):
        small.open(path, "ab")  # no appends to an immutable version
    with pytest.raises(IsADirectoryError):
        small.open(prefix, "rb")
    with pytest.raises(FileNotFoundError):
        small.open(f"{prefix}/missing", "rb")


def test_transaction_commits_at_end(small: IosvcFileSystem, prefix: str) -> None:
    with small.transaction:
        for name in ("a", "b"):
            with small.open(f"{prefix}/{name}", "wb") as f:
                f.write(name.encode() * (2 * CS))
        assert not small.exists(f"{prefix}/a")  # closed, but not committed yet
    assert small.cat_file(f"{prefix}/b") == b"b" * (2 * CS)
    with pytest.raises(RuntimeError), small.transaction:
        with small.open(f"{prefix}/c", "wb") as f:
            f.write(b"c" * (2 * CS))
        raise RuntimeError("abandon the transaction")
    assert not small.exists(f"{prefix}/c")
    # A file given up inside a transaction that still commits, and one left open.
    with small.transaction:
        with pytest.raises(RuntimeError), small.open(f"{prefix}/d", "wb") as f:
            f.write(b"d" * (2 * CS))
            raise RuntimeError("give up this file only")
        left_open = small.open(f"{prefix}/e", "wb")
        left_open.write(b"e")
    assert not small.exists(f"{prefix}/d")
    assert small.cat_file(f"{prefix}/e") == b"e"


def test_reader_keeps_the_version_it_opened(small: IosvcFileSystem, prefix: str) -> None:
    path = f"{prefix}/f"
    old = os.urandom(CS // 2)
    small.pipe_file(path, old)
    with small.open(path, "rb") as f:
        small.pipe_file(path, b"new version")  # replaced (and the old chunks freed) meanwhile
        assert f.read(10) == old[:10]
        assert f.read() == old[10:]
    assert small.cat_file(path) == b"new version"


def test_reader_of_a_replaced_large_file_never_mixes(small: IosvcFileSystem, prefix: str) -> None:
    path = f"{prefix}/f"
    old = os.urandom(6 * CS)
    small.pipe_file(path, old)
    with small.open(path, "rb", cache_type="none") as f:
        first = f.read(CS)
        small.pipe_file(path, os.urandom(6 * CS))
        # The old version's chunks are freed at once (server), so the rest is either the old
        # bytes or a clear NotFound, never bytes of the new version.
        try:
            rest = f.read()
        except FileNotFoundError as exc:
            assert "replaced" in str(exc)
        else:
            assert first + rest == old


def test_cat_file_while_a_writer_keeps_replacing(small: IosvcFileSystem, prefix: str) -> None:
    path = f"{prefix}/hot"
    versions = [bytes([n]) * (4 * CS) for n in range(2)]
    small.pipe_file(path, versions[0])
    stop = threading.Event()

    def rewrite() -> None:
        n = 0
        while not stop.wait(0.005):
            n += 1
            small.pipe_file(path, versions[n % 2])

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(60):  # reading by name gets a whole current version, never an error
            assert small.cat_file(path) in versions
    finally:
        stop.set()
        writer.join()


def test_pickle_round_trip(fs: IosvcFileSystem, prefix: str) -> None:
    fs.pipe_file(f"{prefix}/f", b"pickled")
    blob = pickle.dumps(fs)
    IosvcFileSystem.clear_instance_cache()
    fs2 = pickle.loads(blob)
    assert fs2 is not fs and fs2 == fs
    assert fs2.cat_file(f"{prefix}/f") == b"pickled"
    with fs.open(f"{prefix}/f", "rb") as f:
        assert f.read(3) == b"pic"
        f2 = pickle.loads(pickle.dumps(f))  # an open reader reopens at its position
    assert f2.read() == b"kled"
    f2.close()


async def test_asynchronous_instance(cluster_file: str, prefix: str) -> None:
    fs = IosvcFileSystem(cluster=cluster_file, asynchronous=True, skip_instance_cache=True)
    await fs._pipe_file(f"{prefix}/a", b"async")
    assert await fs._cat_file(f"{prefix}/a", start=1) == b"sync"
    assert await fs._cat_ranges([f"{prefix}/a"], [0], [2]) == [b"as"]
    assert await fs._find(prefix) == [f"{prefix}/a"]
    await fs._rm(prefix, recursive=True)
    assert not await fs._exists(prefix)
    await fs.client.close()


def test_entry_point_without_importing_iosvc(
    cluster_file: str, fs: IosvcFileSystem, prefix: str
) -> None:
    fs.pipe_file(f"{prefix}/hello", b"from the parent")
    script = f"""
import sys
import fsspec
assert not any(m == "iosvc" or m.startswith("iosvc.") for m in sys.modules)
fs = fsspec.filesystem("iosvc")
assert type(fs).__module__ == "iosvc.client._fs", type(fs)
assert fs.cat_file("{prefix}/hello") == b"from the parent"
with fsspec.open("iosvc://{prefix}/child", "wb") as f:
    f.write(b"from the child")
"""
    env = {**os.environ, "IOSVC_CLUSTER": cluster_file}
    subprocess.run([sys.executable, "-W", "error", "-c", script], env=env, check=True, timeout=60)
    assert fs.cat_file(f"{prefix}/child") == b"from the child"

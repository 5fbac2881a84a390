"""Unit tests of the root modules: wire frames, errors, identity, placement, stores."""

from __future__ import annotations

import asyncio
import os
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_dataloaders.helpers import tmpfs

from iosvc import wire
from iosvc.errors import (
    ERROR_BY_CODE,
    ERROR_BY_NAME,
    InvalidArgument,
    IosvcError,
    NotFound,
    QuotaExceeded,
)
from iosvc.identity import JobIdentity
from iosvc.placement import Placement, normalize_path, validate_path
from iosvc.server import ByteRange, ChunkStore, LocalDirStore, MemoryStore


# ------------------------------------------------------------------ wire
@given(
    header=st.dictionaries(st.text(max_size=10), st.integers(-(2**63), 2**64 - 1) | st.text()),
    payload=st.binary(),
)
def test_frames_round_trip(header: dict[str, object], payload: bytes) -> None:
    got, view = wire.unpack(wire.pack(header, payload))
    assert got == header and bytes(view) == payload


@given(st.binary(max_size=64))
def test_garbage_frames_raise_invalid_argument_only(frame: bytes) -> None:
    try:
        header, _ = wire.unpack(frame)
    except InvalidArgument:
        return
    assert isinstance(header, dict)


def test_every_error_names_a_grpc_code_and_round_trips_by_name() -> None:
    import grpc

    for name, cls in ERROR_BY_NAME.items():
        assert issubclass(cls, IosvcError) and cls.__name__ == name
        assert grpc.StatusCode[cls.grpc_code]
    assert ERROR_BY_CODE["NOT_FOUND"] is NotFound
    assert issubclass(QuotaExceeded, OSError) and QuotaExceeded("x").errno == 28
    assert str(NotFound("gone")) == "gone"


# -------------------------------------------------------------- identity
def test_identity_precedence_iosvc_then_slurm_then_process() -> None:
    slurm = {"SLURM_JOB_ID": "123", "SLURM_JOB_NUM_NODES": "8", "SLURM_JOB_USER": "bob"}
    ident = JobIdentity.from_env(slurm)
    assert (ident.job_id, ident.user, ident.nodes) == ("123", "bob", 8)
    override = {**slurm, "IOSVC_JOB_ID": "A", "IOSVC_USER": "alice", "IOSVC_NODES": "2"}
    ident = JobIdentity.from_env({**override, "IOSVC_GROUP": "climate"})
    assert ident == JobIdentity("A", "alice", "climate", 2)
    assert JobIdentity.from_env({}).job_id == "interactive"


@pytest.mark.parametrize(
    "env", [{"IOSVC_NODES": "many"}, {"IOSVC_NODES": "0"}, {"IOSVC_USER": "a/b"}]
)
def test_identity_rejects_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        JobIdentity.from_env(env)


def test_identity_wire_form() -> None:
    ident = JobIdentity("j", "u", "g", 3)
    assert JobIdentity.from_wire(ident.to_wire()) == ident
    for bad in (None, [], ["j", "u", "g"], ["j", "u", "g", "3"], ["j", "", "g", 1]):
        with pytest.raises(ValueError):
            JobIdentity.from_wire(bad)


# ------------------------------------------------------------- placement
segment = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=20)


@given(st.lists(segment, min_size=1, max_size=6))
def test_normalize_accepts_clean_paths(parts: list[str]) -> None:
    path = "/".join(parts)
    if any(p in (".", "..") for p in parts):
        with pytest.raises(InvalidArgument):
            normalize_path(path)
    else:
        assert normalize_path("/" + path + "/") == path == validate_path(path)


def test_home_is_deterministic_and_balanced() -> None:
    placement = Placement(4)
    homes = Counter(placement.home(f"data/file-{i}") for i in range(8000))
    assert set(homes) == {0, 1, 2, 3}
    assert min(homes.values()) > 1700  # ~2000 each
    assert placement.home("x/y") == Placement(4).home("x/y")


def test_adding_a_server_moves_about_one_in_n_files() -> None:
    paths = [f"f/{i}" for i in range(6000)]
    before = Placement(4)
    after = Placement(5)
    moved = sum(before.home(p) != after.home(p) for p in paths)
    assert 0.12 < moved / len(paths) < 0.28  # ~1/5, not a full reshuffle
    # files that moved went to the new server
    assert all(after.home(p) == 4 for p in paths if before.home(p) != after.home(p))


def test_chunks_round_robin_from_home() -> None:
    placement = Placement(3)
    assert [placement.chunk_server(2, i) for i in range(5)] == [2, 0, 1, 2, 0]


# ---------------------------------------------------------------- stores
class ChunkStoreContract:
    """Behaviour every ChunkStore shares; subclasses provide ``make``."""

    def make(self, tmp_path: Path, capacity: int | None = None) -> ChunkStore:
        raise NotImplementedError

    def test_set_get_range_delete(self, tmp_path: Path) -> None:
        async def go() -> None:
            store = self.make(tmp_path)
            await store.set("c/0/aaaaaaaa/0", b"0123456789")
            assert await store.get("c/0/aaaaaaaa/0") == b"0123456789"
            assert await store.get("c/0/aaaaaaaa/0", ByteRange(2, 3)) == b"234"
            assert await store.exists("c/0/aaaaaaaa/0")
            assert [k async for k in store.list("c/")] == ["c/0/aaaaaaaa/0"]
            assert store.used_bytes == 10
            assert await store.delete("c/0/aaaaaaaa/0") == 10
            assert store.used_bytes == 0
            assert await store.delete("c/0/aaaaaaaa/0") == 0
            with pytest.raises(NotFound):
                await store.get("c/0/aaaaaaaa/0")

        asyncio.run(go())

    def test_capacity_is_enospc_and_keeps_old_data(self, tmp_path: Path) -> None:
        async def go() -> None:
            store = self.make(tmp_path, capacity=100)
            await store.set("m/a", b"x" * 60)
            with pytest.raises(QuotaExceeded):
                await store.set("m/b", b"y" * 60)
            assert await store.get("m/a") == b"x" * 60
            assert not await store.exists("m/b")
            await store.set("m/a", b"z" * 100)  # replacing counts only the difference
            assert store.used_bytes == 100

        asyncio.run(go())


class TestMemoryStore(ChunkStoreContract):
    def make(self, tmp_path: Path, capacity: int | None = None) -> ChunkStore:
        return MemoryStore(capacity)


class TestLocalDirStore(ChunkStoreContract):
    def make(self, tmp_path: Path, capacity: int | None = None) -> ChunkStore:
        return LocalDirStore(tmp_path / "store", capacity)

    def test_survives_reopen_and_drops_half_written_temp_files(self, tmp_path: Path) -> None:
        async def go() -> None:
            store = LocalDirStore(tmp_path / "s")
            await store.set("c/1/bbbbbbbb/3", os.urandom(1000))
            (tmp_path / "s" / ".tmp" / "partial").write_bytes(b"half")
            again = LocalDirStore(tmp_path / "s")
            assert [k async for k in again.list()] == ["c/1/bbbbbbbb/3"]
            assert again.used_bytes == 1000
            assert not (tmp_path / "s" / ".tmp" / "partial").exists()

        asyncio.run(go())

    def test_full_disk_is_quota_exceeded_and_keeps_old_data(self, tiny_fs: Path) -> None:
        async def go() -> None:
            store = LocalDirStore(tiny_fs / "s")  # no configured capacity: the disk is the limit
            await store.set("c/0/cccccccc/0", b"k" * 1000)
            with pytest.raises(QuotaExceeded, match="disk full"):
                await store.set("c/0/cccccccc/1", os.urandom(4 << 20))
            assert await store.get("c/0/cccccccc/0") == b"k" * 1000
            assert not await store.exists("c/0/cccccccc/1")
            assert list((tiny_fs / "s" / ".tmp").iterdir()) == []  # no half-written leftovers

        asyncio.run(go())


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), to fill a disk for real. Needs root, as in CI."""
    with tmpfs(tmp_path / "tiny", "size=1m") as mount:
        yield mount

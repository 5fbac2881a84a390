"""Fixtures of the dataloaders tests: datasets on local disk, memory:// and a real iosvc cluster."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import dataloaders

from .helpers import make_samples


@pytest.fixture
def local_url(tmp_path: Path) -> str:
    return str(tmp_path / "ds")


@pytest.fixture
def iosvc_url(use_cluster: str, prefix: str) -> Iterator[str]:
    """A fresh ``iosvc://`` directory on the session cluster (IOSVC_CLUSTER points at it)."""
    import fsspec

    yield f"iosvc://{prefix}/ds"
    fs = fsspec.filesystem("iosvc")
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


@pytest.fixture
def memory_url() -> Iterator[str]:
    import fsspec

    name = f"/dl-{uuid.uuid4().hex[:10]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


@pytest.fixture(params=["local", "memory", "iosvc"])
def any_url(request: pytest.FixtureRequest) -> str:
    """The same test on a local path, ``memory://`` and ``iosvc://``."""
    name = {"local": "local_url", "memory": "memory_url", "iosvc": "iosvc_url"}[request.param]
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def small_dataset(local_url: str) -> str:
    """300 samples in ~12 raw shards on local disk."""
    dataloaders.write_shards(make_samples(300), local_url, shard_bytes=32 << 10)
    return local_url


@pytest.fixture(scope="session", autouse=True)
def buffer_dir() -> Iterator[str]:
    """Remote readers' slot files (dataloaders._slots) in a directory of this test process,
    removed at the end, instead of the user's ``/dev/shm/dataloaders-<uid>``."""
    import os
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    top = tempfile.mkdtemp(prefix="dataloaders-test-", dir=base)
    path = os.path.join(top, "slots")
    old = os.environ.get("DATALOADERS_BUFFER_DIR")
    os.environ["DATALOADERS_BUFFER_DIR"] = path
    yield path
    if old is None:
        del os.environ["DATALOADERS_BUFFER_DIR"]
    else:
        os.environ["DATALOADERS_BUFFER_DIR"] = old
    shutil.rmtree(top, ignore_errors=True)

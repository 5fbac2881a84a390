"""Two local "sites" (directories standing in for two clusters), a catalog, and a dataset."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iosvc.staging import Catalog, Stager, load_sites


@dataclass
class World:
    root: Path
    sites_file: Path
    catalog_file: Path
    catalog: Catalog
    stager: Stager

    def site_dir(self, name: str) -> Path:
        return self.root / name

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "IOSVC_SITES": str(self.sites_file),
            "IOSVC_CATALOG": str(self.catalog_file),
            "COLUMNS": "200",  # rich wraps tables to the terminal width
        }


def make_dataset(directory: Path, files: int = 40, large: int = 1) -> dict[str, bytes]:
    """Small files of varied sizes, a few empty and nested ones, and ``large`` streamed ones."""
    content: dict[str, bytes] = {}
    for i in range(files):
        content[f"part-{i // 10}/f{i:03d}.bin"] = os.urandom((i * 997) % 20_000)
    for i in range(large):
        content[f"large/big{i}.bin"] = os.urandom(6 * 1024 * 1024 + i)
    for rel, data in content.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return content


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    buffer = getattr(request, "param", None) or "iosvc:///staging-tests/buffer"
    for name in ("alpha", "beta", "gamma"):
        (tmp_path / name).mkdir()
    sites_file = tmp_path / "sites.toml"
    sites_file.write_text(
        f"""
[sites.alpha]
url = "file://{tmp_path}/alpha"
[sites.beta]
url = "{tmp_path}/beta"
buffer = "{buffer}"
[sites.gamma]
url = "{tmp_path}/gamma"
"""
    )
    catalog_file = tmp_path / "catalog.db"
    with Catalog(catalog_file) as catalog:
        yield World(
            tmp_path, sites_file, catalog_file, catalog, Stager(catalog, load_sites(sites_file))
        )

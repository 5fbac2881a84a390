"""Helpers of the dataloaders tests.

This package is ``tests/test_dataloaders`` rather than ``tests/dataloaders``: pytest puts
``tests/`` on ``sys.path``, where a directory named ``dataloaders`` would shadow the package.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def make_samples(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Image-like samples: incompressible bytes (as JPEG), a label and the sample's id."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, int(rng.integers(200, 2000)), dtype=np.uint8).tobytes(),
            "label": int(rng.integers(0, 10)),
            "id": i,
        }
        for i in range(n)
    ]


def smooth_field(n: int, shape: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """``n`` smooth float32 fields (climate-like: sines plus a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    base = 280 + 10 * (np.sin(x / 15) + 0.7 * np.cos(y / 9.7))
    out = base[None] + np.arange(n, dtype=np.float32)[:, None, None] * 0.01
    out += rng.normal(0, 0.05, size=out.shape).astype(np.float32)
    return out.astype(np.float32)


def ids_of(batches: Any) -> list[int]:
    out: list[int] = []
    for batch in batches:
        ids = batch["id"]
        out += [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    return out


def corrupt(path: str | os.PathLike[str], offset: int = 10) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def checked_images(loader: Any, samples: list[dict[str, Any]]) -> int:
    """Samples in one epoch of ``loader``'s batches, each image checked against ``samples``."""
    got = 0
    for batch in loader:
        for i, image in zip(batch["id"].tolist(), batch["image"], strict=True):
            assert image == samples[i]["image"]
            got += 1
    return got


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mount`` for the block; the test is skipped where it cannot be
    (not root, or root without CAP_SYS_ADMIN as in some containers)."""
    mount.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def collapse_supported() -> bool:
    """Whether this kernel collapses tmpfs files into huge pages (``MADV_COLLAPSE``, 6.1)."""
    release = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
    try:
        shmem = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
    except OSError:
        return False
    return sys.platform == "linux" and release >= (6, 1) and "[deny]" not in shmem


needs_collapse = pytest.mark.skipif(
    not collapse_supported(),
    reason="this kernel cannot collapse tmpfs files into huge pages (Linux < 6.1)",
)

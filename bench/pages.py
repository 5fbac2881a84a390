"""What a buffer directory's page size costs: filling and mapping a 64 MiB file on
``/dev/shm`` (tmpfs, 4 KiB pages), on ``/dev/shm`` the way readers make their slots there
(collapsed into 2 MiB pages and mapped at aligned addresses, ``dataloaders/_huge.py``), on a
tmpfs mounted with ``huge=within_size`` (2 MiB pages; this script mounts one, root needed)
and on local disk (the page cache, which ext4 fills with large folios).

    python bench/pages.py [--json bench/results/pages.json]

Per place, the median of ``REPEATS`` runs of: ``fill_mapped`` (a new slot's way:
``posix_fallocate`` then writing through a shared mapping, as a socket's ``recv_into``
does), ``refill_mapped`` (the same into the existing file: a slot reused), ``fill_write``
(``write()`` of the bytes) and ``map_read`` (a fresh read-only mapping of the file, hashed
whole with xxh3 as a block check reads it, then unmapped: what a node cache hit or an
in-place read costs), each with its page faults. Ratios are to the huge-page tmpfs, in the
same run. Why it matters: ``dataloaders/_huge.py``, ``dataloaders/_slots.py``
(``tmpfs_huge_pages``) and README ("Huge pages").
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from dataloaders._huge import collapse_new_range, map_aligned

SIZE = 64 << 20
REPEATS = 7
COLLAPSED = "/dev/shm, collapsed"  # as dataloaders' slots are made there


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(step: Callable[[], None]) -> tuple[float, int]:
    f0, t0 = _faults(), time.perf_counter()
    step()
    return time.perf_counter() - t0, _faults() - f0


def measure(directory: Path, data: bytes, *, collapse: bool = False) -> dict[str, Any]:
    """The three steps on a file in ``directory``: median seconds and faults of each; with
    ``collapse``, new files are collapsed into huge pages first and mapped aligned."""
    path = directory / "pages-bench"
    out: dict[str, list[tuple[float, int]]] = {
        "fill_mapped": [],
        "refill_mapped": [],
        "fill_write": [],
        "map_read": [],
    }

    def new_file() -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        if collapse:
            os.ftruncate(fd, SIZE)
            collapse_new_range(fd, 0, SIZE)
        return fd

    def mapped(fd: int, **options: Any) -> mmap.mmap:
        make = functools.partial(mmap.mmap, fd, 0 if options else SIZE, **options)
        return map_aligned(make, SIZE) if collapse else make()

    def fill_mapped() -> None:
        fd = new_file()
        try:
            os.posix_fallocate(fd, 0, SIZE)
            with mapped(fd) as m:
                m[:] = data
        finally:
            os.close(fd)

    def refill_mapped() -> None:  # a slot reused: its pages exist
        fd = os.open(path, os.O_RDWR)
        try:
            with mapped(fd) as m:
                m[:] = data
        finally:
            os.close(fd)

    def fill_write() -> None:
        fd = new_file()
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)

    def map_read() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            with mapped(fd, access=mmap.ACCESS_READ) as m:
                xxhash.xxh3_64_intdigest(m)
        finally:
            os.close(fd)

    for _ in range(REPEATS):
        for name, step in (("fill_mapped", fill_mapped), ("fill_write", fill_write)):
            path.unlink(missing_ok=True)
            out[name].append(_timed(step))
            out["map_read"].append(_timed(map_read))
        out["refill_mapped"].append(_timed(refill_mapped))
    path.unlink(missing_ok=True)
    return {
        name: {
            "seconds": statistics.median(t for t, _ in runs),
            "faults": statistics.median(f for _, f in runs),
            "seconds_runs": [t for t, _ in runs],
        }
        for name, runs in out.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    data = os.urandom(SIZE)
    work = Path(tempfile.mkdtemp(prefix="bench-pages-"))
    places: dict[str, Path] = {"local disk": work / "disk"}
    places["local disk"].mkdir()
    if os.path.isdir("/dev/shm"):
        places["/dev/shm"] = Path(tempfile.mkdtemp(prefix="bench-pages-", dir="/dev/shm"))
        places[COLLAPSED] = places["/dev/shm"]
    huge = work / "huge"
    huge.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "huge=within_size,size=1g", "tmpfs", str(huge)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    if mounted:
        places["tmpfs huge=within_size"] = huge
    results: dict[str, Any] = {}
    try:
        for name, directory in places.items():
            results[name] = measure(directory, data, collapse=name == COLLAPSED)
    finally:
        if mounted:
            subprocess.run(["umount", str(huge)], check=False)
        for directory in set(places.values()):
            subprocess.run(["rm", "-rf", str(directory)], check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    base = results.get("tmpfs huge=within_size")
    print(f"{'place':24} {'step':12} {'ms':>7} {'faults':>7}  vs huge tmpfs")
    for name, steps in results.items():
        for step, cell in steps.items():
            ratio = cell["seconds"] / base[step]["seconds"] if base else None
            cell["vs_huge_tmpfs"] = ratio
            print(
                f"{name:24} {step:12} {cell['seconds'] * 1e3:7.1f} {cell['faults']:7.0f}"
                + (f"  {ratio:.1f}x" if ratio else "  (no huge tmpfs: not root?)")
            )
    if args.json:
        doc = {"benchmark": "pages", "file_bytes": SIZE, "repeats": REPEATS, "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

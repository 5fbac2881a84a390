"""What huge pages cost and save a server writing chunk files on ``/dev/shm``.

A ``--dir`` store on a tmpfs without ``huge=`` writes chunks of 2 MiB and more into huge
pages (``iosvc.server._stores``, collapsed while the file is empty), so that same-host
readers map them whole. This measures the server's side of that, with ``LocalDirStore``
itself in this process (no network, no client):

- **fill**: ``--gib`` GiB of new 2 MiB chunks into an empty store, rate per GiB written:
  memory the kernel has to find and zero, and on a VM whose host takes free memory back
  (free page reporting) memory the host must back again;
- **rewrite**: the same keys written again (each write a new file renamed over the old
  one, whose pages are freed as the next is needed): recycled memory.

Each mode runs twice, alternating (4 KiB, collapsed, 4 KiB, collapsed), with a pause
between runs so that freed memory settles.

    .venv/bin/python bench/store_fill.py --json bench/results/store_fill.json   # ~2 min
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json

MiB = 1 << 20
CHUNK = 2 * MiB + 8  # a 2 MiB chunk and its checksum trailer, as servers store it


def run(where: str, gib: int, collapse: bool) -> dict[str, list[float]]:
    """MiB/s of each GiB of the fill, and of the rewrite."""
    from iosvc.server._stores import LocalDirStore

    root = Path(tempfile.mkdtemp(prefix="iosvc-store-fill-", dir=where))
    try:
        store = LocalDirStore(root / "store")
        if collapse and not store._collapse:
            raise SystemExit(f"{where}: not a tmpfs whose files this kernel can collapse")
        store._collapse = collapse
        value = os.urandom(CHUNK)
        per_gib = 512  # chunks
        out: dict[str, list[float]] = {"fill": [], "rewrite": []}
        for phase in out:
            t0 = time.perf_counter()
            for i in range(gib * per_gib):
                store._write(f"c/0/v/{i}", value)
                if (i + 1) % per_gib == 0:
                    out[phase].append(1024 / (time.perf_counter() - t0))
                    t0 = time.perf_counter()
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/dev/shm", help="a tmpfs without huge= (default /dev/shm)")
    ap.add_argument("--gib", type=int, default=3, help="GiB written per fill (default 3)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    console = Console()
    load = os.getloadavg()
    runs: dict[str, list[dict[str, list[float]]]] = {"4 KiB pages": [], "collapsed": []}
    for _ in range(2):
        for mode in runs:
            time.sleep(5)
            runs[mode].append(run(args.dir, args.gib, mode == "collapsed"))
    table = Table(title=f"LocalDirStore writes of 2 MiB chunks in {args.dir}, MiB/s")
    for column in ("pages", "fill: GiB 1", "fill: last GiB", "fill median", "rewrite median"):
        table.add_column(column, justify="left" if column == "pages" else "right")
    results: dict[str, Any] = {}
    for mode, done in runs.items():
        fill = [r for d in done for r in d["fill"]]
        rewrite = [r for d in done for r in d["rewrite"]]
        results[mode] = {
            "fill_mib_s": statistics.median(fill),
            "rewrite_mib_s": statistics.median(rewrite),
            "runs": done,
        }
        first = statistics.median(d["fill"][0] for d in done)
        last = statistics.median(d["fill"][-1] for d in done)
        table.add_row(
            mode,
            f"{first:.0f}",
            f"{last:.0f}",
            f"{statistics.median(fill):.0f}",
            f"{statistics.median(rewrite):.0f}",
        )
    console.print(table)
    write_json(
        args.json,
        {"dir": args.dir, "gib": args.gib, "machine": machine(load), "results": results},
        console,
    )


if __name__ == "__main__":
    main()

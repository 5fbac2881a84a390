"""Chunk (stripe) size: large writes and reads at 1, 2 and 4 MiB chunks, in the same run.

Why: the default chunk size decides how every file is striped. Session 10 moved it from
1 MiB to 2 MiB, one huge page, so that a server on a tmpfs keeps chunk files in huge pages
that a same-host reader maps whole (``iosvc.server._stores``, ``iosvc.client._mapped``).
This benchmark checks that the network transports do not pay for that:

- one ``LocalCluster(2, memory=...)``, one client per chunk size and transport (the data
  port, ``iosvc.dataplane``, and gRPC only, as TLS clusters use);
- each repeat writes ``--size`` bytes with ``AsyncClient.write`` and reads them back with
  ``read_into`` through a reused 64 MiB window, for every chunk size in turn (each size
  first in turn), so that machine noise falls on all of them alike; a first round warms
  up and is not kept;
- the table gives medians, and ratios to 1 MiB chunks of the same transport.

The in-place read that motivated the change is measured by ``bench/dataloader.py``
(``iosvc-remote-dir``).

    .venv/bin/python bench/chunk_size.py --json bench/results/chunk_size.json   # ~4 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json

MiB = 1 << 20
SIZES = (1, 2, 4)  # MiB
TRANSPORTS = {"data port": "1", "gRPC": "0"}  # IOSVC_DATA_PLANE, read at client construction


Rates = dict[str, dict[int, dict[str, list[float]]]]


async def measure(spec: Any, size: int, repeats: int) -> Rates:
    """GB/s of each write and read, per transport and chunk size."""
    from iosvc.client import AsyncClient

    clients: dict[str, dict[int, AsyncClient]] = {}
    for transport, flag in TRANSPORTS.items():
        os.environ["IOSVC_DATA_PLANE"] = flag
        try:
            clients[transport] = {m: AsyncClient(spec, chunk_size=m * MiB) for m in SIZES}
        finally:
            del os.environ["IOSVC_DATA_PLANE"]
    data = os.urandom(size)
    window = bytearray(64 * MiB)
    rates: Rates = {t: {m: {"write": [], "read": []} for m in SIZES} for t in TRANSPORTS}
    for rep in range(repeats + 1):  # the first round warms up, and is not kept
        for transport, by_size in clients.items():
            turn = rep % len(SIZES)  # each size in turn goes first
            for m in [*SIZES[turn:], *SIZES[:turn]]:
                client = by_size[m]
                path = f"bench/chunk-size/{m}"
                t0 = time.perf_counter()
                await client.write(path, data)
                write_s = time.perf_counter() - t0
                info = await client.info(path)
                assert info["chunk_size"] == m * MiB
                t0 = time.perf_counter()
                for start in range(0, size, len(window)):
                    await client.read_into(info, window, start)
                read_s = time.perf_counter() - t0
                if window[: 1 << 16] != data[size - len(window) : size - len(window) + (1 << 16)]:
                    raise AssertionError(f"{path}: read back other bytes")
                await client.rm([path])  # freed after the servers' drop grace
                if rep:
                    rates[transport][m]["write"].append(size / write_s / 1e9)
                    rates[transport][m]["read"].append(size / read_s / 1e9)
    return rates


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1 << 30, help="bytes per file (default 1 GiB)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.size % (64 * MiB):
        ap.error("--size must be a multiple of 64 MiB")

    import uvloop

    from iosvc.server import LocalCluster

    console = Console()
    load = os.getloadavg()
    # Room for every version a repeat writes while removed ones wait out the drop grace.
    room = (args.repeats + 1) * len(SIZES) * len(TRANSPORTS) * args.size  # a cap, not memory
    with LocalCluster(2, memory=room) as cluster:
        assert cluster.spec is not None
        rates = uvloop.run(measure(cluster.spec, args.size, args.repeats))

    table = Table(title=f"{args.size / MiB:.0f} MiB per file, medians of {args.repeats}")
    for column in ("transport", "chunk", "write GB/s", "x 1 MiB", "read GB/s", "x 1 MiB"):
        table.add_column(column, justify="left" if column == "transport" else "right")
    results: dict[str, Any] = {}
    for transport, by_size in rates.items():
        base = {op: statistics.median(by_size[1][op]) for op in ("write", "read")}
        for m, samples in by_size.items():
            row = {op: statistics.median(samples[op]) for op in ("write", "read")}
            ratio = {op: row[op] / base[op] for op in row}
            results.setdefault(transport, {})[f"{m}MiB"] = {
                "write_gbps": row["write"],
                "read_gbps": row["read"],
                "write_vs_1MiB": ratio["write"],
                "read_vs_1MiB": ratio["read"],
                "samples": samples,
            }
            table.add_row(
                transport,
                f"{m} MiB",
                f"{row['write']:.2f}",
                f"{ratio['write']:.2f}",
                f"{row['read']:.2f}",
                f"{ratio['read']:.2f}",
            )
    console.print(table)
    write_json(
        args.json,
        {"size": args.size, "repeats": args.repeats, "machine": machine(load), "results": results},
        console,
    )


if __name__ == "__main__":
    main()

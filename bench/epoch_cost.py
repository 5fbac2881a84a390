"""What one reader's epoch costs, from local disk, in place and over the network.

One process reads each epoch (``dataloaders.StreamingDataset`` in a ``DataLoader`` without
workers, node cache off), so an epoch's cost is that reader's and the servers' alone, without
the noise of worker processes. The datasets are ``bench/dataloader.py``'s (``arrays``,
``images``), each written three times:

- **local**: to a directory of local disk;
- **in place**: to 2 servers with a ``--dir`` store on ``/dev/shm``, on this host: the reader
  maps their chunk files (``AsyncClient.read_files``);
- **network**: to 2 servers with DRAM stores: every byte over their data ports.

Epochs rotate local / in place / network for ``--rounds`` rounds, each in a fresh process
(start-up included: client, manifest, first lookups). Each records wall seconds, the
reader's CPU seconds and the servers' CPU seconds (``/proc``); ratios are to the local epoch
of the same round (medians over the rounds). Imports are done before the clock starts. On
this project's 2-core VM the servers share
the reader's cores, so their CPU slows it: the columns say where an epoch's CPU went.

    .venv/bin/python bench/epoch_cost.py --json bench/results/epoch_cost.json   # ~4 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json

SYSTEMS = ("local", "in place", "network")
BATCH = 256


def child(url: str) -> None:
    """One epoch of ``url``; prints its wall and CPU seconds and its sample count."""
    import dataloaders

    # Imports (torch's ~1.5 s) before the clock: the epoch is what is measured.
    dataset_class, loader_class = dataloaders.StreamingDataset, dataloaders.DataLoader
    if url.startswith("iosvc://"):
        import iosvc.client  # noqa: F401
    t0, cpu0 = time.perf_counter(), time.process_time()
    ds = dataset_class(url, seed=0, node_cache=False)
    samples = 0
    for batch in loader_class(ds, batch_size=BATCH, num_workers=0):
        samples += len(batch["label"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "n": samples}))


def _cpu_s(pids: tuple[int, ...]) -> float:
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def epoch(url: str, env: dict[str, str], pids: tuple[int, ...]) -> dict[str, float]:
    before = _cpu_s(pids)
    done = subprocess.run(
        [sys.executable, __file__, "--child", url],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    got: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    got["servers_cpu_s"] = _cpu_s(pids) - before
    return got


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="epochs per system (default 5)")
    ap.add_argument("--datasets", nargs="+", default=["arrays", "images"])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return
    import dataloader as bench

    from iosvc.server import LocalCluster

    console = Console()
    load = os.getloadavg()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="iosvc-epoch-cost-") as work,
        tempfile.TemporaryDirectory(prefix="iosvc-epoch-cost-", dir="/dev/shm") as shm,
        LocalCluster(2, directory=Path(shm) / "store", workdir=Path(work) / "dir") as in_place,
        LocalCluster(2, workdir=Path(work) / "mem") as network,
    ):
        clusters = {"in place": in_place, "network": network}
        envs = {"local": env}
        for name, cluster in clusters.items():
            assert cluster.spec is not None
            spec_file = Path(work) / f"{name.replace(' ', '-')}.json"
            cluster.spec.save(spec_file)
            envs[name] = {**env, "IOSVC_CLUSTER": str(spec_file)}
        pids = {
            "local": (),
            **{name: c.spec.pids for name, c in clusters.items() if c.spec is not None},
        }
        for dataset in args.datasets:
            n = bench.sizes(False)[dataset]
            urls = {
                "local": f"{work}/{dataset}",
                "in place": f"iosvc://bench/{dataset}",
                "network": f"iosvc://bench/{dataset}",
            }
            for system, url in urls.items():
                code = f"import dataloader as b; b.write_ours({dataset!r}, {n}, {url!r})"
                subprocess.run(
                    [sys.executable, "-c", code],
                    env={**envs[system], "PYTHONPATH": str(Path(__file__).parent)},
                    check=True,
                )
            runs: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
            for _ in range(args.rounds):
                for system in SYSTEMS:
                    runs[system].append(epoch(urls[system], envs[system], pids[system]))
            cells: dict[str, Any] = {}
            for system in SYSTEMS:
                mine = runs[system]
                cell: dict[str, Any] = {
                    key: statistics.median(r[key] for r in mine)
                    for key in ("wall_s", "cpu_s", "servers_cpu_s")
                }
                cell["samples_per_s"] = n / cell["wall_s"]
                cell["runs"] = mine
                if system != "local":
                    pairs = zip(mine, runs["local"], strict=True)
                    cell["paired_rate_ratio_to_local"] = statistics.median(
                        loc["wall_s"] / r["wall_s"] for r, loc in pairs
                    )
                cells[system] = cell
            results[dataset] = cells
            table = Table(title=f"{dataset}: one reader's epoch ({n:,} samples), medians")
            for column in ("system", "samples/s", "reader CPU s", "servers CPU s", "rate/local"):
                table.add_column(column, justify="left" if column == "system" else "right")
            for system, cell in cells.items():
                ratio = cell.get("paired_rate_ratio_to_local")
                table.add_row(
                    system,
                    f"{cell['samples_per_s']:,.0f}",
                    f"{cell['cpu_s']:.2f}",
                    f"{cell['servers_cpu_s']:.2f}",
                    "" if ratio is None else f"{ratio:.2f}x",
                )
            console.print(table)
    write_json(
        args.json,
        {"rounds": args.rounds, "batch_size": BATCH, "machine": machine(load), "results": results},
        console,
    )


if __name__ == "__main__":
    main()

"""Cluster-wide fairness: shares of the aggregate, not of each server.

    .venv/bin/python bench/cluster_fairness.py --json bench/results/cluster_fairness.json
    .venv/bin/python bench/cluster_fairness.py --quick

Two servers, each with an emulated device (``--device-bandwidth``, 200 MB/s), and two jobs
that both keep their servers busy: job A reads a file striped over both servers, job B reads
files that all live on server 0. With a policy of ``scope = "server"`` (ThemisIO's model) each
server splits its own bandwidth, so A gets half of server 0 and all of server 1: three times
B under job-fair. With ``scope = "cluster"`` the servers exchange what they granted each job
and charge it (``FairScheduler.charge``), so A yields server 0 to B and both get one server's
worth: the max-min fair split of the aggregate.

Each case runs the same client processes (one per job, ``--streams`` reads in flight) on a
fresh cluster; the shares come from the servers' own grant counters (``stats``) over the
window after ``--warmup``. Expected shares are the max-min fair split of the aggregate given
which servers each job can use; the table reports them next to the achieved ones.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, write_json
from rich.console import Console
from rich.table import Table

from iosvc.client import Client
from iosvc.identity import JobIdentity
from iosvc.server import LocalCluster

MiB = 1 << 20


def _reader(cluster_file: str, identity: list[Any], paths: list[str], streams: int) -> None:
    """One job's client process: ``streams`` whole-file reads in flight, forever."""
    import uvloop

    from iosvc.client import AsyncClient

    async def main() -> None:
        client = AsyncClient(cluster_file, identity=JobIdentity.from_wire(identity))
        infos = [await client.info(p) for p in paths]
        buffer = bytearray(max(i["size"] for i in infos))

        async def stream(k: int) -> None:
            n = k
            while True:
                await client.read_into(infos[n % len(infos)], buffer)
                n += streams

        await asyncio.gather(*(stream(k) for k in range(streams)))

    uvloop.run(main())


def _granted(client: Client) -> dict[str, list[int]]:
    """Bytes each job was granted so far, per server."""
    out: dict[str, list[int]] = {}
    for server, reply in enumerate(client.call_all({"op": "stats"})):
        for row in reply["jobs"]:
            out.setdefault(row[0], [0] * client.aio.n_servers)[server] += row[4]
    return out


def _expected(
    weights: dict[str, float], striped: dict[str, bool], scope: str
) -> tuple[dict[str, float], float]:
    """Shares each job should get, and the aggregate in servers' worth of bandwidth.

    A striped job reads whole files, so it moves the same bytes from both servers: its rate
    on server 1 equals its rate on server 0 (it cannot run ahead on one server). One-server
    jobs use server 0 only, so server 0 is the bottleneck of every job.

    * ``scope = "server"``: server 0 splits by the weights of the jobs there; a striped job
      then moves as much again on server 1.
    * ``scope = "cluster"``: the aggregate is split by weight. Every job touches server 0, so
      the weighted share of the aggregate is what max-min fairness gives.
    """
    total = sum(weights.values())
    half = sum(w / 2 for j, w in weights.items() if striped[j])
    pinned = sum(w for j, w in weights.items() if not striped[j])
    if scope == "cluster":
        per_weight = 1 / (pinned + half) if pinned else 2 / total
        rates = {j: w * per_weight for j, w in weights.items()}
    else:
        # Every job is on server 0, which splits by weight; a striped job moves as much again
        # on server 1 (with only striped jobs, both servers simply split by weight).
        rates = {j: (2 if striped[j] else 1) * w / total for j, w in weights.items()}
    aggregate = sum(rates.values())
    return {j: r / aggregate for j, r in rates.items()}, aggregate


def run_case(
    name: str,
    policy: dict[str, Any],
    jobs: dict[str, tuple[int, bool]],
    args: argparse.Namespace,
    root: Path,
) -> dict[str, Any]:
    """``jobs``: name -> (nodes, striped). Returns the achieved and expected shares."""
    workdir = root / name
    server_args = ["--device-bandwidth", str(args.device_bandwidth)]
    with LocalCluster(2, memory=1 << 30, workdir=workdir, server_args=server_args) as cluster:
        assert cluster.spec is not None
        cluster_file = workdir / "cluster.json"
        cluster.spec.save(cluster_file)
        admin = Client(cluster.spec)
        admin.call_all({"op": "policy_set", "policy": policy})
        files: dict[str, list[str]] = {}
        for job, (_, striped) in jobs.items():
            if striped:
                path = f"{job}/striped.bin"
                admin.write(path, os.urandom(16 * MiB))
                files[job] = [path]
            else:  # 1 MiB files homed on server 0: every byte of this job comes from it
                paths, n = [], 0
                while len(paths) < 16:
                    candidate = f"{job}/one-{n}.bin"
                    n += 1
                    if admin.aio.placement.home(candidate) == 0:
                        paths.append(candidate)
                admin.write_many({p: os.urandom(MiB) for p in paths})
                files[job] = paths
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(
                target=_reader,
                args=(
                    str(cluster_file),
                    [job, f"user-{job}", "g", nodes],
                    files[job],
                    args.streams,
                ),
                daemon=True,
            )
            for job, (nodes, _) in jobs.items()
        ]
        for p in procs:
            p.start()
        time.sleep(args.warmup)
        before, t0 = _granted(admin), time.monotonic()
        time.sleep(args.duration)
        after, t1 = _granted(admin), time.monotonic()
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
    got = {j: [a - b for a, b in zip(after[j], before.get(j, [0, 0]), strict=True)] for j in jobs}
    total = sum(sum(v) for v in got.values())
    weights = {
        j: float(nodes) if policy["policy"] == "size-fair" else 1.0
        for j, (nodes, _) in jobs.items()
    }
    expected, servers_worth = _expected(
        weights, {j: s for j, (_, s) in jobs.items()}, policy.get("scope", "server")
    )
    shares = {j: sum(v) / total for j, v in got.items()}
    return {
        "policy": policy,
        "jobs": {j: {"nodes": n, "striped": s} for j, (n, s) in jobs.items()},
        "window_s": t1 - t0,
        "aggregate_mb_per_s": total / (t1 - t0) / 1e6,
        "device_mb_per_s": 2 * args.device_bandwidth / 1e6,
        "expected_aggregate_mb_per_s": servers_worth * args.device_bandwidth / 1e6,
        "bytes_per_server": got,
        "shares": shares,
        "expected_shares": expected,
        "max_share_error": max(abs(shares[j] - expected[j]) for j in jobs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-bandwidth", type=float, default=200e6, help="bytes/s per server")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--streams", type=int, default=4, help="reads in flight per job")
    parser.add_argument("--quick", action="store_true", help="3 s windows")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    console = Console(width=120)
    load_before = os.getloadavg()
    cases = [
        ("job-fair/server", {"policy": "job-fair"}, {"A": (1, True), "B": (1, False)}),
        (
            "job-fair/cluster",
            {"policy": "job-fair", "scope": "cluster"},
            {"A": (1, True), "B": (1, False)},
        ),
        ("size-fair/server", {"policy": "size-fair"}, {"A": (1, True), "B": (3, False)}),
        (
            "size-fair/cluster",
            {"policy": "size-fair", "scope": "cluster"},
            {"A": (1, True), "B": (3, False)},
        ),
        ("B alone/cluster", {"policy": "job-fair", "scope": "cluster"}, {"B": (1, False)}),
        ("A alone/cluster", {"policy": "job-fair", "scope": "cluster"}, {"A": (1, True)}),
    ]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="iosvc-bench-cluster-fair-") as tmp:
        for name, policy, jobs in cases:
            console.print(f"running {name} ...")
            results[name] = run_case(
                name.replace("/", "-").replace(" ", "-"), policy, jobs, args, Path(tmp)
            )
    table = Table(
        title=f"cluster-wide fairness: 2 servers x {args.device_bandwidth / 1e6:.0f} MB/s, "
        "A striped over both, B on server 0 only"
    )
    columns = ("case", "A share", "A expected", "B share", "B expected", "max error", "MB/s")
    for col in (*columns, "expected MB/s"):
        table.add_column(col)
    for name, r in results.items():
        s, e = r["shares"], r["expected_shares"]
        table.add_row(
            name,
            f"{s['A']:.3f}" if "A" in s else "-",
            f"{e['A']:.3f}" if "A" in e else "-",
            f"{s['B']:.3f}" if "B" in s else "-",
            f"{e['B']:.3f}" if "B" in e else "-",
            f"{r['max_share_error']:.3f}",
            f"{r['aggregate_mb_per_s']:.0f} / {r['device_mb_per_s']:.0f}",
            f"{r['expected_aggregate_mb_per_s']:.0f}",
        )
    console.print(table)
    out = {
        "benchmark": "cluster_fairness",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {k: v for k, v in vars(args).items() if k != "json"},
        "results": results,
        "machine": machine(load_before),
    }
    write_json(args.json, out, console)


if __name__ == "__main__":
    sys.exit(main())

"""Scaling benchmark (issue 8): aggregate throughput of 1, 2 and 4 servers on separate hosts.

    .venv/bin/python bench/scaling.py --json results/scaling.json
    .venv/bin/python bench/scaling.py --quick --json /tmp/scaling-quick.json

Each server runs on its own test host (a network namespace, joined to the others by a bridge;
root and iproute2 needed), started as on a cluster (``iosvc serve --hostfile``), with an
emulated device of ``--device-bandwidth`` per host: on 2 shared cores that measures how the
service scales across hosts, not how fast this CPU is, so keep N x bandwidth well under what
the machine moves (4 x 50 MB/s here). Clients run on another host: ``--clients`` processes
writing and then reading 4 MiB files striped over all servers. Throughput is what the servers
granted (their ``stats`` op, sampled at the start and end of the window) over the window.
Scaling efficiency = aggregate(N) / (N x aggregate(1)); target >= 0.9 at 4 servers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from iosvc._netns import NetnsHosts, netns_available
from iosvc.policies import parse_rate

WORKER = """
import os, sys, time
from iosvc.client import Client
op, index, start, stop = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
client = Client(chunk_size=1 << 20)
data = os.urandom(4 << 20)
paths = [f"scale/c{index}/f{i}" for i in range(4)]
if op == "read":
    for p in paths:
        client.write(p, data)
while time.monotonic() < start:
    time.sleep(0.01)
i = 0
while time.monotonic() < stop:
    if op == "write":
        client.write(paths[i % 4], data)
    else:
        assert len(client.read(paths[i % 4])) == len(data)
    i += 1
"""

SAMPLER = """
import json, sys, time
from iosvc.client import Client
client = Client()
def served():
    return sum(j[4] for s in client.call_all({"op": "stats"}) for j in s["jobs"])
out = []
for when in map(float, sys.argv[1:]):
    while time.monotonic() < when:
        time.sleep(0.002)
    out.append((time.monotonic(), served()))
print(json.dumps(out))
"""


def measure(n: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """Aggregate write and read throughput (bytes/s) of ``n`` servers on ``n`` hosts."""
    with NetnsHosts(n + 1) as net:
        hostfile = root / f"hosts-{n}"
        hostfile.write_text("".join(f"{a}\n" for a in net.addresses[:n]))
        cluster_file = root / f"cluster-{n}.json"
        for i in range(n):
            log = open(root / f"server-{n}-{i}.log", "wb")  # noqa: SIM115 - owned by the process
            net.spawn(
                i,
                [
                    sys.executable,
                    "-m",
                    "iosvc.cli",
                    "serve",
                    "--hostfile",
                    str(hostfile),
                    "--host",
                    net.addresses[i],
                    "--memory",
                    "2GiB",
                    "--device-bandwidth",
                    args.device_bandwidth,
                    "--write-cluster-file",
                    str(cluster_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
        deadline = time.monotonic() + 60
        while not cluster_file.exists():
            if time.monotonic() > deadline:
                raise SystemExit((root / f"server-{n}-0.log").read_text())
            time.sleep(0.1)
        env = {**os.environ, "IOSVC_CLUSTER": str(cluster_file)}
        result = {}
        for op in ("write", "read"):
            start = time.monotonic() + args.warmup + 2.0  # clients start and prepare first
            stop = start + args.seconds
            workers = [
                net.spawn(
                    n,
                    [
                        sys.executable,
                        "-c",
                        WORKER,
                        op,
                        str(c),
                        str(start - args.warmup),
                        str(stop + 0.5),
                    ],
                    env=env,
                )
                for c in range(args.clients)
            ]
            sampler = net.spawn(
                n,
                [sys.executable, "-c", SAMPLER, str(start), str(stop)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            out, _ = sampler.communicate(timeout=args.seconds + 120)
            for w in workers:
                if w.wait(timeout=120) != 0:
                    raise SystemExit(f"a {op} client failed on {n} servers")
            (t0, b0), (t1, b1) = json.loads(out)
            result[op] = (b1 - b0) / (t1 - t0)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="1,2,4")
    parser.add_argument("--device-bandwidth", default="50MB/s", help="per host")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="3 s windows")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.seconds = 3.0
    why = netns_available()
    if why is not None:
        raise SystemExit(f"bench/scaling.py needs test hosts: {why}")
    console = Console()
    counts = [int(x) for x in args.servers.split(",")]
    per_host = parse_rate(args.device_bandwidth)
    rows: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="iosvc-bench-scaling-") as tmp:
        for n in counts:
            rows[n] = measure(n, args, Path(tmp))
            console.print(
                f"{n} servers: write {rows[n]['write'] / 1e6:.1f} MB/s, "
                f"read {rows[n]['read'] / 1e6:.1f} MB/s"
            )
    base = rows[counts[0]]
    table = Table(
        title=f"scaling: {args.device_bandwidth} emulated device per host, "
        f"{args.clients} client processes on another host"
    )
    for col in ("servers", "write MB/s", "write eff.", "read MB/s", "read eff.", "of devices"):
        table.add_column(col)
    results = []
    for n in counts:
        eff = {op: rows[n][op] / (n / counts[0] * base[op]) for op in ("write", "read")}
        of_devices = {op: rows[n][op] / (n * per_host) for op in ("write", "read")}
        results.append(
            {
                "servers": n,
                **{f"{op}_bps": rows[n][op] for op in eff},
                **{f"{op}_efficiency": eff[op] for op in eff},
                **{f"{op}_of_devices": of_devices[op] for op in eff},
            }
        )
        table.add_row(
            str(n),
            f"{rows[n]['write'] / 1e6:.1f}",
            f"{eff['write']:.2f}",
            f"{rows[n]['read'] / 1e6:.1f}",
            f"{eff['read']:.2f}",
            f"{of_devices['write']:.2f} / {of_devices['read']:.2f}",
        )
    console.print(table)
    last = results[-1]
    console.print(
        f"efficiency at {last['servers']} servers: write {last['write_efficiency']:.2f}, "
        f"read {last['read_efficiency']:.2f} (target >= 0.9)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "scaling",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "params": {
                        "device_bandwidth_per_host_bps": per_host,
                        "clients": args.clients,
                        "seconds": args.seconds,
                        "file_bytes": 4 << 20,
                        "chunk_bytes": 1 << 20,
                    },
                    "results": results,
                    "target_efficiency": 0.9,
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "load_average_after": os.getloadavg(),
                    },
                },
                indent=2,
            )
            + "\n"
        )
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Reliability benchmark (issue 7): load, server crashes and bad input against a live cluster.

    .venv/bin/python bench/reliability.py --json results/reliability.json          # 60 s load
    .venv/bin/python bench/reliability.py --quick --json results/reliability-quick.json

- **Load**: ``--clients`` (64) client processes against a 2-server cluster on node-local disk
  (``--dir``), each doing a mix of writes (4 KiB-16 MiB, log-uniform), reads of what it wrote
  (every byte checked against the content it generated), ``info``/``ls`` and ``rm``.
- **Faults**: during the load one server at a time is killed with SIGKILL and restarted
  (``--kills``, 5), recovery time = until it answers ``status`` again. Each client finally
  re-reads every file whose write returned: ``committed_lost`` counts the ones gone or changed.
- **Bad input**: ``--fuzz`` random malformed requests (random headers for every operation,
  random frames on the three gRPC methods) against the live cluster; a failure is an INTERNAL
  or UNKNOWN status, a hang (10 s deadline), or a server that stops answering.
- **Memory**: servers' peak RSS (sampled, and VmHWM) against the configured bound: the
  in-flight limit plus a stated fixed overhead for the Python process, gRPC and the index.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import machine, write_json
from rich.console import Console
from rich.table import Table

MiB = 1 << 20
INFLIGHT_LIMIT = 128 * MiB
#: What a server process needs besides in-flight requests: interpreter, gRPC, uvloop, index.
STATED_OVERHEAD = 256 * MiB
_BLOCK = random.Random(7).randbytes(MiB + 4096)


def content(seed: int, size: int) -> bytes:
    """Deterministic bytes for (seed, size): cheap to regenerate, different per seed."""
    start = seed % 4096
    reps, rest = divmod(size, MiB)
    head = seed.to_bytes(8, "little")
    body = _BLOCK[start : start + MiB] * reps + _BLOCK[start : start + rest]
    return (head + body[8:]) if size >= 8 else body


def _size(rng: random.Random) -> int:
    return int(2 ** rng.uniform(12, 24))  # 4 KiB .. 16 MiB, log-uniform


def client_main(index: int, cluster_file: str, seconds: float, results: Any) -> None:
    from iosvc.client import Client
    from iosvc.errors import IosvcError, NotFound

    rng = random.Random(index)
    client = Client(cluster_file)
    mine: dict[str, tuple[int, int]] = {}
    lat: dict[str, list[float]] = {"write": [], "read": [], "meta": [], "rm": []}
    ops = errors = mismatches = 0
    error_kinds: dict[str, int] = {}
    examples: list[str] = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        roll = rng.random()
        start = time.monotonic()
        try:
            if roll < 0.35 or not mine:
                path = f"rel/c{index:02d}/f{n:05d}"
                n += 1
                seed, size = rng.getrandbits(40), _size(rng)
                client.write(path, content(seed, size))
                mine[path] = (seed, size)
                kind = "write"
            elif roll < 0.8:
                path = rng.choice(list(mine))
                seed, size = mine[path]
                if client.read(path) != content(seed, size):
                    mismatches += 1
                kind = "read"
            elif roll < 0.95:
                path = rng.choice(list(mine))
                client.info(path)
                client.ls(f"rel/c{index:02d}")
                kind = "meta"
            else:
                path = rng.choice(list(mine))
                client.rm(path)
                del mine[path]
                kind = "rm"
            lat[kind].append(time.monotonic() - start)
            ops += 1
        except IosvcError as exc:
            errors += 1
            error_kinds[type(exc).__name__] = error_kinds.get(type(exc).__name__, 0) + 1
            if len(examples) < 3:
                examples.append(f"{type(exc).__name__}: {exc}"[:300])
    lost = 0
    for path, (seed, size) in mine.items():
        for _ in range(3):
            try:
                if client.read(path) != content(seed, size):
                    mismatches += 1
                break
            except NotFound:
                lost += 1
                break
            except IosvcError:
                time.sleep(1)
        else:
            lost += 1
    results.put(
        {
            "ops": ops,
            "errors": errors,
            "error_kinds": error_kinds,
            "error_examples": examples,
            "mismatches": mismatches,
            "committed": len(mine),
            "committed_lost": lost,
            "latency": lat,
        }
    )


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes (0, 0 if gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def fuzz(addresses: list[str], cases: int, seed: int = 0) -> dict[str, Any]:
    """Random malformed requests; count crashes (INTERNAL/UNKNOWN), hangs and dead servers."""
    import grpc

    from iosvc import wire

    rng = random.Random(seed)
    ops = [
        "stat",
        "commit",
        "put_small",
        "read_small",
        "ls",
        "rm",
        "mkdir",
        "status",
        "policy_show",
        "stats",
        "live_uids",
        "drop",
        "quota_show",
        "usage",
        "bogus",
    ]

    def value(depth: int = 0) -> Any:
        kind = rng.randrange(9 if depth < 2 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return rng.choice([-1, 0, 1, 2**31, -(2**63), 2**64 - 1])
        if kind == 2:
            return rng.random() * rng.choice([1, -1e30, 1e30])
        if kind == 3:
            return "".join(rng.choice("ab/.\x00é*") for _ in range(rng.randrange(12)))
        if kind == 4:
            return rng.randbytes(rng.randrange(16))
        if kind == 5:
            return rng.choice([True, False])
        if kind in (6, 7):
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["p", "s", "u", "path", "chunks", "key"]): value(depth + 1)}

    failures: list[str] = []
    tried = 0
    for i in range(cases):
        address = addresses[i % len(addresses)]
        with wire.sync_channel(address, None) as channel:
            header: dict[str, Any] = {"op": rng.choice(ops)}
            for _ in range(rng.randrange(5)):
                header[
                    rng.choice(
                        [
                            "path",
                            "paths",
                            "prefix",
                            "rec",
                            "files",
                            "uids",
                            "chunks",
                            "key",
                            "ck",
                            "start",
                            "end",
                            "id",
                            "tok",
                        ]
                    )
                ] = value()
            try:
                frame = wire.pack(header, rng.randbytes(rng.randrange(64)))
            except Exception:
                frame = rng.randbytes(rng.randrange(1, 80))
            if rng.random() < 0.3:
                frame = rng.randbytes(rng.randrange(1, 80))
            method = rng.choice(["call", "read", "write"])
            try:
                if method == "call":
                    channel.unary_unary(wire.METHOD_CALL)(frame, timeout=10)
                elif method == "read":
                    list(channel.unary_stream(wire.METHOD_READ)(frame, timeout=10))
                else:
                    channel.stream_unary(wire.METHOD_WRITE)(iter([frame]), timeout=10)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code in (
                    grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                ):
                    failures.append(f"{method} {header.get('op')}: {code.name} {exc.details()}")  # type: ignore[attr-defined]
            tried += 1
    return {"fuzz_cases": tried, "fuzz_failures": len(failures), "examples": failures[:10]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about two minutes")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=None, help="load duration")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--fuzz", type=int, default=None, help="fuzz cases")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    seconds = args.seconds or (30.0 if args.quick else 60.0)
    fuzz_cases = args.fuzz or (500 if args.quick else 3000)
    console = Console()

    from iosvc.client import Client
    from iosvc.server import LocalCluster

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="iosvc-bench-rel-") as tmp:
        root = Path(tmp)
        server_args = [
            "--inflight-limit",
            str(INFLIGHT_LIMIT),
            "--gc-ttl",
            "30",
            "--gc-interval",
            "5",
        ]
        with LocalCluster(
            2, directory=root / "data", workdir=root / "run", server_args=server_args
        ) as cluster:
            assert cluster.spec is not None
            cluster_file = root / "cluster.json"
            cluster.spec.save(cluster_file)
            rss_peak = [0, 0]
            sampling = True

            def sample() -> None:
                while sampling:
                    for i, proc in enumerate(cluster.procs):
                        if proc is not None:
                            rss, hwm = _rss(proc.pid)
                            rss_peak[i] = max(rss_peak[i], rss, hwm)
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            ctx = mp.get_context("spawn")
            results = ctx.Queue()
            procs = [
                ctx.Process(target=client_main, args=(i, str(cluster_file), seconds, results))
                for i in range(args.clients)
            ]
            started = time.monotonic()
            for p in procs:
                p.start()
            recoveries = []
            status = Client(cluster.spec)
            # Kills spread over the load window, after the clients have had time to start.
            first = min(15.0, seconds / 3)
            gap = (seconds - first) / max(1, args.kills)
            for k in range(args.kills):
                time.sleep(max(0.0, started + first + k * gap - time.monotonic()))
                victim = k % 2
                cluster.kill(victim, signal.SIGKILL)
                time.sleep(0.5)
                t0 = time.monotonic()
                cluster.restart(victim)
                while True:
                    try:
                        status.call_all({"op": "status"})
                        break
                    except Exception:
                        time.sleep(0.05)
                recoveries.append(time.monotonic() - t0)
            outcomes = [results.get(timeout=seconds + 600) for _ in procs]
            for p in procs:
                p.join(60)
            load_s = time.monotonic() - started
            fuzz_result = fuzz(list(cluster.spec.servers), fuzz_cases)
            Client(cluster.spec).write("rel/after-fuzz", b"ok")  # still serving
            sampling = False
            sampler.join()
    ops = sum(o["ops"] for o in outcomes)
    latencies = sorted(x for o in outcomes for v in o["latency"].values() for x in v)
    kinds: dict[str, int] = {}
    for o in outcomes:
        for k, v in o["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    out: dict[str, Any] = {
        "benchmark": "reliability",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "clients": args.clients,
        "load_seconds": seconds,
        "ops": ops,
        "ops_per_s": ops / load_s,
        "p50_latency_s": statistics.median(latencies) if latencies else None,
        "p99_latency_s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "errors": sum(o["errors"] for o in outcomes),
        "error_kinds": kinds,
        "error_examples": [e for o in outcomes for e in o["error_examples"]][:10],
        "mismatches": sum(o["mismatches"] for o in outcomes),
        "committed_files": sum(o["committed"] for o in outcomes),
        "committed_lost": sum(o["committed_lost"] for o in outcomes),
        "restarts": len(recoveries),
        "recovery_seconds": recoveries,
        "fuzz_cases": fuzz_result["fuzz_cases"],
        "fuzz_failures": fuzz_result["fuzz_failures"],
        "fuzz_failure_examples": fuzz_result["examples"],
        "peak_rss_bytes": max(rss_peak),
        "peak_rss_bytes_per_server": rss_peak,
        "memory_limit_bytes": INFLIGHT_LIMIT + STATED_OVERHEAD,
        "memory_limit_note": "in-flight limit (128 MiB) + stated overhead (256 MiB); data on disk",
        "machine": machine(load_before),
    }
    table = Table(
        title=f"reliability: {args.clients} clients, {seconds:.0f} s, {len(recoveries)} kills"
    )
    table.add_column("measure")
    table.add_column("value")
    table.add_column("target")
    rows = [
        ("ops (ops/s)", f"{ops} ({out['ops_per_s']:.0f}/s)", ""),
        (
            "latency p50 / p99",
            f"{out['p50_latency_s'] * 1e3:.1f} / {out['p99_latency_s'] * 1e3:.1f} ms",
            "",
        ),
        ("client-visible errors", f"{out['errors']} {kinds or ''}", "0"),
        ("mismatched reads", str(out["mismatches"]), "0"),
        ("committed files lost", f"{out['committed_lost']} of {out['committed_files']}", "0"),
        ("recovery per restart", ", ".join(f"{r:.2f} s" for r in recoveries), ""),
        ("fuzz cases / failures", f"{out['fuzz_cases']} / {out['fuzz_failures']}", "0 failures"),
        (
            "server peak RSS",
            f"{max(rss_peak) / MiB:.0f} MiB",
            f"<= {out['memory_limit_bytes'] / MiB:.0f} MiB",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    write_json(args.json, out, console)


if __name__ == "__main__":
    sys.exit(main())

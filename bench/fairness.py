"""Fair-share benchmark (issue #4): do real jobs get the shares a policy promises?

Real server processes (``LocalCluster``) with an emulated device, and real client processes
(multiprocessing ``spawn``), each declaring its job through ``IOSVC_JOB_ID``, ``IOSVC_USER``,
``IOSVC_GROUP`` and ``IOSVC_NODES`` as a job on a shared cluster would. Every client process counts
the bytes it completes in 10 ms buckets (on ``time.monotonic``, which is system-wide on Linux, so
all processes share one time axis); the parent adds them up per job, and polls the servers'
``stats`` op (bytes granted per job) as a cross-check.

One run::

    python bench/fairness.py --policy size-fair --device-bandwidth 400MB/s --duration 10 \\
        --job A:user=alice:group=g1:nodes=4:procs=4:size=1MiB \\
        --job B:user=bob:group=g2:nodes=1:procs=1:size=1MiB --json out.json --plot out.png

The whole matrix (every preset over every scenario, plus the baselines; ~10 min)::

    python bench/fairness.py --matrix    # -> bench/results/fairness_{matrix.json,report.md,*.png}

Job fields (``NAME:key=value:...``): ``user``, ``group``, ``nodes`` (declared job size), ``procs``
(client processes), ``size`` (request size = the client's chunk size; one chunk is one request at
the server's gate), ``op=read|write``, ``start``/``stop`` (seconds: arrival and departure),
``qd`` (concurrent streams per process, default 2), ``burst``/``think`` (bursty job: read ``burst``
bytes, sleep ``think`` seconds, repeat).

How a process reads: it streams a file of many chunks of ``size`` (written beforehand with that
chunk size) with ``qd`` concurrent whole-file reads. Each read is one ``ReadChunks`` stream per
server, and the server keeps 4 chunks of each stream queued at its gate, so a 1-process job has
8 requests queued per server and is backlogged like an IOR process with ``-t size``. A 4 KiB job is
therefore a client with ``chunk_size=4096`` reading files of many 4 KiB chunks, every chunk a
separate request charged ``4 KiB + op_cost`` (not ``read_many`` of small files, which batches up to
256 files into one request). Bytes are counted per chunk through the client's chunk sink
(``AsyncClient._fetch``, what ``read_into`` uses), so the time series has chunk resolution.
Writes stream files through ``open_writer`` (``qd`` files at once per process); a chunk is counted
when ``write()`` returns (queued to its server stream, at most 3 chunks per server ahead).

Shares. ``expected_share`` comes from ``iosvc.policies.expected_shares`` (None for fifo and tbf);
``achieved_share`` is measured over the window in which all jobs are active, after ``--warmup``.
The scheduler charges ``bytes + op_cost`` per request, so shares are shares of that *cost*; with
one request size per run the cost share equals the byte share. Runs mixing request sizes report
both (``achieved_share`` = cost share, ``achieved_byte_share``). ``max_share_error`` is
``max |achieved / expected - 1|``.

``tbf`` is the static-cap baseline (Lustre NRS TBF rules; ThemisIO's ``TBF_on_themis``): given as
the bare name, every job is capped at device / number of jobs, per server, in bytes/s
(``op_cost = 0``), with a bucket depth of 3 MiB (Lustre's default depth of 3 RPCs at 1 MiB); a
policy file or TOML text sets other rules.

The machine has 2 cores shared by servers and clients. Device bandwidths of 200-400 MB/s keep the
emulated device the bottleneck; every run records the CPU used by the servers, the clients and the
rest of the machine over the measured window, and warns when the machine is saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

MiB = 1 << 20
RES = 0.01  # seconds per bucket recorded by the client processes
WINDOW_REACT = 0.2  # seconds of throughput averaged when checking a reaction
REACT_TOL = 0.10  # a job has reacted when it gets >= (1 - tol) of its new target rate
RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = (
    "fifo",
    "job-fair",
    "user-fair",
    "size-fair",
    "user-then-size-fair",
    "user-then-job-fair",
    "group-user-size-fair",
    "tbf",
)
NO_SHARES = ("fifo", "tbf")
SHARE_TARGET = 0.03
AGG_TARGET = 0.95
QUIET_CORES = 0.25  # other processes' CPU (cores) below which the machine counts as quiet
NOISY_CORES = 0.35  # a round during which others used more than this is measured again


class BUDGET:
    """Past ``deadline`` (monotonic) rounds are neither repeated nor delayed for a quiet machine."""

    deadline: float | None = None


# ------------------------------------------------------------------------------------- job specs
@dataclass(frozen=True)
class JobSpec:
    """One job of a scenario: who it claims to be and how its processes do I/O."""

    name: str
    user: str = "user"
    group: str = "group"
    nodes: int = 1
    procs: int = 1
    size: int = MiB
    op: str = "read"
    start: float = 0.0
    stop: float | None = None  # None: until the end of the run
    qd: int = 2
    burst: int = 0  # > 0: bursty job (read `burst` bytes, think, repeat)
    think: float = 0.0

    def identity(self) -> Any:
        from iosvc.identity import JobIdentity

        return JobIdentity(self.name, self.user, self.group, self.nodes)

    def stop_at(self, duration: float) -> float:
        return duration if self.stop is None else min(self.stop, duration)

    def describe(self) -> str:
        from iosvc.policies import format_size

        extra = f" burst {format_size(self.burst)}/think {self.think:g}s" if self.burst else ""
        span = ""
        if self.start or self.stop is not None:
            span = f" t={self.start:g}-{'end' if self.stop is None else f'{self.stop:g}'}s"
        return (
            f"{self.name}: {self.user}/{self.group}, {self.nodes} node(s), {self.procs} proc(s), "
            f"{self.op} {format_size(self.size)}{extra}{span}"
        )


def parse_job(text: str) -> JobSpec:
    """``A:user=alice:group=g1:nodes=4:procs=4:size=1MiB[:op=read][:start=2][:stop=8]...``."""
    from iosvc.policies import parse_size

    name, *fields = text.split(":")
    if not name or "=" in name:
        raise argparse.ArgumentTypeError(f"--job {text!r}: must start with the job name")
    kwargs: dict[str, Any] = {"name": name, "user": f"user-{name}", "group": "g"}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--job {text!r}: {item!r} is not key=value")
        try:
            if key in ("user", "group"):
                kwargs[key] = value
            elif key in ("nodes", "procs", "qd"):
                kwargs[key] = int(value)
            elif key in ("size", "burst"):
                kwargs[key] = parse_size(value)
            elif key in ("start", "stop", "think"):
                kwargs[key] = float(value)
            elif key == "op":
                if value not in ("read", "write"):
                    raise ValueError("op must be read or write")
                kwargs[key] = value
            else:
                raise ValueError(
                    "known keys: user group nodes procs size op start stop qd burst think"
                )
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--job {text!r}: {key}: {exc}") from None
    spec = JobSpec(**kwargs)
    if spec.procs < 1 or spec.qd < 1 or spec.nodes < 1:
        raise argparse.ArgumentTypeError(f"--job {text!r}: nodes, procs and qd must be >= 1")
    if spec.burst and spec.op != "read":
        raise argparse.ArgumentTypeError(f"--job {text!r}: bursts are reads")
    return spec


def file_bytes(job: JobSpec) -> int:
    """Size of the file a read job streams: many chunks, at most 64 MiB, at least one burst."""
    chunks = max(16, min(2048, (64 * MiB) // job.size))
    return max(chunks * job.size, job.burst)


# ------------------------------------------------------------------------------ client processes
def _cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), from /proc."""
    try:
        with open(f"/proc/{pid or 'self'}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _machine_cpu() -> tuple[float, float, float]:
    """(busy, total, irq + softirq) jiffies of the whole machine.

    Interrupt time (loopback TCP is mostly softirq work) is busy time that /proc charges to no
    process, so it is reported apart from 'others'.
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values), values[5] + values[6]


def _worker(conn: Any, cfg: dict[str, Any]) -> None:
    """Entry point of one client process (spawned): declare the job, then run rounds."""
    job = JobSpec(**cfg["job"])
    os.environ.update(
        IOSVC_JOB_ID=job.name,
        IOSVC_USER=job.user,
        IOSVC_GROUP=job.group,
        IOSVC_NODES=str(job.nodes),
        IOSVC_CLUSTER=cfg["cluster"],
    )
    import uvloop

    try:
        uvloop.run(_worker_main(conn, cfg, job))
    except Exception as exc:  # report instead of dying silently
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


async def _worker_main(conn: Any, cfg: dict[str, Any], job: JobSpec) -> None:
    from iosvc.client import AsyncClient

    client = AsyncClient(chunk_size=job.size)  # identity from the IOSVC_* environment
    if not hasattr(client, "_fetch"):
        raise RuntimeError("AsyncClient._fetch is gone: update bench/fairness.py's reader")
    info = None
    if job.op == "read":
        info = await client.info(cfg["file"])
        # Open a channel to every server now, not inside the measured window.
        await client._fetch(info, 0, min(info["size"], job.size * client.n_servers), _noop)
    else:
        await client.status()
    loop = asyncio.get_running_loop()
    conn.send(("ready", os.getpid()))
    while True:
        cmd, params = await loop.run_in_executor(None, conn.recv)
        if cmd == "quit":
            break
        conn.send(("done", await _round(client, info, cfg, job, params)))
    await client.close()


def _noop(offset: int, payload: memoryview) -> None:
    pass


async def _round(
    client: Any, info: Any, cfg: dict[str, Any], job: JobSpec, params: dict[str, Any]
) -> dict[str, Any]:
    """Run one measured round: I/O from t0+start to t0+stop, bytes per RES bucket."""
    t0: float = params["t0"]
    start, stop = params["start"], params["stop"]
    nb = math.ceil(params["duration"] / RES) + 1
    nbytes = [0] * nb
    nops = [0] * nb
    bursts: list[tuple[float, float]] = []  # (start time rel. t0, latency)
    errors: list[str] = []
    mono = time.monotonic

    def account(n: int) -> None:
        i = int((mono() - t0) / RES)
        if 0 <= i < nb:
            nbytes[i] += n
            nops[i] += 1

    buffer = bytearray(max(job.size, job.burst) if job.op == "read" else 0)
    view = memoryview(buffer)

    def sink(offset: int, payload: memoryview) -> None:
        # What read_into does (copy into a reused buffer), wrapping around the window.
        n = len(payload)
        o = offset % (len(view) - n + 1) if len(view) > n else 0
        view[o : o + n] = payload
        account(n)

    async def stream() -> None:
        size = info["size"]
        while True:
            await client._fetch(info, 0, size, sink)

    async def bursty() -> None:
        size = info["size"]
        offset = 0
        while True:
            if offset + job.burst > size:
                offset = 0
            began = mono()
            await client._fetch(info, offset, offset + job.burst, sink)
            bursts.append((began - t0, mono() - began))
            offset += job.burst
            await asyncio.sleep(job.think)

    async def writer(k: int) -> None:
        data = memoryview(os.urandom(job.size))
        n_chunks = max(16, min(256, (64 * MiB) // job.size))
        path = f"fairbench/{job.name}/w{cfg['proc']}-{k}"
        while True:
            w = client.open_writer(path)
            try:
                for _ in range(n_chunks):
                    await w.write(data)
                    account(job.size)
                await w.close()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.shield(w.abort())
                raise

    await asyncio.sleep(max(0.0, t0 + start - mono()))
    cpu0 = _cpu_seconds()
    if job.op == "write":
        tasks = [asyncio.ensure_future(writer(k)) for k in range(job.qd)]
    elif job.burst:
        tasks = [asyncio.ensure_future(bursty())]
    else:
        tasks = [asyncio.ensure_future(stream()) for _ in range(job.qd)]
    _done, _ = await asyncio.wait(tasks, timeout=max(0.0, t0 + stop - mono()))
    for task in tasks:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            errors.append(f"{type(outcome).__name__}: {outcome}")
    return {
        "bytes": nbytes,
        "ops": nops,
        "bursts": bursts,
        "errors": errors,
        "cpu": _cpu_seconds() - cpu0,
    }


# ------------------------------------------------------------------------------------- scenarios
@dataclass
class Scenario:
    """A set of jobs run under one or more policies on one cluster."""

    name: str
    title: str
    jobs: list[JobSpec]
    duration: float = 7.0
    warmup: float = 1.0
    servers: int = 1
    device_bandwidth: float | None = 400e6
    slots: int | None = None
    policies: tuple[str, ...] = PRESETS
    kind: str = "shares"  # shares | churn | hogvictim | overhead
    note: str = ""
    repeats: int = 1  # overhead: alternating rounds per policy
    solo: bool = False  # also run each job alone (fifo) to measure its demand


@dataclass
class Monitor:
    """Server-side ``stats`` and CPU samples taken while a round runs."""

    times: list[float] = field(default_factory=list)
    served: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # job -> (bytes, ops)
    cpu_servers: list[float] = field(default_factory=list)
    cpu_clients: list[float] = field(default_factory=list)
    cpu_main: list[float] = field(default_factory=list)
    machine: list[tuple[float, float, float]] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)


class Bench:
    """One cluster, one set of client processes, any number of rounds."""

    def __init__(self, scenario: Scenario, workdir: Path, verbose: bool = True) -> None:
        self.sc = scenario
        self.workdir = workdir
        self.verbose = verbose
        self.cluster: Any = None
        self.procs: list[tuple[JobSpec, Any, Any]] = []  # (job, process, parent end of pipe)
        self.pids: list[int] = []
        self.client: Any = None
        self.pool = ThreadPoolExecutor(max_workers=64)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, jobs: Sequence[JobSpec] | None = None) -> None:
        from iosvc.client import AsyncClient
        from iosvc.identity import JobIdentity
        from iosvc.server import LocalCluster

        sc = self.sc
        args = ["--policy", "fifo"]
        if sc.device_bandwidth:
            args += ["--device-bandwidth", str(int(sc.device_bandwidth))]
        if sc.slots:
            args += ["--slots", str(sc.slots)]
        self.cluster = LocalCluster(
            sc.servers,
            memory=16 << 30,
            server_args=args,
            workdir=self.workdir / f"cluster-{sc.name}",
        )
        self.cluster.start()
        self.spec_path = str(self.workdir / f"cluster-{sc.name}.json")
        self.cluster.spec.save(self.spec_path)
        monitor = JobIdentity("bench-monitor", "bench", "bench", 1)
        self.client = AsyncClient(self.cluster.spec, identity=monitor)
        jobs = list(jobs if jobs is not None else sc.jobs)
        # Files the readers stream, written once with the job's chunk size.
        for job in {j.name: j for j in jobs if j.op == "read"}.values():
            writer = AsyncClient(self.cluster.spec, identity=monitor, chunk_size=job.size)
            block = os.urandom(min(file_bytes(job), 4 * MiB))
            async with writer.open_writer(self._file(job)) as w:
                left = file_bytes(job)
                while left > 0:
                    await w.write(block[: min(left, len(block))])
                    left -= len(block)
            await writer.close()
        ctx = mp.get_context("spawn")
        for job in jobs:
            for proc in range(job.procs):
                parent, child = ctx.Pipe()
                cfg = {
                    "job": asdict(job),
                    "proc": proc,
                    "cluster": self.spec_path,
                    "file": self._file(job),
                }
                p = ctx.Process(target=_worker, args=(child, cfg), daemon=True)
                p.start()
                self.procs.append((job, p, parent))
        loop = asyncio.get_running_loop()
        for job, _, conn in self.procs:
            kind, value = await loop.run_in_executor(self.pool, _recv, conn, 120.0)
            if kind != "ready":
                raise RuntimeError(f"client process of job {job.name} failed: {value}")
            self.pids.append(value)

    @staticmethod
    def _file(job: JobSpec) -> str:
        return f"fairbench/{job.name}/data-{job.size}"

    async def stop(self) -> None:
        for _, _, conn in self.procs:
            with contextlib.suppress(Exception):
                conn.send(("quit", None))
        for _, p, _ in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        self.procs = []
        if self.client is not None:
            await self.client.close()
        if self.cluster is not None:
            self.cluster.stop()
        self.pool.shutdown(wait=False)

    # -- one round ------------------------------------------------------------------------------
    def _our_cpu(self) -> float:
        pids = [*self.cluster.spec.pids, *self.pids]
        return _cpu_seconds() + sum(_cpu_seconds(pid) for pid in pids)

    async def wait_quiet(self, max_wait: float, threshold: float = QUIET_CORES) -> float:
        """Wait until others use < ``threshold`` cores for 0.6 s; return the seconds waited.

        The machine is shared (other benchmarks and test suites run on the same 2 cores); a round
        measured while they burn CPU measures them, not the scheduler.
        """
        began = time.monotonic()
        quiet = 0
        ncpu = os.cpu_count() or 1
        while time.monotonic() - began < max_wait:
            m0, ours0 = _machine_cpu(), self._our_cpu()
            await asyncio.sleep(0.3)
            m1, ours1 = _machine_cpu(), self._our_cpu()
            busy = (m1[0] - m0[0] - (m1[2] - m0[2])) / max(1, m1[1] - m0[1]) * ncpu
            others = busy - (ours1 - ours0) / 0.3
            quiet = quiet + 1 if others < threshold else 0
            if quiet >= 2:
                break
        return time.monotonic() - began

    async def set_policy(self, policy: dict[str, Any]) -> None:
        await self.client.call_all({"op": "policy_set", "policy": policy})

    async def _stats(self) -> tuple[dict[str, tuple[int, int]], int]:
        served: dict[str, list[int]] = {}
        queued = 0
        for reply in await self.client.call_all({"op": "stats"}):
            queued += reply["queued"]
            for job, _user, _group, _nodes, nbytes, ops, _wait in reply["jobs"]:
                acc = served.setdefault(job, [0, 0])
                acc[0] += nbytes
                acc[1] += ops
        return {k: (v[0], v[1]) for k, v in served.items()}, queued

    async def round(
        self, duration: float, jobs: Sequence[JobSpec] | None = None
    ) -> tuple[dict[str, Any], Monitor, float]:
        """Run every process of ``jobs`` (default: all) for one round; per-job results."""
        names = {j.name for j in (jobs if jobs is not None else self.sc.jobs)}
        active = [(job, p, conn) for job, p, conn in self.procs if job.name in names]
        loop = asyncio.get_running_loop()
        t0 = time.monotonic() + 0.5
        for job, _, conn in active:
            conn.send(
                (
                    "run",
                    {
                        "t0": t0,
                        "start": job.start,
                        "stop": job.stop_at(duration),
                        "duration": duration,
                    },
                )
            )
        waits = [
            loop.run_in_executor(self.pool, _recv, conn, duration + 120.0) for *_, conn in active
        ]
        gathered = asyncio.ensure_future(asyncio.gather(*waits))
        mon = Monitor()
        while not gathered.done():
            served, queued = await self._stats()
            mon.times.append(time.monotonic() - t0)
            mon.served.append(served)
            mon.queued.append(queued)
            mon.cpu_servers.append(sum(_cpu_seconds(pid) for pid in self.cluster.spec.pids))
            mon.cpu_clients.append(sum(_cpu_seconds(pid) for pid in self.pids))
            mon.cpu_main.append(_cpu_seconds())
            mon.machine.append(_machine_cpu())
            await asyncio.wait({gathered}, timeout=0.1)
        per_job: dict[str, dict[str, Any]] = {}
        for (job, _, _), (kind, value) in zip(active, gathered.result(), strict=True):
            if kind != "done":
                raise RuntimeError(f"client process of job {job.name} failed: {value}")
            acc = per_job.setdefault(
                job.name, {"bytes": None, "ops": None, "bursts": [], "errors": [], "cpu": 0.0}
            )
            for key in ("bytes", "ops"):
                acc[key] = (
                    value[key]
                    if acc[key] is None
                    else [a + b for a, b in zip(acc[key], value[key], strict=True)]
                )
            acc["bursts"] += value["bursts"]
            acc["errors"] += value["errors"]
            acc["cpu"] += value["cpu"]
        return per_job, mon, t0


async def measure(
    bench: Bench,
    jobs: Sequence[JobSpec],
    policy: dict[str, Any],
    bucket: float,
    *,
    attempts: int = 2,
    max_wait: float = 6.0,
) -> dict[str, Any]:
    """Set the policy, wait for a quiet machine, run one round and analyse it.

    A round during which other processes used more than NOISY_CORES is run again (up to
    ``attempts`` in all); the least disturbed attempt is kept and the others are recorded.
    """
    sc = bench.sc
    await bench.set_policy(policy)
    tries: list[dict[str, Any]] = []
    if BUDGET.deadline is not None and time.monotonic() > BUDGET.deadline:
        attempts, max_wait = 1, 0.0  # over the time budget: measure as is (and say so)
    for _ in range(attempts):
        waited = await bench.wait_quiet(max_wait)
        per_job, mon, _ = await bench.round(sc.duration, jobs)
        res = analyse(sc, jobs, policy, per_job, mon, sc.duration, sc.warmup, bucket)
        res["waited_for_quiet_s"] = round(waited, 2)
        tries.append(res)
        if res["cpu"].get("other_cores", 0.0) <= NOISY_CORES:
            break
    best = min(tries, key=lambda r: r["cpu"].get("other_cores", 0.0))
    best["attempts"] = len(tries)
    best["discarded_attempts_other_cores"] = [
        round(r["cpu"].get("other_cores", 0.0), 2) for r in tries if r is not best
    ]
    return best


def _recv(conn: Any, timeout: float) -> Any:
    if not conn.poll(timeout):
        return ("error", f"no answer in {timeout:.0f} s")
    try:
        return conn.recv()
    except EOFError:
        return ("error", "process exited")


# ------------------------------------------------------------------------------------- analysis
def policy_spec(name: str, sc: Scenario, jobs: Sequence[JobSpec]) -> dict[str, Any]:
    """The policy dict sent to the servers (``tbf`` alone: cap = device / jobs per job)."""
    from iosvc.policies import load_policy

    if name == "tbf":
        if not sc.device_bandwidth:
            raise SystemExit("--policy tbf needs --device-bandwidth (caps are device / jobs)")
        rate = sc.device_bandwidth / max(1, len(jobs))
        # Bucket depth: Lustre's default of 3 RPCs (NRS_TBF_DEFAULT_DEPTH) at 1 MiB RPCs. With
        # no depth, every late timer tick is lost for good and tbf looks worse than it is.
        tbf = {"key": "job", "default_rate": rate, "burst": 3 * MiB}
        return {"policy": "tbf", "op_cost": 0, "tbf": tbf}
    result: dict[str, Any] = load_policy(name).to_dict()
    return result


def _window_sum(series: Sequence[int], a: float, b: float) -> int:
    return sum(series[max(0, round(a / RES)) : max(0, round(b / RES))])


def _coarse(series: Sequence[int], bucket: float, duration: float) -> list[float]:
    k = max(1, round(bucket / RES))
    n = round(duration / RES)
    return [sum(series[i : i + k]) / (k * RES) for i in range(0, n, k)]


def _interp_served(mon: Monitor, t: float) -> dict[str, tuple[float, float]]:
    """Server-side cumulative (bytes, ops) per job at time t (linear between samples)."""
    times = mon.times
    if not times:
        return {}
    if t <= times[0]:
        return {k: (float(v[0]), float(v[1])) for k, v in mon.served[0].items()}
    for i in range(1, len(times)):
        if times[i] >= t:
            f = (t - times[i - 1]) / max(1e-9, times[i] - times[i - 1])
            a, b = mon.served[i - 1], mon.served[i]
            return {
                k: (
                    a.get(k, (0, 0))[0] + f * (b[k][0] - a.get(k, (0, 0))[0]),
                    a.get(k, (0, 0))[1] + f * (b[k][1] - a.get(k, (0, 0))[1]),
                )
                for k in b
            }
    return {k: (float(v[0]), float(v[1])) for k, v in mon.served[-1].items()}


def _interp(times: Sequence[float], values: Sequence[float], t: float) -> float:
    if not times:
        return 0.0
    if t <= times[0]:
        return values[0]
    for i in range(1, len(times)):
        if times[i] >= t:
            f = (t - times[i - 1]) / max(1e-9, times[i] - times[i - 1])
            return values[i - 1] + f * (values[i] - values[i - 1])
    return values[-1]


def jain(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    if not xs or not any(xs):
        return None
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def expected_for(policy: dict[str, Any], jobs: Sequence[JobSpec]) -> dict[str, float] | None:
    from iosvc.policies import expected_shares, load_policy

    shares = expected_shares(load_policy(policy), [j.identity() for j in jobs])
    if shares is None:
        return None
    return {ident.job_id: share for ident, share in shares.items()}


def analyse(
    sc: Scenario,
    jobs: Sequence[JobSpec],
    policy: dict[str, Any],
    per_job: dict[str, Any],
    mon: Monitor,
    duration: float,
    warmup: float,
    bucket: float,
) -> dict[str, Any]:
    """Everything the JSON, the table and the plot need about one round."""
    capacity = (sc.device_bandwidth or 0) * sc.servers or None
    op_cost = int(policy.get("op_cost", 0))
    w0 = max(j.start for j in jobs) + warmup
    w1 = min(j.stop_at(duration) for j in jobs)
    if w1 - w0 < 0.5:
        raise SystemExit(f"no window with all jobs active after warm-up ({w0:.1f}-{w1:.1f} s)")
    span = w1 - w0
    # A bursty job asks for less than its share: the policy's shares do not apply to it (the
    # hogvictim summary judges it against its demand instead).
    expected = None if any(j.burst for j in jobs) else expected_for(policy, jobs)
    s0, s1 = _interp_served(mon, w0), _interp_served(mon, w1)
    srv = {k: (s1.get(k, (0, 0))[0] - s0.get(k, (0, 0))[0]) for k in (j.name for j in jobs)}
    srv_ops = {k: (s1.get(k, (0, 0))[1] - s0.get(k, (0, 0))[1]) for k in (j.name for j in jobs)}
    srv_cost = {k: srv[k] + op_cost * srv_ops[k] for k in srv}
    srv_total = sum(srv_cost.values()) or 1
    # A writer cannot see when each chunk is stored (write() returns once the chunk is queued
    # to its stream), so runs with writers take their numbers from the servers' grants.
    server_side = any(j.op == "write" for j in jobs)
    got: dict[str, dict[str, Any]] = {}
    costs = {}
    for job in jobs:
        r = per_job[job.name]
        if server_side:
            nbytes, nops = int(srv[job.name]), int(srv_ops[job.name])
        else:
            nbytes = _window_sum(r["bytes"], w0, w1)
            nops = _window_sum(r["ops"], w0, w1)
        costs[job.name] = nbytes + op_cost * nops
        got[job.name] = {"bytes": nbytes, "ops": nops}
    total_bytes = sum(g["bytes"] for g in got.values())
    total_cost = sum(costs.values()) or 1
    out_jobs: dict[str, Any] = {}
    errors = []
    for job in jobs:
        g = got[job.name]
        share = costs[job.name] / total_cost
        exp = expected[job.name] if expected else None
        err = abs(share / exp - 1) if exp else None
        if err is not None:
            errors.append(err)
        r = per_job[job.name]
        out_jobs[job.name] = {
            "user": job.user,
            "group": job.group,
            "nodes": job.nodes,
            "procs": job.procs,
            "size": job.size,
            "op": job.op,
            "start": job.start,
            "stop": job.stop,
            "bps": g["bytes"] / span,
            "ops_per_s": g["ops"] / span,
            "expected_share": exp,
            "achieved_share": share,
            "achieved_byte_share": g["bytes"] / total_bytes if total_bytes else 0.0,
            "share_error": err,
            "server_bps": srv[job.name] / span,
            "server_share": srv_cost[job.name] / srv_total,
            "client_cpu_s": r["cpu"],
            "errors": r["errors"][:5],
        }
        if job.burst:
            lat = [b for t, b in r["bursts"] if w0 <= t and t + b <= w1]
            out_jobs[job.name]["bursts"] = {
                "count": len(lat),
                "mean_s": statistics.fmean(lat) if lat else None,
                "p50_s": statistics.median(lat) if lat else None,
                "max_s": max(lat) if lat else None,
                "cv": statistics.pstdev(lat) / statistics.fmean(lat) if len(lat) > 1 else None,
            }
    aggregate = total_bytes / span
    ref = expected or {j.name: 1 / len(jobs) for j in jobs}
    fairness = jain([out_jobs[j.name]["achieved_share"] / ref[j.name] for j in jobs])
    # CPU over the window (samples nearest to its edges)
    cpu = {}
    if len(mon.times) > 1:

        def at(values: Sequence[float], t: float) -> float:
            return _interp(mon.times, values, t)

        busy = [m[0] for m in mon.machine]
        total = [m[1] for m in mon.machine]
        jiffies = at(total, w1) - at(total, w0)
        ncpu = os.cpu_count() or 1
        irq = [m[2] for m in mon.machine]
        busy_cores = (at(busy, w1) - at(busy, w0)) / max(1.0, jiffies) * ncpu
        irq_cores = (at(irq, w1) - at(irq, w0)) / max(1.0, jiffies) * ncpu
        servers = (at(mon.cpu_servers, w1) - at(mon.cpu_servers, w0)) / span
        clients = (at(mon.cpu_clients, w1) - at(mon.cpu_clients, w0)) / span
        main = (at(mon.cpu_main, w1) - at(mon.cpu_main, w0)) / span
        cpu = {
            "cores": ncpu,
            "machine_busy_cores": busy_cores,
            "servers_cores": servers,
            "clients_cores": clients,
            "bench_main_cores": main,
            "irq_cores": irq_cores,
            "other_cores": max(0.0, busy_cores - servers - clients - main - irq_cores),
            "saturated": busy_cores > 0.9 * ncpu,
        }
    fine_t = [round(i * RES, 3) for i in range(round(duration / RES))]
    result: dict[str, Any] = {
        "policy": policy["policy"],
        "policy_spec": policy,
        "device_bandwidth_bps": sc.device_bandwidth,
        "servers": sc.servers,
        "capacity_bps": capacity,
        "aggregate_bps": aggregate,
        "aggregate_over_capacity": aggregate / capacity if capacity else None,
        "window_s": [w0, w1],
        "duration_s": duration,
        "warmup_s": warmup,
        "jobs": out_jobs,
        "max_share_error": max(errors) if errors else None,
        "jain_index": fairness,
        "jain_reference": "expected shares" if expected else "equal per job",
        "measured_by": "servers (stats op)" if server_side else "clients",
        "cpu": cpu,
        "series": {
            "bucket_s": bucket,
            "t": [round((i + 0.5) * bucket, 4) for i in range(len(fine_t) // round(bucket / RES))],
            "jobs_bps": {j.name: _coarse(per_job[j.name]["bytes"], bucket, duration) for j in jobs},
            "server_t": [round(t, 3) for t in mon.times],
            "server_bytes": {j.name: [s.get(j.name, (0, 0))[0] for s in mon.served] for j in jobs},
            "queued": mon.queued,
        },
    }
    if any(j.start > 0 or j.stop is not None for j in jobs):
        result["reactions"] = reactions(jobs, policy, per_job, duration, capacity)
        result["phases"] = phases(jobs, policy, per_job, duration, warmup, op_cost)
        phase_errs = [
            p["max_share_error"] for p in result["phases"] if p["max_share_error"] is not None
        ]
        result["max_phase_share_error"] = max(phase_errs) if phase_errs else None
    return result


def _active(jobs: Sequence[JobSpec], t: float, duration: float) -> list[JobSpec]:
    return [j for j in jobs if j.start <= t < j.stop_at(duration)]


def _events(jobs: Sequence[JobSpec], duration: float) -> list[tuple[float, str, str]]:
    ev = [(j.start, "arrival", j.name) for j in jobs if j.start > 0]
    ev += [
        (j.stop_at(duration), "departure", j.name) for j in jobs if j.stop_at(duration) < duration
    ]
    return sorted(ev)


def phases(
    jobs: Sequence[JobSpec],
    policy: dict[str, Any],
    per_job: dict[str, Any],
    duration: float,
    warmup: float,
    op_cost: int,
) -> list[dict[str, Any]]:
    """Shares in each interval between arrivals/departures (after a settle time)."""
    cuts = sorted({0.0, duration, *(t for t, _, _ in _events(jobs, duration))})
    out = []
    for a, b in itertools.pairwise(cuts):
        active = _active(jobs, (a + b) / 2, duration)
        settle = warmup if a == 0 else 0.5
        lo, hi = a + settle, b
        if not active or hi - lo < 0.5:
            continue
        costs = {
            j.name: _window_sum(per_job[j.name]["bytes"], lo, hi)
            + op_cost * _window_sum(per_job[j.name]["ops"], lo, hi)
            for j in active
        }
        total = sum(costs.values()) or 1
        exp = expected_for(policy, active)
        shares = {k: v / total for k, v in costs.items()}
        errs = [abs(shares[k] / exp[k] - 1) for k in shares] if exp else []
        out.append(
            {
                "window_s": [lo, hi],
                "jobs": [j.name for j in active],
                "expected": exp,
                "achieved": shares,
                "aggregate_bps": sum(_window_sum(per_job[j.name]["bytes"], lo, hi) for j in active)
                / (hi - lo),
                "max_share_error": max(errs) if errs else None,
            }
        )
    return out


def reactions(
    jobs: Sequence[JobSpec],
    policy: dict[str, Any],
    per_job: dict[str, Any],
    duration: float,
    capacity: float | None,
) -> list[dict[str, Any]]:
    """How long after each arrival/departure the jobs then active reach their new rates.

    ``share_s``: first delay after which every active job gets, over the next WINDOW_REACT
    seconds, at least (1 - REACT_TOL) of its new expected rate (share x the aggregate measured
    then). ``aggregate_s``: first delay after which the active jobs together move at least
    (1 - REACT_TOL) of the device capacity (work conservation). None: not within the phase.
    """
    out = []
    events = _events(jobs, duration)
    for n, (t_event, kind, name) in enumerate(events):
        t_next = events[n + 1][0] if n + 1 < len(events) else duration
        active = _active(jobs, t_event + 1e-6, duration)
        exp = expected_for(policy, active)
        steps = int((t_next - t_event - WINDOW_REACT) / RES)
        share_s = agg_s = None
        # The rate each job should reach: its share of what the device delivers late in the phase.
        late = max(t_event, t_next - 1.5)
        late_total = sum(_window_sum(per_job[j.name]["bytes"], late, t_next) for j in active)
        late_rate = late_total / max(RES, t_next - late)
        ref_total = capacity or late_rate
        for k in range(max(0, steps)):
            a = t_event + k * RES
            b = a + WINDOW_REACT
            rates = {
                j.name: _window_sum(per_job[j.name]["bytes"], a, b) / WINDOW_REACT for j in active
            }
            if agg_s is None and sum(rates.values()) >= (1 - REACT_TOL) * ref_total:
                agg_s = k * RES
            if (
                share_s is None
                and exp
                and all(rates[j] >= (1 - REACT_TOL) * exp[j] * late_rate for j in rates)
            ):
                share_s = k * RES
            if agg_s is not None and (share_s is not None or not exp):
                break
        out.append(
            {
                "t_s": t_event,
                "event": kind,
                "job": name,
                "active_after": [j.name for j in active],
                "share_s": share_s,
                "aggregate_s": agg_s,
            }
        )
    return out


# ---------------------------------------------------------------------------------------- output
def _mbps(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e6:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 150)


def print_run(result: dict[str, Any], title: str = "") -> None:
    from rich.table import Table

    cap = result["capacity_bps"]
    w0, w1 = result["window_s"]
    t = Table(
        title=f"{title or 'fairness'}: policy {result['policy']}, window {w0:.1f}-{w1:.1f} s",
        caption=(
            f"aggregate {_mbps(result['aggregate_bps'])} MB/s"
            + (f" = {_pct(result['aggregate_over_capacity'])} of {_mbps(cap)} MB/s" if cap else "")
            + f"; max share error {_pct(result['max_share_error'])}"
            + (f"; Jain {result['jain_index']:.3f}" if result["jain_index"] else "")
            + _cpu_text(result["cpu"])
        ),
    )
    for col in (
        "job",
        "user/group",
        "nodes",
        "procs",
        "op size",
        "MB/s",
        "expected",
        "achieved",
        "bytes",
        "server",
        "error",
    ):
        t.add_column(col, justify="left" if col in ("job", "user/group", "op size") else "right")
    from iosvc.policies import format_size

    for name, j in result["jobs"].items():
        t.add_row(
            name,
            f"{j['user']}/{j['group']}",
            str(j["nodes"]),
            str(j["procs"]),
            f"{j['op']} {format_size(j['size'])}",
            _mbps(j["bps"]),
            _pct(j["expected_share"]),
            _pct(j["achieved_share"]),
            _pct(j["achieved_byte_share"]),
            _pct(j["server_share"]),
            _pct(j["share_error"]),
        )
    _console().print(t)
    for r in result.get("reactions", []):
        _console().print(
            f"  {r['event']} of {r['job']} at {r['t_s']:.1f} s: shares reached after "
            f"{_f(r['share_s'], '{:.2f} s')}, device busy again after "
            f"{_f(r['aggregate_s'], '{:.2f} s')}"
        )
    for j in result["jobs"].values():
        if j["errors"]:
            _console().print(f"  [red]client errors: {j['errors']}[/red]")


def _cpu_text(cpu: dict[str, Any]) -> str:
    if not cpu:
        return ""
    text = (
        f"; CPU: servers {cpu['servers_cores']:.2f}, clients {cpu['clients_cores']:.2f}, "
        f"bench {cpu['bench_main_cores']:.2f}, irq {cpu['irq_cores']:.2f}, "
        f"others {cpu['other_cores']:.2f} of {cpu['cores']} cores"
    )
    return text + (" [SATURATED]" if cpu["saturated"] else "")


def plot_runs(
    runs: Sequence[tuple[str, dict[str, Any]]], path: Path, title: str, ncols: int = 4
) -> None:
    """Throughput per job over time, one panel per run (ThemisIO-style timelines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(7.0, 4.2 * ncols), 3.0 * nrows + 0.6),
        squeeze=False,
        sharey=True,
    )
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names: list[str] = []
    for _, res in runs:
        names += [n for n in res["series"]["jobs_bps"] if n not in names]
    color = {n: palette[k % len(palette)] for k, n in enumerate(names)}
    for ax, (label, res) in zip(axes.flat, runs, strict=False):
        series = res["series"]
        cap = res["capacity_bps"]
        w0, w1 = res["window_s"]
        total = [0.0] * len(series["t"])
        for name, bps in series["jobs_bps"].items():
            c = color[name]
            ax.plot(series["t"], [b / 1e6 for b in bps], color=c, lw=1.2, label=name)
            total = [a + b for a, b in zip(total, bps, strict=False)]
            exp = res["jobs"][name]["expected_share"]
            # with mixed request sizes the shares are of cost, not bytes: no line in bytes/s
            one_size = len({j["size"] for j in res["jobs"].values()}) == 1
            if exp and cap and one_size:
                ax.hlines(exp * cap / 1e6, w0, w1, colors=c, linestyles="--", lw=0.9)
        ax.plot(series["t"], [b / 1e6 for b in total], color="0.45", lw=0.8, ls=":", label="sum")
        if cap:
            ax.axhline(cap / 1e6, color="0.7", lw=0.6)
        ax.axvspan(0, w0, color="0.93", lw=0)
        for r in res.get("reactions", []):
            ax.axvline(r["t_s"], color="0.5", lw=0.6, ls="-.")
        err = res["max_share_error"]
        ax.set_title(
            f"{label}\nagg {res['aggregate_bps'] / 1e6:.0f} MB/s"
            + (f", max err {100 * err:.1f}%" if err is not None else ""),
            fontsize=9,
        )
        ax.set_xlabel("time (s)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, res["duration_s"])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, lw=0.4)
    for ax in axes[:, 0]:
        ax.set_ylabel("MB/s", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper right", ncol=2, framealpha=0.8)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    width, height = fig.get_size_inches()
    note = textwrap.fill(
        "solid: bytes completed per job as seen by the clients (0.1 s bins); dotted: their sum; "
        "dashed: expected share x device capacity (one request size only); grey line: capacity; "
        "grey band: warm-up; "
        "dash-dot: arrival/departure",
        width=int(width * 15),
    )
    fig.text(0.01, 0.01, note, fontsize=7, color="0.3", va="bottom")
    lines = note.count("\n") + 1
    fig.tight_layout(rect=(0, (0.05 + 0.14 * lines) / height, 1, 1 - 0.2 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ single run
async def run_single(args: argparse.Namespace) -> dict[str, Any]:
    from iosvc.policies import parse_rate

    bw = parse_rate(args.device_bandwidth) if args.device_bandwidth not in (None, "none") else None
    sc = Scenario(
        name="cli",
        title="command line",
        jobs=args.job,
        duration=args.duration,
        warmup=args.warmup,
        servers=args.servers,
        device_bandwidth=bw,
        slots=args.slots,
    )
    policy = policy_spec(args.policy, sc, sc.jobs)
    with tempfile.TemporaryDirectory(prefix="iosvc-fair-") as tmp:
        bench = Bench(sc, Path(tmp))
        try:
            await bench.start()
            result = await measure(bench, sc.jobs, policy, args.bucket, attempts=args.attempts)
        finally:
            await bench.stop()
    result["scenario"] = {"jobs": [asdict(j) for j in sc.jobs]}
    result["machine"] = machine_info()
    print_run(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot_runs([(result["policy"], result)], Path(args.plot), "fairness", ncols=1)
    return result


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_end": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------- matrix
def scenarios(quick: bool = False) -> list[Scenario]:
    d = 4.0 if quick else 6.0
    four_v_one = [
        JobSpec("A", "alice", "g1", nodes=4, procs=4),
        JobSpec("B", "bob", "g2", nodes=1, procs=1),
    ]
    mixed = [
        JobSpec("A", "alice", "g1", nodes=4, procs=4),
        JobSpec("B", "alice", "g1", nodes=1, procs=1),
        JobSpec("C", "bob", "g2", nodes=2, procs=2),
        JobSpec("D", "carol", "g2", nodes=1, procs=2),
    ]
    return [
        Scenario(
            "4v1",
            "ThemisIO test.4v1: a 4-node job (4 procs) and a 1-node job (1 proc), 1 MiB reads",
            four_v_one,
            duration=d,
        ),
        Scenario(
            "mixed4",
            "4 jobs, 3 users, 2 groups, node counts 4/1/2/1, 4/1/2/2 procs, 1 MiB reads",
            mixed,
            duration=d,
        ),
        Scenario(
            "procs",
            "process count: 8 procs vs 1 proc, both 1-node jobs, 1 MiB reads",
            [
                JobSpec("A", "alice", "g1", nodes=1, procs=8, qd=1),
                JobSpec("B", "bob", "g2", nodes=1, procs=1),
            ],
            duration=d,
        ),
        Scenario(
            "reqsize",
            "request size: 4 MiB vs 4 KiB requests, 1-node jobs, 2 procs each",
            [
                JobSpec("A", "alice", "g1", nodes=1, procs=2, size=4 * MiB),
                JobSpec("B", "bob", "g2", nodes=1, procs=2, size=4096),
            ],
            duration=d,
            solo=True,
            note="The 4 KiB job is bound by CPU (one gRPC stream message per 4 KiB), not by "
            "the device; 'solo' runs measure each job alone to tell what it can demand.",
        ),
        Scenario(
            "striped",
            "4v1 on 2 servers x 200 MB/s (files striped over both servers)",
            four_v_one,
            duration=d,
            servers=2,
            device_bandwidth=200e6,
        ),
        Scenario(
            "churn",
            "arrival and departure: A (2 nodes) throughout, B (1 node) arrives at 2 s, "
            "C (1 node, 2 procs) leaves at 6 s",
            [
                JobSpec("A", "alice", "g1", nodes=2, procs=2),
                JobSpec("B", "bob", "g2", nodes=1, procs=1, start=2.0),
                JobSpec("C", "carol", "g2", nodes=1, procs=2, stop=6.0),
            ],
            duration=9.0 if not quick else 7.0,
            kind="churn",
        ),
        Scenario(
            "write4v1",
            "writes: 4v1 with open_writer streams (4 files at once per process), 200 MB/s device "
            "(writes cost the server more CPU than reads)",
            [
                JobSpec("A", "alice", "g1", nodes=4, procs=4, op="write", qd=4),
                JobSpec("B", "bob", "g2", nodes=1, procs=1, op="write", qd=4),
            ],
            duration=d,
            device_bandwidth=200e6,
            policies=("fifo", "job-fair", "size-fair"),
        ),
        Scenario(
            "hogvictim",
            "hog and victim: an 8-proc job streaming 4 MiB reads vs a 1-node job reading "
            "8 MiB bursts (1 MiB requests) with 0.2 s think time",
            [
                JobSpec("hog", "hogger", "g1", nodes=1, procs=8, size=4 * MiB, qd=1),
                JobSpec("victim", "vic", "g2", nodes=1, procs=1, burst=8 * MiB, think=0.2),
            ],
            duration=7.0 if quick else 11.0,
            kind="hogvictim",
        ),
        Scenario(
            "overhead",
            "scheduler overhead without a device cap (CPU-bound): 4v1 jobs, size-fair vs fifo, "
            "alternating rounds",
            four_v_one,
            duration=3.0 if quick else 4.0,
            device_bandwidth=None,
            policies=("fifo", "size-fair"),
            kind="overhead",
            repeats=2 if quick else 6,
        ),
    ]


async def run_scenario(
    sc: Scenario, workdir: Path, bucket: float, only_policies: Sequence[str] | None
) -> dict[str, Any]:
    console = _console()
    console.rule(f"[bold]{sc.name}[/bold]: {sc.title}")
    policies = list(only_policies) if only_policies else list(sc.policies)
    if not sc.device_bandwidth:
        policies = [p for p in policies if p != "tbf"]  # caps are fractions of the device
    out: dict[str, Any] = {
        "title": sc.title,
        "kind": sc.kind,
        "note": sc.note,
        "servers": sc.servers,
        "device_bandwidth_bps": sc.device_bandwidth,
        "slots": sc.slots,
        "duration_s": sc.duration,
        "warmup_s": sc.warmup,
        "jobs": [asdict(j) for j in sc.jobs],
        "runs": {},
    }
    bench = Bench(sc, workdir)
    t_start = time.monotonic()
    try:
        await bench.start()
        if sc.solo or sc.kind == "hogvictim":
            out["solo"] = {}
            alone_policies = ["fifo"] + (
                ["tbf"] if sc.kind == "hogvictim" and "tbf" in policies else []
            )
            solo_jobs = [j for j in sc.jobs if j.burst] if sc.kind == "hogvictim" else sc.jobs
            for job in solo_jobs:
                for pname in alone_policies:
                    # tbf alone keeps the cap it has with all the scenario's jobs
                    policy = policy_spec(pname, sc, sc.jobs)
                    solo = replace(job, start=0.0, stop=None)
                    res = await measure(bench, [solo], policy, bucket)
                    print_run(res, f"{sc.name}: {job.name} alone")
                    out["solo"][f"{job.name}@{pname}"] = res
        if sc.kind == "overhead":
            # ABBA order: a drift of the machine over the run hits both policies alike
            order = [
                p for r in range(sc.repeats) for p in (policies if r % 2 == 0 else policies[::-1])
            ]
            rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
            for pname in order:
                policy = policy_spec(pname, sc, sc.jobs)
                res = await measure(bench, sc.jobs, policy, bucket)
                print_run(res, f"{sc.name} round {len(rounds[pname]) + 1}")
                rounds[pname].append(res)
            for pname in policies:
                out["runs"][pname] = rounds[pname][-1]
                out["runs"][pname]["rounds_aggregate_bps"] = [
                    r["aggregate_bps"] for r in rounds[pname]
                ]
        else:
            for pname in policies:
                policy = policy_spec(pname, sc, sc.jobs)
                res = await measure(bench, sc.jobs, policy, bucket)
                print_run(res, sc.name)
                out["runs"][pname] = res
    finally:
        await bench.stop()
    out["wall_s"] = time.monotonic() - t_start
    summarise_scenario(sc, out)
    return out


def summarise_scenario(sc: Scenario, out: dict[str, Any]) -> None:
    """Scenario-level figures: hog/victim comparison, overhead ratio, reaction times."""
    runs = out["runs"]
    if sc.kind == "overhead" and {"fifo", "size-fair"} <= runs.keys():
        f = runs["fifo"]["rounds_aggregate_bps"]
        s = runs["size-fair"]["rounds_aggregate_bps"]
        pairs = [b / a for a, b in zip(f, s, strict=False)]  # adjacent rounds (ABBA)
        out["overhead"] = {
            "fifo_bps": f,
            "size_fair_bps": s,
            "ratio_median_of_rounds": statistics.median(pairs),
            "ratio_of_medians": statistics.median(s) / statistics.median(f),
            "target": AGG_TARGET,
        }
    if sc.kind == "hogvictim":
        alone = out["solo"].get("victim@fifo")
        alone_tbf = out["solo"].get("victim@tbf")
        base_lat = alone["jobs"]["victim"]["bursts"]["mean_s"] if alone else None
        base_bps = alone["jobs"]["victim"]["bps"] if alone else None
        cap = (sc.device_bandwidth or 0) * sc.servers
        table = {}
        for pname, res in runs.items():
            v = res["jobs"]["victim"]
            _w0, _w1 = res["window_s"]
            per_sec = _per_second(res, "victim")
            cv = statistics.pstdev(per_sec) / statistics.fmean(per_sec) if per_sec else None
            fair_v = min(base_bps or 0, cap / 2)
            fair_h = cap - fair_v
            x = [v["bps"] / fair_v if fair_v else None, res["jobs"]["hog"]["bps"] / fair_h]
            table[pname] = {
                "aggregate_bps": res["aggregate_bps"],
                "victim_bps": v["bps"],
                "hog_bps": res["jobs"]["hog"]["bps"],
                "victim_burst_mean_s": v["bursts"]["mean_s"],
                "victim_slowdown": (v["bursts"]["mean_s"] / base_lat)
                if base_lat and v["bursts"]["mean_s"]
                else None,
                "victim_runtime_slowdown": (v["bursts"]["mean_s"] + sc.jobs[1].think)
                / (base_lat + sc.jobs[1].think)
                if base_lat and v["bursts"]["mean_s"]
                else None,
                "victim_cv_per_second": cv,
                "victim_burst_cv": v["bursts"]["cv"],
                "victim_per_second_bps": per_sec,
                "jain_index": jain(x),
            }
        ref = table.get("tbf")
        fifo = table.get("fifo")
        for row in table.values():
            if ref:
                row["aggregate_vs_tbf"] = row["aggregate_bps"] / ref["aggregate_bps"]
                row["cv_reduction_vs_tbf"] = (
                    1 - row["victim_cv_per_second"] / ref["victim_cv_per_second"]
                    if row["victim_cv_per_second"] is not None and ref["victim_cv_per_second"]
                    else None
                )
                row["slowdown_reduction_vs_tbf"] = _slow_red(row, ref)
                row["burst_cv_reduction_vs_tbf"] = (
                    1 - row["victim_burst_cv"] / ref["victim_burst_cv"]
                    if row["victim_burst_cv"] is not None and ref["victim_burst_cv"]
                    else None
                )
            if fifo:
                row["slowdown_reduction_vs_fifo"] = _slow_red(row, fifo)
        out["hogvictim"] = {
            "victim_alone_burst_s": base_lat,
            "victim_alone_bps": base_bps,
            "victim_alone_tbf_burst_s": alone_tbf["jobs"]["victim"]["bursts"]["mean_s"]
            if alone_tbf
            else None,
            "policies": table,
        }


def _slow_red(row: dict[str, Any], ref: dict[str, Any]) -> float | None:
    a, b = row["victim_slowdown"], ref["victim_slowdown"]
    if a is None or b is None or b <= 1:
        return None
    return float((b - a) / (b - 1))


def _per_second(res: dict[str, Any], name: str) -> list[float]:
    """Per-second throughput of a job over the window (1 s bins)."""
    w0, w1 = res["window_s"]
    series = res["series"]
    bucket = series["bucket_s"]
    bps = series["jobs_bps"][name]
    k = round(1.0 / bucket)
    first = math.ceil(w0 / bucket)
    out = []
    i = first
    while (i + k) * bucket <= w1 + 1e-9:
        out.append(sum(bps[i : i + k]) / k)
        i += k
    return out


async def run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    from iosvc.policies import parse_rate

    all_sc = scenarios(args.quick)
    if args.device_bandwidth not in (None, "400MB/s"):
        # Rescale the device of every capped scenario (ratios between scenarios are kept).
        bw = parse_rate(args.device_bandwidth)
        for sc in all_sc:
            if sc.device_bandwidth:
                sc.device_bandwidth = bw if sc.servers == 1 else bw / sc.servers
    if args.scenarios:
        wanted = set(args.scenarios.split(","))
        all_sc = [s for s in all_sc if s.name in wanted]
    only = args.policies.split(",") if args.policies else None
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "targets": {
            "max_share_error": SHARE_TARGET,
            "aggregate_over_capacity": AGG_TARGET,
            "departure_reaction_s": 0.5,
            "overhead_ratio": AGG_TARGET,
            "hogvictim": {"aggregate_vs_tbf": 1.135, "cv_reduction_vs_tbf": 0.20, "jain": 0.98},
        },
        "scenarios": {},
    }
    previous = out_dir / "fairness_matrix.json"
    if args.merge and previous.exists():
        # Re-run some scenarios (e.g. one disturbed by other jobs) and keep the others' results.
        kept = json.loads(previous.read_text())["scenarios"]
        matrix["scenarios"] = {k: v for k, v in kept.items() if k not in {s.name for s in all_sc}}
        matrix["merged_from_previous_run"] = sorted(matrix["scenarios"])
    t0 = time.monotonic()
    BUDGET.deadline = t0 + args.budget
    with tempfile.TemporaryDirectory(prefix="iosvc-fair-") as tmp:
        for sc in all_sc:
            res = await run_scenario(sc, Path(tmp), args.bucket, only)
            matrix["scenarios"][sc.name] = res
            runs = list(res["runs"].items())
            if runs:
                plot_runs(
                    [(p, r) for p, r in runs]
                    + [(f"{k} (alone)", r) for k, r in res.get("solo", {}).items()],
                    out_dir / f"fairness_{sc.name}.png",
                    f"{sc.name}: {sc.title}",
                )
            # Write as we go: a long matrix leaves results even if a later scenario fails.
            matrix["wall_s"] = time.monotonic() - t0
            (out_dir / "fairness_matrix.json").write_text(json.dumps(matrix, indent=1))
    matrix["machine"]["loadavg_at_end"] = os.getloadavg()
    matrix["wall_s"] = time.monotonic() - t0
    (out_dir / "fairness_matrix.json").write_text(json.dumps(matrix, indent=1))
    report = matrix_report(matrix)
    (out_dir / "fairness_report.md").write_text(report)
    print_matrix_summary(matrix)
    return matrix


# ---------------------------------------------------------------------------------------- report
def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _ok(flag: bool | None) -> str:
    return "" if flag is None else (" ✓" if flag else " ✗")


def shares_text(res: dict[str, Any], key: str) -> str:
    return " / ".join(
        "-" if j[key] is None else f"{100 * j[key]:.1f}" for j in res["jobs"].values()
    )


def summary_rows(matrix: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for sname, sc in matrix["scenarios"].items():
        if sc["kind"] in ("hogvictim",):
            continue
        for pname, res in sc["runs"].items():
            err = res.get("max_share_error")
            cap = res["aggregate_over_capacity"]
            rows.append(
                {
                    "scenario": sname,
                    "policy": pname,
                    "jobs": "/".join(res["jobs"]),
                    "expected": shares_text(res, "expected_share"),
                    "achieved": shares_text(res, "achieved_share"),
                    "bytes": shares_text(res, "achieved_byte_share"),
                    "max_share_error": err,
                    "phase_error": res.get("max_phase_share_error"),
                    "agg_over_capacity": cap,
                    "aggregate_bps": res["aggregate_bps"],
                    "jain": res["jain_index"],
                    "cpu": res["cpu"],
                    "share_ok": None if err is None else err <= SHARE_TARGET,
                    "agg_ok": None if cap is None else cap >= AGG_TARGET,
                }
            )
    return rows


def matrix_report(matrix: dict[str, Any]) -> str:
    t = matrix["targets"]
    lines = [
        "# Fair-share benchmark report",
        "",
        f"Generated by `bench/fairness.py --matrix` on {matrix['created']} "
        f"({matrix['wall_s']:.0f} s wall; {matrix['machine']['cpus']} CPUs, Python "
        f"{matrix['machine']['python']}). Raw numbers: `fairness_matrix.json`.",
        "",
        "Each run: real server processes with an emulated device (`--device-bandwidth`, 16 "
        "slots, the device booked at grant time in 128 KiB pieces), "
        "real client processes declaring their job through `IOSVC_*`, 1 s warm-up excluded. "
        "Shares are measured by the clients (bytes per 10 ms) over the window in which every job "
        "is active; `server` shares from the servers' `stats` op agree (see the JSON). "
        "Shares are shares of the scheduler's cost, bytes + op_cost (128 KiB) per request; they "
        "equal byte shares when all jobs use one request size ('bytes' column otherwise).",
        "",
        f"Targets: max share error <= {t['max_share_error']:.0%}; aggregate >= "
        f"{t['aggregate_over_capacity']:.0%} of the device; departure reaction <= "
        f"{t['departure_reaction_s']} s; no-cap overhead ratio >= {t['overhead_ratio']:.0%}; "
        "hog/victim vs tbf: aggregate >= 1.135x, victim variation >= 20% lower, Jain >= 0.98.",
        "",
        "## Shares (expected vs achieved, % per job in the order of the jobs column)",
        "",
        "| scenario | policy | jobs | expected % | achieved % | byte % | max share error | "
        "aggregate / device | Jain | CPU busy (ours + others) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(matrix):
        cpu = r["cpu"]
        cpu_txt = (
            f"{cpu['machine_busy_cores']:.2f}/{cpu['cores']} "
            f"({cpu['servers_cores'] + cpu['clients_cores']:.2f} + {cpu['other_cores']:.2f})"
            + (" **sat**" if cpu["saturated"] else "")
            if cpu
            else "-"
        )
        err = r["max_share_error"]
        lines.append(
            f"| {r['scenario']} | {r['policy']} | {r['jobs']} | {r['expected']} | "
            f"{r['achieved']} | {r['bytes']} | "
            f"{_f(err, '{:.3f}')}{_ok(r['share_ok'])}"
            + (f" (phases {r['phase_error']:.3f})" if r["phase_error"] is not None else "")
            + f" | {_f(r['agg_over_capacity'], '{:.3f}')}{_ok(r['agg_ok'])} | "
            f"{_f(r['jain'])} | {cpu_txt} |"
        )
    for sname, sc in matrix["scenarios"].items():
        if sc.get("solo") and sc["kind"] != "hogvictim":
            alone = {k.split("@")[0]: r["aggregate_bps"] for k, r in sc["solo"].items()}
            lines += [
                "",
                f"**{sname}: throughput with the other job / alone** (1.0 = no slowdown): "
                + "; ".join(
                    f"{p}: "
                    + ", ".join(
                        f"{j} {v['bps'] / alone[j]:.2f}"
                        for j, v in r["jobs"].items()
                        if alone.get(j)
                    )
                    for p, r in sc["runs"].items()
                ),
            ]
            lines += [
                "",
                f"**{sname}, each job alone (fifo):** "
                + ", ".join(
                    f"{k.split('@')[0]} {r['aggregate_bps'] / 1e6:.1f} MB/s "
                    f"({r['jobs'][k.split('@')[0]]['ops_per_s']:.0f} requests/s, CPU busy "
                    f"{r['cpu'].get('machine_busy_cores', 0):.2f} cores)"
                    for k, r in sc["solo"].items()
                )
                + ". "
                + sc.get("note", ""),
            ]
    # churn
    churn = [(n, s) for n, s in matrix["scenarios"].items() if s["kind"] == "churn"]
    for sname, sc in churn:
        lines += [
            "",
            f"## Arrival and departure ({sname})",
            "",
            sc["title"] + ". Reaction = delay after the event until every active job gets >= 90% "
            "of its new expected rate over the next 0.2 s ('shares'), or the active jobs together "
            "move >= 90% of the device ('device'). Resolution 10 ms.",
            "",
            "| policy | event | shares reached after | device busy after | phase share errors |",
            "|---|---|---|---|---|",
        ]
        for pname, res in sc["runs"].items():
            perr = ", ".join(_f(p["max_share_error"]) for p in res.get("phases", []))
            for r in res.get("reactions", []):
                lines.append(
                    f"| {pname} | {r['event']} of {r['job']} at {r['t_s']:g} s | "
                    f"{_f(r['share_s'], '{:.2f} s')} | {_f(r['aggregate_s'], '{:.2f} s')} | "
                    f"{perr} |"
                )
    for sname, sc in matrix["scenarios"].items():
        if "hogvictim" in sc:
            hv = sc["hogvictim"]
            lines += [
                "",
                f"## Hog and victim ({sname})",
                "",
                sc["title"] + ". Victim alone (same run, fifo, free device): burst "
                f"{_f(hv['victim_alone_burst_s'], '{:.3f} s')}, "
                f"{_f(hv['victim_alone_bps'] and hv['victim_alone_bps'] / 1e6, '{:.1f}')} MB/s; "
                f"alone under tbf: burst {_f(hv['victim_alone_tbf_burst_s'], '{:.3f} s')}. "
                "Slowdown = mean burst time with the hog / alone. Jain's index over throughput "
                "normalised by the equal-weight max-min fair allocation (victim capped at its "
                "alone demand). CV (1 s) = coefficient of variation of the victim's per-second "
                "throughput; it mostly measures how many whole bursts fall into each 1 s bin "
                "(a period of burst + 0.2 s think that divides 1 s gives 0 exactly), so the "
                "burst CV (variation of the time each 8 MiB burst takes) is the one to compare.",
                "",
                "| policy | aggregate MB/s | vs tbf | victim MB/s | victim burst s | slowdown | "
                "slowdown cut vs fifo | vs tbf | victim CV (1 s) | CV cut vs tbf | burst CV | "
                "burst CV cut vs tbf | Jain |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for pname, row in hv["policies"].items():
                lines.append(
                    f"| {pname} | {row['aggregate_bps'] / 1e6:.1f} | "
                    f"{_f(row.get('aggregate_vs_tbf'), '{:.3f}x')} | "
                    f"{row['victim_bps'] / 1e6:.1f} | {_f(row['victim_burst_mean_s'])} | "
                    f"{_f(row['victim_slowdown'], '{:.2f}x')} | "
                    f"{_f(row.get('slowdown_reduction_vs_fifo'), '{:.1%}')} | "
                    f"{_f(row.get('slowdown_reduction_vs_tbf'), '{:.1%}')} | "
                    f"{_f(row['victim_cv_per_second'])} | "
                    f"{_f(row.get('cv_reduction_vs_tbf'), '{:.1%}')} | "
                    f"{_f(row['victim_burst_cv'])} | "
                    f"{_f(row.get('burst_cv_reduction_vs_tbf'), '{:.1%}')} | "
                    f"{_f(row['jain_index'])} |"
                )
        if "overhead" in sc:
            o = sc["overhead"]
            lines += [
                "",
                f"## Scheduler overhead without a device cap ({sname})",
                "",
                sc["title"]
                + f". Rounds (MB/s): fifo {', '.join(f'{x / 1e6:.0f}' for x in o['fifo_bps'])}; "
                f"size-fair {', '.join(f'{x / 1e6:.0f}' for x in o['size_fair_bps'])}. "
                f"size-fair / fifo: median of adjacent pairs (ABBA order) "
                f"**{o['ratio_median_of_rounds']:.3f}**, "
                f"ratio of medians {o['ratio_of_medians']:.3f} (target >= {o['target']:.2f}).",
            ]
    lines += ["", "## Plots", ""]
    for sname in matrix["scenarios"]:
        lines.append(f"![{sname}](fairness_{sname}.png)")
    lines.append("")
    return "\n".join(lines)


def print_matrix_summary(matrix: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="fairness matrix")
    for col in ("scenario", "policy", "expected %", "achieved %", "max err", "agg/device", "Jain"):
        t.add_column(col)
    for r in summary_rows(matrix):
        t.add_row(
            r["scenario"],
            r["policy"],
            r["expected"],
            r["achieved"],
            _f(r["max_share_error"]) + _ok(r["share_ok"]),
            _f(r["agg_over_capacity"]) + _ok(r["agg_ok"]),
            _f(r["jain"]),
        )
    _console().print(t)


# ------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="size-fair", help="preset name, policy file or TOML text")
    p.add_argument("--device-bandwidth", default="400MB/s", help="per server; 'none' for no cap")
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--slots", type=int, default=None, help="server I/O slots (default 16)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--bucket", type=float, default=0.1, help="time-series bin (s)")
    p.add_argument("--job", type=parse_job, action="append", default=[])
    p.add_argument("--attempts", type=int, default=2, help="re-runs of a round disturbed by others")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--matrix", action="store_true", help="every preset over every scenario")
    p.add_argument("--quick", action="store_true", help="matrix with shorter rounds")
    p.add_argument("--scenarios", help="matrix: comma-separated subset")
    p.add_argument(
        "--policies", help="matrix: comma-separated presets or policy files (replace the defaults)"
    )
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument(
        "--merge",
        action="store_true",
        help="matrix: keep the other scenarios of the existing fairness_matrix.json",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=600.0,
        help="matrix: seconds after which rounds are no longer repeated or delayed for quiet",
    )
    args = p.parse_args(argv)
    import uvloop

    if args.matrix:
        uvloop.run(run_matrix(args))
        return 0
    if not args.job:
        p.error("give at least one --job (or --matrix)")
    if len({j.name for j in args.job}) != len(args.job):
        p.error("job names must be distinct")
    uvloop.run(run_single(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

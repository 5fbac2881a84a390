"""The ``iosvc`` command: start/stop a local cluster, serve, and move files.

Errors are printed as one line (``iosvc: error: …``) with exit status 1, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from iosvc.cli._admin import policy_app, quota_app, token_app, top
from iosvc.cli._common import ClusterOpt, console, err_console, make_client, transfer_progress
from iosvc.cli._globus import login, logout
from iosvc.cli._shards import shards_app
from iosvc.cli._staging import datasets_app, stage_app
from iosvc.config import ClusterSpec, find_cluster_file
from iosvc.errors import IosvcError
from iosvc.policies import format_size, load_policy, parse_rate, parse_size

app = typer.Typer(
    name="iosvc",
    help="iosvc: a burst-buffer I/O service with fair-share scheduling for HPC/AI clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(policy_app, name="policy")
app.add_typer(token_app, name="token")
app.add_typer(quota_app, name="quota")
app.add_typer(shards_app, name="shards")
app.add_typer(datasets_app, name="datasets")
app.add_typer(stage_app, name="stage")
app.command()(login)
app.command()(logout)
app.command()(top)
# Progress bars only for transfers above this size.
_PROGRESS_MIN = 32 * 1024 * 1024


TlsCertOpt = Annotated[
    Path | None, typer.Option(help="Serve TLS with this certificate (PEM; with --tls-key).")
]
TlsKeyOpt = Annotated[Path | None, typer.Option(help="Private key of --tls-cert (PEM).")]
TlsCaOpt = Annotated[
    Path | None,
    typer.Option(help="CA that signed the servers' certificates [default: --tls-cert]."),
]


def _size(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


PullRootOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--pull-root",
        help="Let the servers read files under this directory themselves for stage-in "
        "(`iosvc stage --into-buffer` from a site under it): the data goes from the file system "
        "straight into the buffer, not through the client. Repeatable; only for directories "
        "the servers' user may expose to every client (in secure mode only admins may pull).",
    ),
]


# ------------------------------------------------------------------ cluster
@app.command()
def up(
    servers: Annotated[int, typer.Option("--servers", "-n", help="Server processes to start.")] = 2,
    memory: Annotated[
        str | None, typer.Option(help="DRAM capacity per server, e.g. 1GiB (default store).")
    ] = None,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Keep data on local disk under DIR instead; on a tmpfs (/dev/shm), chunk "
            "files go in 2 MiB pages (IOSVC_HUGE_PAGES=0: not).",
        ),
    ] = None,
    capacity: Annotated[str | None, typer.Option(help="Capacity per server with --dir.")] = None,
    slots: Annotated[
        int | None,
        typer.Option(help="Concurrent I/O slots per server [default: 16]."),
    ] = None,
    policy: Annotated[
        str, typer.Option(help="Sharing policy: a preset name or a policy TOML file.")
    ] = "fifo",
    device_bandwidth: Annotated[
        str | None, typer.Option(help="Emulated device bandwidth per server, e.g. 400MB/s.")
    ] = None,
    device_latency: Annotated[float, typer.Option(help="Emulated per-op latency (s).")] = 0.0,
    metrics: Annotated[
        bool, typer.Option(help="Serve Prometheus /metrics on a free port per server.")
    ] = True,
    secure: Annotated[
        bool,
        typer.Option(help="Require signed job tokens (makes a cluster key and an admin token)."),
    ] = False,
    pull_root: PullRootOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: TlsCaOpt = None,
    cluster_file: ClusterOpt = None,
) -> None:
    """Start a local cluster of SERVERS processes on loopback and write its cluster file.

    With --tls-cert/--tls-key the servers speak TLS; the cluster file records the CA
    (--tls-ca, default the certificate itself) so clients of this machine trust it.
    """
    from iosvc.server import LocalCluster

    if memory is not None and directory is not None:
        raise IosvcError("choose --memory or --dir, not both")
    where = find_cluster_file(cluster_file)
    if where.exists():
        spec = ClusterSpec.load(where)
        if any(_pid_alive(p) for p in spec.pids):
            raise IosvcError(f"a cluster is already running ({where}); stop it with `iosvc down`")
        where.unlink()
    load_policy(policy)  # fail here, not in every server
    args = ["--policy", policy, "--device-latency", str(device_latency)]
    if slots is not None:
        args += ["--slots", str(slots)]
    if device_bandwidth:
        args += ["--device-bandwidth", device_bandwidth]
    if metrics:
        args += ["--metrics-port", "0"]
    workdir = where.parent / f"{where.stem}.d"
    cluster = LocalCluster(
        servers,
        memory=_size(memory),
        directory=directory,
        capacity=_size(capacity),
        server_args=args,
        cluster_file=where,
        workdir=workdir,
        secure=secure,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        pull_roots=[str(p) for p in pull_root or ()],
    )
    spec = cluster.start()
    console.print(f"started {servers} iosvc servers ({spec.storage}); cluster file {where}")
    for i, address in enumerate(spec.servers):
        console.print(f"  server {i}: {address} (pid {spec.pids[i]})")
    console.print(f"logs in {workdir}; stop with `iosvc down`")
    if secure:
        console.print(
            f"secure mode: cluster key {cluster.key_file}, admin token {cluster.admin_token_file}"
            " (export IOSVC_TOKEN_FILE=that file to administer; mint job tokens with"
            " `iosvc token issue`)"
        )


@app.command()
def down(cluster_file: ClusterOpt = None) -> None:
    """Stop the local cluster started by `iosvc up` and remove its cluster file."""
    from iosvc.server import stop_pids

    where = find_cluster_file(cluster_file)
    spec = ClusterSpec.load(where)
    killed = stop_pids(list(spec.pids))
    where.unlink(missing_ok=True)
    note = f" ({len(killed)} did not stop in time and were killed)" if killed else ""
    console.print(f"stopped {len(spec.pids)} iosvc servers{note}")


@app.command()
def status(cluster_file: ClusterOpt = None) -> None:
    """Show every server: address, storage, capacity, usage, files, queue."""
    client = make_client(cluster_file)
    table = Table(title=f"iosvc cluster ({'secure' if client.spec.secure else 'open'} mode)")
    for col in ("server", "address", "storage", "used", "capacity", "files", "queued", "uptime"):
        table.add_column(col, no_wrap=True)
    total_used = 0
    servers = client.status()
    for s in servers:
        total_used += s["used"]
        cap = format_size(s["capacity"]) if s["capacity"] else "unbounded"
        table.add_row(
            str(s["index"]),
            s["address"],
            s["storage"].removesuffix("Store").lower(),
            format_size(s["used"]),
            cap,
            str(s["files"]),
            str(s["queued"]),
            f"{s['uptime']:.0f} s",
        )
    console.print(table)
    ports = [str(s["data_port"]) for s in servers if s.get("data_port")]
    if ports:
        console.print(f"data ports (bulk transfers beside gRPC): {', '.join(ports)}")
    else:
        console.print("data ports: off (every transfer goes through gRPC)")
    roots = sorted({r for s in servers for r in s.get("pull_roots") or ()})
    if roots:
        console.print(f"servers stage in from their file system under: {', '.join(roots)}")
    if not any(s.get("secure") for s in servers):
        console.print("open mode: identities are declared by clients, not verified")
    else:
        console.print(f"secure mode: signed job tokens required; you are {client.identity}")


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to bind [default: 127.0.0.1; with --slurm/--hostfile this node's "
            "name in the node list]."
        ),
    ] = None,
    port: Annotated[
        int,
        typer.Option(help="Port to bind (0: any free port; with --slurm/--hostfile: 7311)."),
    ] = 0,
    slurm: Annotated[
        bool,
        typer.Option(
            "--slurm",
            help="One server per node of this Slurm job: nodes from SLURM_JOB_NODELIST, "
            "this one's index from SLURM_NODEID.",
        ),
    ] = False,
    hostfile: Annotated[
        Path | None,
        typer.Option(help="One server per host listed in this file (one per line), in order."),
    ] = None,
    write_cluster_file: Annotated[
        Path | None,
        typer.Option(
            help="Server 0 writes the cluster file here once every server answers "
            "(e.g. in the job's directory; clients set IOSVC_CLUSTER to it)."
        ),
    ] = None,
    index: Annotated[int | None, typer.Option(help="This server's index in --peers.")] = None,
    peers: Annotated[
        str | None, typer.Option(help="Comma-separated host:port of all servers, in order.")
    ] = None,
    memory: Annotated[str | None, typer.Option(help="Keep data in DRAM, up to SIZE.")] = None,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Keep data under DIR; on a tmpfs (/dev/shm), chunk files go in 2 MiB pages "
            "(IOSVC_HUGE_PAGES=0: not).",
        ),
    ] = None,
    capacity: Annotated[str | None, typer.Option(help="Capacity with --dir.")] = None,
    slots: Annotated[int | None, typer.Option(help="Concurrent I/O slots [default: 16].")] = None,
    policy: Annotated[
        str, typer.Option(help="Sharing policy: a preset name or a policy TOML file.")
    ] = "fifo",
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics on this port (0: any free).")
    ] = None,
    device_bandwidth: Annotated[
        str | None, typer.Option(help="Emulated device bandwidth, e.g. 400MB/s.")
    ] = None,
    device_latency: Annotated[float, typer.Option(help="Emulated per-op latency (s).")] = 0.0,
    gc_ttl: Annotated[
        float, typer.Option(help="Age (s) before unused chunks are reclaimed.")
    ] = 600,
    gc_interval: Annotated[float, typer.Option(help="Seconds between GC passes.")] = 60,
    drop_grace: Annotated[
        float, typer.Option(help="Seconds a replaced file's old chunks stay readable.")
    ] = 5.0,
    key_file: Annotated[
        Path | None,
        typer.Option(help="Cluster key: secure mode, only signed job tokens are accepted."),
    ] = None,
    ready_file: Annotated[
        str | None, typer.Option(help="Write 'host:port' here once listening.")
    ] = None,
    inflight_limit: Annotated[
        str,
        typer.Option(
            help="Bytes of write requests held at once; more writers wait (back-pressure)."
        ),
    ] = "256MiB",
    stream_idle_timeout: Annotated[
        float, typer.Option(help="Seconds a write stream may stay silent before it is cut.")
    ] = 60.0,
    pull_root: PullRootOpt = None,
    data_port: Annotated[
        int,
        typer.Option(
            help="Port of the data plane, plain TCP for bulk reads and writes beside gRPC "
            "(0: any free port; -1: off, everything goes through gRPC; always off with TLS)."
        ),
    ] = 0,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """Run one iosvc server in the foreground (SIGTERM stops it gracefully).

    On a cluster: `srun --ntasks-per-node=1 iosvc serve --slurm --dir /local/iosvc
    --write-cluster-file $PWD/cluster.json` (see deploy/slurm/).
    """
    from iosvc.server import ServerOptions, run
    from iosvc.server._hosts import nodes_from_slurm, own_index, read_hostfile

    peer_list = peers.split(",") if peers else None
    if slurm or hostfile is not None:
        if slurm and hostfile is not None:
            raise IosvcError("choose --slurm or --hostfile, not both")
        if peers:
            raise IosvcError("--peers is made from the node list with --slurm/--hostfile")
        nodes = nodes_from_slurm() if slurm else read_hostfile(hostfile)  # type: ignore[arg-type]
        port = port or 7311
        if index is None:
            index = own_index(nodes, address=host)
        elif not 0 <= index < len(nodes):
            raise IosvcError(f"--index {index} outside a node list of {len(nodes)}")
        peer_list = [f"{node}:{port}" for node in nodes]
        host = host or nodes[index]

    run(
        ServerOptions(
            host=host or "127.0.0.1",
            port=port,
            index=index,
            peers=peer_list,
            memory=_size(memory),
            directory=str(directory) if directory else None,
            capacity=_size(capacity),
            slots=slots,
            policy=policy,
            metrics_port=metrics_port,
            device_bandwidth=parse_rate(device_bandwidth) if device_bandwidth else None,
            device_latency=device_latency,
            gc_ttl=gc_ttl,
            gc_interval=gc_interval,
            drop_grace=drop_grace,
            key_file=str(key_file) if key_file else None,
            ready_file=ready_file,
            tls_cert=str(tls_cert) if tls_cert else None,
            tls_key=str(tls_key) if tls_key else None,
            tls_ca=str(tls_ca) if tls_ca else None,
            inflight_limit=parse_size(inflight_limit),
            stream_idle_timeout=stream_idle_timeout,
            cluster_file=str(write_cluster_file) if write_cluster_file else None,
            pull_roots=tuple(str(p) for p in pull_root or ()),
            data_port=None if data_port < 0 else data_port,
        )
    )


# -------------------------------------------------------------------- files
@app.command()
def ls(
    path: Annotated[str, typer.Argument(help="Directory or file (default: the root).")] = "",
    long: Annotated[bool, typer.Option("--long", "-l", help="Sizes and times.")] = False,
    recursive: Annotated[bool, typer.Option("--recursive", "-R", help="Every file below.")] = False,
    cluster_file: ClusterOpt = None,
) -> None:
    """List a directory."""
    import datetime

    for entry in make_client(cluster_file).ls(path, recursive=recursive):
        name = entry["name"] + ("/" if entry["type"] == "directory" else "")
        if long:
            when = (
                datetime.datetime.fromtimestamp(entry["mtime"]).strftime("%Y-%m-%d %H:%M")
                if entry.get("mtime")
                else "-"
            )
            console.print(f"{format_size(entry['size']):>10}  {when:16}  {name}", highlight=False)
        else:
            console.print(name, highlight=False)


@app.command()
def put(
    local: Annotated[list[Path], typer.Argument(help="Local files or directories.")],
    remote: Annotated[str, typer.Argument(help="Destination path (a directory if it ends in /).")],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Copy directories.")] = False,
    cluster_file: ClusterOpt = None,
) -> None:
    """Copy local files into iosvc."""
    client = make_client(cluster_file)
    pairs: list[tuple[Path, str]] = []
    into_dir = remote.endswith("/") or len(local) > 1
    for src in local:
        if src.is_dir():
            if not recursive:
                raise IosvcError(f"{src} is a directory (use -r)")
            base = remote.rstrip("/") + "/" + src.name if into_dir else remote.rstrip("/")
            for file in sorted(p for p in src.rglob("*") if p.is_file()):
                pairs.append((file, f"{base}/{file.relative_to(src).as_posix()}"))
        elif src.is_file():
            pairs.append((src, f"{remote.rstrip('/')}/{src.name}" if into_dir else remote))
        else:
            raise IosvcError(f"no such local file: {src}")
    sizes = {dst: src.stat().st_size for src, dst in pairs}
    total = sum(sizes.values())
    pulled = 0
    with transfer_progress() as progress:
        task = progress.add_task("put", total=total, visible=total >= _PROGRESS_MIN)
        # Servers that mount these files read them themselves (--pull-root): no byte goes
        # through this process. What they cannot pull is pushed below.
        if pairs and client.pull_probe(pairs[0][0]) is None:
            failed = client.pull_files(pairs, on_done=lambda _, n: progress.update(task, advance=n))
            pulled = len(pairs) - len(failed)
            pairs = [(src, dst) for src, dst in pairs if dst in failed]
        batch: dict[str, bytes] = {}
        for src, dst in pairs:
            if sizes[dst] > 1 << 20:
                client.put_file(src, dst, progress=lambda n: progress.update(task, advance=n))
                continue
            batch[dst] = src.read_bytes()  # small files go in batches, not one call each
            if len(batch) >= 256 or sum(map(len, batch.values())) >= 64 << 20:
                client.write_many(batch)
                progress.update(task, advance=sum(len(v) for v in batch.values()))
                batch = {}
        if batch:
            client.write_many(batch)
            progress.update(task, advance=sum(len(v) for v in batch.values()))
    if pulled:
        err_console.print(f"{pulled} files read by the servers from their file system")
    err_console.print(f"put {len(sizes)} files, {format_size(total)}")


@app.command()
def get(
    remote: Annotated[str, typer.Argument(help="iosvc file or directory.")],
    local: Annotated[Path, typer.Argument(help="Local destination.")],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Copy directories.")] = False,
    cluster_file: ClusterOpt = None,
) -> None:
    """Copy files out of iosvc."""
    client = make_client(cluster_file)
    info = client.info(remote)
    if info["type"] == "directory":
        if not recursive:
            raise IosvcError(f"{remote} is a directory (use -r)")
        base = info["name"]
        entries = client.ls(base, recursive=True)
        pairs = [(e, local / e["name"][len(base) :].lstrip("/")) for e in entries]
    else:
        dst = local / Path(info["name"]).name if local.is_dir() else local
        pairs = [(info, dst)]
    total = sum(e["size"] for e, _ in pairs)
    with transfer_progress() as progress:
        task = progress.add_task("get", total=total, visible=total >= _PROGRESS_MIN)
        for entry, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            client.get_file(entry["name"], dst, progress=lambda n: progress.update(task, advance=n))
    err_console.print(f"got {len(pairs)} files, {format_size(total)}")


@app.command()
def cat(
    path: Annotated[str, typer.Argument(help="iosvc file.")],
    cluster_file: ClusterOpt = None,
) -> None:
    """Write a file's bytes to standard output."""
    from fsspec.asyn import get_loop, sync

    client = make_client(cluster_file)
    out = sys.stdout.buffer

    async def stream() -> None:
        async for block in client.aio.iter_chunks(path):
            out.write(block)

    sync(get_loop(), stream)
    out.flush()


@app.command()
def rm(
    paths: Annotated[list[str], typer.Argument(help="Files (or directories with -r).")],
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Remove directories.")
    ] = False,
    cluster_file: ClusterOpt = None,
) -> None:
    """Remove files."""
    client = make_client(cluster_file)
    if not recursive:
        for path in paths:
            if client.info(path)["type"] == "directory":
                raise IosvcError(f"{path} is a directory (use -r)")
    client.rm(paths, recursive=recursive)


@app.command()
def du(
    path: Annotated[str, typer.Argument(help="Directory (default: the root).")] = "",
    summarize: Annotated[bool, typer.Option("--summarize", "-s", help="Total only.")] = False,
    cluster_file: ClusterOpt = None,
) -> None:
    """Bytes used under a path, per top-level entry."""
    client = make_client(cluster_file)
    info: dict[str, Any] = client.info(path) if path else {"type": "directory", "name": ""}
    entries = [info] if info["type"] == "file" else client.ls(path, recursive=True)
    base = info["name"]
    totals: dict[str, int] = {}
    for entry in entries:
        rest = entry["name"][len(base) :].lstrip("/")
        top = f"{base}/{rest.split('/')[0]}".lstrip("/") if rest else entry["name"]
        totals[top] = totals.get(top, 0) + entry["size"]
    if not summarize:
        for name in sorted(totals):
            console.print(f"{format_size(totals[name]):>10}  {name}", highlight=False)
    console.print(
        f"{format_size(sum(totals.values())):>10}  total ({base or '/'})", highlight=False
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    """Console entry point: run the app, print errors as one line."""
    try:
        app()
    except (IosvcError, OSError, ValueError) as exc:
        err_console.print(f"[red]iosvc: error:[/red] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)

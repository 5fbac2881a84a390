"""Admin commands: ``iosvc policy set|show|list``, ``iosvc quota set|show`` and ``iosvc top``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table
from rich.tree import Tree

from iosvc.cli._common import ClusterOpt, console, make_client
from iosvc.identity import JobIdentity
from iosvc.policies import (
    available_policies,
    expected_shares,
    format_rate,
    format_size,
    get_policy_class,
    load_policy,
)

policy_app = typer.Typer(
    help="Show or change the sharing policy of every server (admin).", no_args_is_help=True
)


quota_app = typer.Typer(
    help="Per-user storage quotas, cluster-wide (set: admin).", no_args_is_help=True
)


@quota_app.command("set")
def quota_set(
    user: Annotated[str, typer.Argument(help="User name.")],
    size: Annotated[str, typer.Argument(help="Quota, e.g. 500GiB, or 'none' to remove it.")],
    cluster_file: ClusterOpt = None,
) -> None:
    """Set USER's quota on every server (bytes of files the user owns, summed over servers)."""
    from iosvc.policies import parse_size

    nbytes = None if size.lower() == "none" else parse_size(size)
    client = make_client(cluster_file)
    client.call_all({"op": "quota_set", "user": user, "bytes": nbytes})
    shown = "removed" if nbytes is None else format_size(nbytes)
    console.print(f"quota of {user}: {shown} (on {len(client.spec.servers)} servers)")


@quota_app.command("show")
def quota_show(
    user: Annotated[str | None, typer.Argument(help="Only this user.")] = None,
    cluster_file: ClusterOpt = None,
) -> None:
    """Quotas and usage per user (usage summed over the servers files are homed on)."""
    client = make_client(cluster_file)
    replies = client.call_all({"op": "quota_show"})
    quotas: dict[str, int] = replies[0]["quotas"]
    usage: dict[str, int] = {}
    for reply in replies:
        for name, nbytes in reply["usage"].items():
            usage[name] = usage.get(name, 0) + nbytes
    table = Table("user", "used", "quota", "use %")
    for name in sorted(set(quotas) | set(usage)):
        if user is not None and name != user:
            continue
        quota = quotas.get(name)
        used = usage.get(name, 0)
        pct = f"{100 * used / quota:.1f}" if quota else "-"
        table.add_row(
            name, format_size(used), format_size(quota) if quota is not None else "-", pct
        )
    console.print(table)


@policy_app.command("list")
def policy_list() -> None:
    """List the policy presets."""
    for name in available_policies():
        doc = (get_policy_class(name).__doc__ or "").strip().splitlines()[0]
        console.print(f"[bold]{name:22}[/bold] {doc}", highlight=False)


@policy_app.command("set")
def policy_set(
    policy: Annotated[
        str, typer.Argument(help="A preset name (see `policy list`) or a TOML file.")
    ],
    cluster_file: ClusterOpt = None,
) -> None:
    """Apply a policy on every server, live: queued requests are kept and reordered."""
    spec = load_policy(Path(policy) if Path(policy).is_file() else policy)
    client = make_client(cluster_file)
    replies = client.call_all({"op": "policy_set", "policy": spec.to_dict()})
    console.print(f"policy set on {len(replies)} servers: {replies[0]['description']}")


@policy_app.command("show")
def policy_show(cluster_file: ClusterOpt = None) -> None:
    """Show the policy and each server's live share tree (active nodes and their shares)."""
    client = make_client(cluster_file)
    snapshots = client.call_all({"op": "policy_show"})
    console.print(f"[bold]policy:[/bold] {snapshots[0]['description']}", highlight=False)
    for index, snap in enumerate(snapshots):
        tree = Tree(
            f"server {index} ({client.spec.servers[index]}): queued {snap['queued_items']} "
            f"requests / {format_size(snap['queued_bytes'])}, "
            f"served {format_size(snap['served_bytes'])}"
        )
        _add_children(tree, snap["root"])
        console.print(tree)


def _add_children(tree: Tree, node: dict[str, Any]) -> None:
    for child in node["children"]:
        share = child.get("share")
        share_text = "-" if share is None else f"{share:.0%}"
        rate = child.get("rate")
        rate_text = f" cap {rate if isinstance(rate, str) else format_rate(rate)}" if rate else ""
        label = (
            f"{child['level']}:{child['key']} weight {child['weight']:g} "
            f"{'active' if child['active'] else 'idle'} share {share_text}{rate_text} "
            f"queued {child['queued_items']} served {format_size(child['served_bytes'])}"
        )
        _add_children(tree.add(label), child)


def top(
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    by: Annotated[str, typer.Option(help="Group rows by job, user or group.")] = "job",
    iterations: Annotated[int, typer.Option(help="Stop after N refreshes (0: until Ctrl-C).")] = 0,
    cluster_file: ClusterOpt = None,
) -> None:
    """Live per-job (or user/group) throughput, queue and share vs target, like `top`."""
    if by not in ("job", "user", "group"):
        raise typer.BadParameter("--by must be job, user or group")
    client = make_client(cluster_file)
    policy = load_policy(client.call_all({"op": "policy_show"})[0]["policy"])
    previous = _totals(client.call_all({"op": "stats"}))
    count = 0
    with Live(console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            stats = client.call_all({"op": "stats"})
            current = _totals(stats)
            live.update(_render(policy, previous, current, stats, by), refresh=True)
            previous = current
            count += 1
            if iterations and count >= iterations:
                return


def _totals(stats: list[dict[str, Any]]) -> dict[str, Any]:
    jobs: dict[JobIdentity, list[float]] = {}
    for server in stats:
        for job_id, user, group, nodes, nbytes, ops, wait in server["jobs"]:
            acc = jobs.setdefault(JobIdentity(job_id, user, group, nodes), [0, 0, 0.0])
            acc[0] += nbytes
            acc[1] += ops
            acc[2] += wait
    return {"time": time.monotonic(), "jobs": jobs}


def _render(
    policy: Any,
    before: dict[str, Any],
    after: dict[str, Any],
    stats: list[dict[str, Any]],
    by: str,
) -> Table:
    elapsed = max(after["time"] - before["time"], 1e-9)
    rates: dict[JobIdentity, tuple[float, float, float]] = {}
    for ident, (nbytes, ops, wait) in after["jobs"].items():
        old = before["jobs"].get(ident, [0, 0, 0.0])
        d_ops = ops - old[1]
        mean_wait = (wait - old[2]) / d_ops if d_ops else 0.0
        rates[ident] = ((nbytes - old[0]) / elapsed, d_ops / elapsed, mean_wait)
    active = [i for i, r in rates.items() if r[1] > 0]
    targets = expected_shares(policy, active) or {}
    total = sum(r[0] for r in rates.values()) or 1.0
    rows: dict[str, list[float]] = {}
    for ident, (bps, ops, wait) in rates.items():
        key = {"job": ident.job_id, "user": ident.user, "group": ident.group}[by]
        row = rows.setdefault(key, [0.0, 0.0, 0.0, 0.0, 0.0])
        row[0] += bps
        row[1] += ops
        row[2] = max(row[2], wait)
        row[3] += bps / total
        row[4] += targets.get(ident, 0.0)
    queued = sum(s["queued"] for s in stats)
    table = Table(
        title=f"iosvc top: {policy.describe()} | {format_rate(total if total > 1 else 0)} "
        f"| queued {queued}",
        title_justify="left",
    )
    for col in (by, "throughput", "ops/s", "mean wait", "share", "target"):
        table.add_column(col, justify="right" if col != by else "left", no_wrap=True)
    for key, (bps, ops, wait, share, target) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        table.add_row(
            key,
            format_rate(bps),
            f"{ops:,.0f}",
            f"{wait * 1e3:.1f} ms",
            f"{share:.0%}",
            f"{target:.0%}" if targets else "-",
        )
    return table


token_app = typer.Typer(help="Job tokens for secure clusters (run by root/Slurm).")

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl(text: str) -> float:
    unit = text[-1:].lower()
    try:
        return float(text[:-1]) * _TTL_UNITS[unit] if unit in _TTL_UNITS else float(text)
    except ValueError:
        message = f"lifetime must look like 3600, 30m, 24h or 7d: {text!r}"
        raise typer.BadParameter(message) from None


@token_app.command("issue")
def token_issue(
    job: Annotated[str, typer.Option(help="Job id (SLURM_JOB_ID).")],
    user: Annotated[str, typer.Option(help="Job owner.")],
    group: Annotated[str, typer.Option(help="Owner's group.")],
    nodes: Annotated[int, typer.Option(help="Job size in nodes.")] = 1,
    ttl: Annotated[str, typer.Option(help="Lifetime: seconds or 30m, 24h, 7d.")] = "24h",
    admin: Annotated[bool, typer.Option(help="Allow admin operations (policies).")] = False,
    key_file: Annotated[
        Path | None,
        typer.Option(help="Cluster key (default: the local cluster's, from its cluster file)."),
    ] = None,
    cluster_file: ClusterOpt = None,
) -> None:
    """Mint a signed job token and print it (clients read it from IOSVC_TOKEN)."""
    from iosvc.config import ClusterSpec
    from iosvc.identity import issue_token, load_key_file

    if key_file is None:
        spec = ClusterSpec.load(cluster_file)
        found = spec.extra.get("key_file")
        if not found:
            raise typer.BadParameter("this cluster is not secure; give --key-file")
        key_file = Path(found)
    token = issue_token(
        load_key_file(key_file), JobIdentity(job, user, group, nodes), _ttl(ttl), admin=admin
    )
    print(token)

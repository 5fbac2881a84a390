"""``iosvc datasets`` and ``iosvc stage``: the catalog of datasets and staging between sites."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from iosvc.cli._common import console, transfer_progress
from iosvc.policies import format_size

__all__ = ["datasets_app", "stage_app"]

SitesOpt = Annotated[
    Path | None,
    typer.Option("--sites", help="sites.toml (default: $IOSVC_SITES or ~/.iosvc/sites.toml)."),
]
CatalogOpt = Annotated[
    Path | None,
    typer.Option(
        "--catalog", help="Catalog file (default: $IOSVC_CATALOG or ~/.iosvc/catalog.db)."
    ),
]
ClusterOpt = Annotated[
    Path | None,
    typer.Option(
        "--cluster-file", "-c", help="Cluster file for iosvc:// URLs (default: $IOSVC_CLUSTER)."
    ),
]


class _DefaultToRun(TyperGroup):
    """``iosvc stage DATASET ...`` runs the ``run`` command; ``status``/``cancel`` are kept."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


datasets_app = typer.Typer(
    help="The dataset catalog: register datasets at a site, list them, see their replicas.",
    no_args_is_help=True,
)
stage_app = typer.Typer(
    cls=_DefaultToRun,
    help=(
        "Stage a dataset to a site: `iosvc stage DATASET --to SITE [--into-buffer]`; "
        "`iosvc stage status [TASK]`, `iosvc stage cancel TASK`."
    ),
    no_args_is_help=True,
)


@contextlib.contextmanager
def _stager(
    sites: Path | None, catalog: Path | None, cluster: Path | None, verify: str = "full"
) -> Iterator[Any]:
    from iosvc.staging import Catalog, Stager, load_sites

    if cluster is not None:
        os.environ["IOSVC_CLUSTER"] = str(cluster)  # what iosvc:// URLs (fsspec) read
    with Catalog(catalog) as cat:
        yield Stager(cat, load_sites(sites), verify=verify)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@datasets_app.command("register")
def register(
    path: Annotated[str, typer.Argument(help="Dataset directory, relative to the site's root.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Dataset name.")],
    site: Annotated[str, typer.Option("--site", "-s", help="Site where it lives.")],
    sites: SitesOpt = None,
    catalog: CatalogOpt = None,
    cluster_file: ClusterOpt = None,
) -> None:
    """Checksum every file under PATH at SITE and record it as dataset NAME.

    A manifest that differs from the latest version's is recorded as a new version.
    """
    with _stager(sites, catalog, cluster_file) as stager, transfer_progress() as bar:
        task = bar.add_task(f"checksum {name}", total=None)
        record = stager.register(
            path,
            name=name,
            site=site,
            on_progress=lambda _phase, done, _total: bar.update(task, completed=done),
        )
    console.print(
        f"registered {record.name} v{record.version}: {len(record.files)} files, "
        f"{format_size(record.total_bytes)} at {site}:{path.strip('/')}"
    )


@datasets_app.command("ls")
def ls(catalog: CatalogOpt = None) -> None:
    """List datasets with their latest version and where verified replicas are."""
    from iosvc.staging import Catalog

    with Catalog(catalog) as cat:
        table = Table("dataset", "version", "files", "size", "verified at", "other replicas")
        for name, version, files, nbytes in cat.datasets():
            replicas = cat.replicas(name, version)
            good = ", ".join(r.site for r in replicas if r.state == "verified") or "-"
            other = ", ".join(f"{r.site} ({r.state})" for r in replicas if r.state != "verified")
            table.add_row(name, str(version), str(files), format_size(nbytes), good, other or "-")
    console.print(table)


@datasets_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    version: Annotated[int | None, typer.Option(help="Version (default: latest).")] = None,
    files: Annotated[bool, typer.Option("--files", help="Also list its files.")] = False,
    catalog: CatalogOpt = None,
) -> None:
    """Where a dataset lives, its size, its replicas' states and its recent transfers."""
    from iosvc.staging import Catalog

    with Catalog(catalog) as cat:
        record = cat.dataset(name, version)
        console.print(
            f"[bold]{record.name}[/] v{record.version}: {len(record.files)} files, "
            f"{format_size(record.total_bytes)}, registered {_when(record.created)}"
        )
        table = Table("site", "path", "state", "updated", "note")
        for r in cat.replicas(record.name, record.version):
            table.add_row(r.site, r.path or "/", r.state, _when(r.updated), r.error or "")
        console.print(table)
        tasks = [t for t in cat.tasks(record.name) if t.version == record.version][:10]
        if tasks:
            console.print(_task_table(tasks))
        if files:
            listing = Table("path", "size", "checksum")
            for entry in record.files:
                listing.add_row(entry.path, format_size(entry.size), entry.checksum)
            console.print(listing)


@datasets_app.command("verify")
def verify_cmd(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    site: Annotated[str, typer.Option("--site", "-s", help="Replica site to re-check.")],
    sites: SitesOpt = None,
    catalog: CatalogOpt = None,
    cluster_file: ClusterOpt = None,
) -> None:
    """Read a replica back and compare it with the manifest (marks it verified or stale)."""
    with _stager(sites, catalog, cluster_file) as stager:
        summary = stager.check(name, site)
        replica = next(r for r in stager.catalog.replicas(name) if r.site == site)
    console.print(f"{name} at {site}: {replica.state}: {summary}")
    if replica.state != "verified":
        raise typer.Exit(1)


def _task_table(tasks: list[Any]) -> Table:
    table = Table("task", "dataset", "from", "to", "backend", "state", "done", "started", "error")
    for t in tasks:
        done = f"{format_size(t.bytes_done)} / {format_size(t.bytes_total)}"
        table.add_row(
            str(t.id),
            f"{t.name} v{t.version}",
            t.source,
            t.destination,
            t.backend,
            t.state,
            done,
            _when(t.started),
            (t.error or "")[:80],
        )
    return table


@stage_app.command("run", hidden=True)
def run(
    dataset: Annotated[str, typer.Argument(help="Dataset name.")],
    to: Annotated[str, typer.Option("--to", "-t", help="Destination site.")],
    source: Annotated[
        str | None, typer.Option("--from", "-f", help="Source site (default: any verified).")
    ] = None,
    path: Annotated[
        str | None,
        typer.Option(help="Path at the destination, relative to its root (default: the same)."),
    ] = None,
    into_buffer: Annotated[
        bool,
        typer.Option(
            "--into-buffer",
            help="Then stage it into the destination's burst buffer (its `buffer` URL, "
            "default iosvc:///datasets/DATASET).",
        ),
    ] = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="Wait for a Globus transfer and verify the replica; with --no-wait it is "
            "submitted and `iosvc stage status TASK` verifies it when done (fsspec transfers "
            "always run here).",
        ),
    ] = True,
    version: Annotated[int | None, typer.Option(help="Dataset version (default: latest).")] = None,
    verify: Annotated[
        str,
        typer.Option(
            help="full: read every file back after the copy; transfer: trust the copy's own "
            "checks (each byte hashed against the manifest as copied).",
        ),
    ] = "full",
    sites: SitesOpt = None,
    catalog: CatalogOpt = None,
    cluster_file: ClusterOpt = None,
) -> None:
    """Copy DATASET to site TO (Globus between Globus sites, else fsspec) and verify it."""
    started = time.monotonic()
    with _stager(sites, catalog, cluster_file, verify) as stager, transfer_progress() as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{phase} {dataset}", total=total or None)
            bar.update(tasks[phase], completed=done)

        results = stager.stage(
            dataset,
            to=to,
            source=source,
            path=path,
            into_buffer=into_buffer,
            version=version,
            on_progress=progress,
            wait=wait,
        )
    for r in results:
        console.print(
            f"{r.dataset} v{r.version} -> {r.site}:{r.path or '/'} [green]{r.state}[/] "
            f"(task {r.task}: {r.files_copied} files / {format_size(r.bytes_copied)} copied, "
            f"{r.files_skipped} already there; {r.detail}; {r.seconds:.1f} s)"
        )
    del started


@stage_app.command("status")
def status(
    task: Annotated[int | None, typer.Argument(help="Task number (default: recent tasks).")] = None,
    sites: SitesOpt = None,
    catalog: CatalogOpt = None,
) -> None:
    """Show a transfer task (asking Globus for live progress) or the recent ones."""
    from iosvc.staging import Catalog

    if task is None:
        with Catalog(catalog) as cat:
            console.print(_task_table(cat.tasks(limit=20)))
        return
    with _stager(sites, catalog, None) as stager:
        record = stager.refresh(task)
    console.print(_task_table([record]))


@stage_app.command("cancel")
def cancel(
    task: Annotated[int, typer.Argument(help="Task number (see `iosvc stage status`).")],
    sites: SitesOpt = None,
    catalog: CatalogOpt = None,
) -> None:
    """Cancel a transfer task; its destination replica is marked failed."""
    with _stager(sites, catalog, None) as stager:
        record = stager.cancel(task)
    console.print(f"task {record.id}: {record.state}")

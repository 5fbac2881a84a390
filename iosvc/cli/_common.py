"""Pieces shared by the CLI modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["ClusterOpt", "console", "err_console", "make_client", "transfer_progress"]

console = Console()
err_console = Console(stderr=True)

ClusterOpt = Annotated[
    Path | None,
    typer.Option(
        "--cluster-file",
        "-c",
        help="Cluster file (default: $IOSVC_CLUSTER or the one `iosvc up` writes).",
        show_default=False,
    ),
]


def make_client(cluster_file: Path | None) -> Any:
    """A sync client of the selected cluster (imported lazily: `--help` stays fast)."""
    from iosvc.client import Client

    return Client(cluster_file)


def transfer_progress() -> Progress:
    """The byte progress bar of long transfers (on stderr; gone when done)."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )

"""``iosvc login`` and ``iosvc logout``: the Globus login that ``iosvc stage`` uses.

globus-sdk is imported only inside the commands, so ``iosvc --help`` stays fast and works
without the ``globus`` extra.
"""

from __future__ import annotations

from typing import Annotated

import typer

from iosvc.cli._common import console, err_console

__all__ = ["login", "logout"]


def login(
    collection: Annotated[
        list[str] | None,
        typer.Option(
            "--collection",
            metavar="UUID",
            help="A Globus collection iosvc will transfer with; data_access consent is asked "
            "for if it is a GCSv5 mapped collection. Repeat for several.",
            show_default=False,
        ),
    ] = None,
    no_local_server: Annotated[
        bool,
        typer.Option(
            "--no-local-server",
            help="Print a URL and paste back the code it shows, instead of opening a browser "
            "(automatic over SSH).",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Log in again even if the stored login is valid."),
    ] = False,
) -> None:
    """Log in to Globus so `iosvc stage` can transfer between Globus sites.

    Refresh tokens are kept under ~/.iosvc/globus/ (or $IOSVC_GLOBUS_DIR). For automation,
    set IOSVC_GLOBUS_CLIENT_ID and IOSVC_GLOBUS_CLIENT_SECRET instead (a service account):
    then no login is needed.
    """
    from iosvc.staging._globus import login as globus_login

    result = globus_login(collection or [], local_server=not no_local_server, force=force)
    console.print(f"logged in to Globus; tokens in {result.token_file}")
    for cid in result.consented:
        console.print(f"  {cid}: data_access consent granted")
    for cid, why in result.others.items():
        console.print(f"  {cid}: {why}")


def logout() -> None:
    """Revoke and delete the Globus tokens of `iosvc login`."""
    from iosvc.staging._globus import logout as globus_logout

    for warning in globus_logout():
        err_console.print(f"[yellow]iosvc: warning:[/yellow] {warning}", highlight=False)
    console.print("logged out of Globus")

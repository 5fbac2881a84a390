"""The Globus transfer backend (globus-sdk v4) and the Globus login of ``iosvc login``.

Transfers use ``sync_level="checksum"`` and ``verify_checksum=True`` (the only safe setting
when a failed transfer is restarted, per globus-cli's help), with the submission id the caller
recorded before submitting: Globus answers a resubmission with the same id with the task it
already made (code ``Duplicate``), so a crash between submit and record never starts a second
task.

A task whose source path is missing or forbidden does not fail: it stays ACTIVE with
``faults > 0``, retrying until its deadline (globus/globus-cli#1056, argonne-lcf/balsam#114).
``wait`` therefore reads the task's error events and gives up early, with those events, once a
fatal-looking error has persisted for ``stuck_after`` seconds, cancelling the task so that it
does not block a corrected resubmission.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import globus_sdk
from globus_sdk.token_storage import JSONTokenStorage  # a submodule: not loaded by the package

from iosvc.errors import IosvcError, NotFound, PermissionDenied, Unauthenticated
from iosvc.staging._backend import TaskStatus, TransferRequest

__all__ = [
    "DEFAULT_NATIVE_CLIENT_ID",
    "GlobusBackend",
    "GlobusConsentRequired",
    "GlobusTransferError",
    "globus_dir",
    "make_app",
    "make_transfer_client",
    "make_user_app",
    "remember_collections",
]

#: Native-app client id of iosvc's Globus registration. Sites that register their own native
#: app (recommended: it names the site on the consent page) set $IOSVC_GLOBUS_NATIVE_CLIENT_ID.
DEFAULT_NATIVE_CLIENT_ID = "5a9f8c6e-0b1d-4d1e-9b5a-3f6f6c1e2d7a"
#: Error event codes that will not go away by retrying.
FATAL_EVENT_CODES = frozenset(
    {"PATH_NOT_FOUND", "PERMISSION_DENIED", "ENDPOINT_ERROR", "QUOTA_EXCEEDED", "FILE_SIZE_CHANGED"}
)


class GlobusConsentRequired(PermissionDenied):
    """Globus needs more consent (e.g. a collection's data_access scope) before it can act."""


class GlobusTransferError(IosvcError, RuntimeError):
    """Globus refused a request or a transfer failed; the message says what to do next."""

    grpc_code = "ABORTED"


def globus_dir() -> Path:
    """Where iosvc keeps Globus tokens and the collections logged in with."""
    env = os.environ.get("IOSVC_GLOBUS_DIR")
    return Path(env) if env else Path.home() / ".iosvc" / "globus"


def _translate(err: globus_sdk.GlobusAPIError, what: str, collections: Sequence[str]) -> Exception:
    """A Globus API error as an iosvc error whose message names the next step."""
    code = str(getattr(err, "code", "") or "")
    message = str(getattr(err, "message", "") or err)
    info = getattr(err, "info", None)
    consent = getattr(info, "consent_required", None) if info is not None else None
    if consent or code == "ConsentRequired":
        scopes = list(getattr(consent, "required_scopes", None) or [])
        flags = " ".join(f"--collection {c}" for c in collections)
        return GlobusConsentRequired(
            f"{what}: Globus needs your consent first; run: iosvc login {flags}".rstrip()
            + (f" (required scopes: {', '.join(scopes)})" if scopes else "")
        )
    where = ", ".join(collections)
    if err.http_status == 401 or code.startswith("AuthenticationFailed"):
        return Unauthenticated(f"{what}: Globus login missing or expired; run: iosvc login")
    if code in ("EndpointNotFound", "ClientError.NotFound") or err.http_status == 404:
        return NotFound(
            f"{what}: Globus collection or path not found ({message}); check "
            f"globus_collection and globus_path of the sites in sites.toml ({where})"
        )
    if "PermissionDenied" in code or err.http_status == 403:
        return PermissionDenied(
            f"{what}: permission denied on collection {where} ({message}); ask the "
            "collection's admin for access, or check the identity you logged in with "
            "(iosvc login --force)"
        )
    return GlobusTransferError(f"{what}: Globus error {code or err.http_status}: {message}")


class GlobusBackend:
    """Transfers between two Globus collections with a ``TransferClient``.

    Parameters
    ----------
    client
        An authenticated ``globus_sdk.TransferClient`` (see :func:`make_transfer_client`).
    poll_interval
        Seconds between task polls in :meth:`wait`.
    stuck_after
        Seconds a fatal-looking fault may persist on an ACTIVE task before :meth:`wait` gives up.
    sleep, clock
        Injected in tests.
    """

    name: ClassVar[str] = "globus"

    def __init__(
        self,
        client: globus_sdk.TransferClient,
        *,
        poll_interval: float = 10.0,
        stuck_after: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.poll_interval = poll_interval
        self.stuck_after = stuck_after
        self._sleep = sleep
        self._clock = clock
        self._fault_since: dict[str, float] = {}
        self._collections: dict[str, list[str]] = {}

    def new_submission_id(self, request: TransferRequest) -> str:
        try:
            return str(self.client.get_submission_id()["value"])
        except globus_sdk.GlobusAPIError as err:
            raise _translate(err, "getting a submission id", _collections(request)) from None

    def submit(self, request: TransferRequest, submission_id: str) -> str:
        src, dst = request.source, request.destination
        if not (src.globus_collection and dst.globus_collection):
            raise GlobusTransferError(
                f"{src.site} -> {dst.site}: both sites need a globus_collection for Globus"
            )
        data = globus_sdk.TransferData(
            src.globus_collection,
            dst.globus_collection,
            label=request.label[:128] or globus_sdk.MISSING,
            submission_id=submission_id,
            sync_level="checksum",
            verify_checksum=True,
            preserve_timestamp=True,
            notify_on_succeeded=False,
        )
        # One recursive item for the replica's root: Globus walks the tree itself, and
        # per-file items hit per-task limits on datasets of many files (DKISTDC/dkist#105).
        data.add_item(
            _as_dir(src.globus_path or "/"), _as_dir(dst.globus_path or "/"), recursive=True
        )
        try:
            response = self.client.submit_transfer(data)
        except globus_sdk.GlobusAPIError as err:
            raise _translate(err, f"submitting {request.label}", _collections(request)) from None
        task_id = str(response["task_id"])
        self._collections[task_id] = _collections(request)
        return task_id

    def status(self, task_id: str) -> TaskStatus:
        collections = self._collections.get(task_id, [])
        try:
            doc = self.client.get_task(task_id)
        except globus_sdk.GlobusAPIError as err:
            raise _translate(err, f"reading task {task_id}", collections) from None
        fatal = doc.get("fatal_error") or {}
        state = {"SUCCEEDED": "succeeded", "FAILED": "failed"}.get(doc["status"], "active")
        if state == "failed" and fatal.get("code") == "CANCELED":
            state = "canceled"
        status = TaskStatus(
            task_id,
            state,  # type: ignore[arg-type]
            bytes_total=int(doc.get("bytes_transferred") or 0) if state == "succeeded" else 0,
            bytes_done=int(doc.get("bytes_transferred") or 0),
            files_total=int(doc.get("files") or 0),
            files_done=int(doc.get("files_transferred") or 0) + int(doc.get("files_skipped") or 0),
            files_skipped=int(doc.get("files_skipped") or 0),
        )
        if state == "failed":
            status.events = self._error_events(task_id)
            status.error = fatal.get("description") or doc.get("nice_status") or "failed"
        elif state == "active" and (int(doc.get("faults") or 0) > 0 or doc["status"] == "INACTIVE"):
            events = self._error_events(task_id)
            status.events = events
            if any(e.split(":", 1)[0] in FATAL_EVENT_CODES for e in events) or (
                doc["status"] == "INACTIVE"
            ):
                since = self._fault_since.setdefault(task_id, self._clock())
                if self._clock() - since >= self.stuck_after:
                    status.error = (
                        f"stuck for {self.stuck_after:.0f} s: {doc.get('nice_status') or ''} "
                        + "; ".join(events[:3])
                    ).strip()
        return status

    def _error_events(self, task_id: str) -> list[str]:
        try:
            events = self.client.task_event_list(task_id, limit=10)
        except globus_sdk.GlobusAPIError:
            return []
        out = []
        for event in events:
            if event.get("is_error"):
                detail = event.get("details") or ""
                out.append(f"{event.get('code')}: {event.get('description')} {detail}".strip())
        return out

    def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[TaskStatus], None] | None = None,
    ) -> TaskStatus:
        start = self._clock()
        while True:
            status = self.status(task_id)
            if status.error and not status.finished:
                # A task stuck on a fatal fault: cancel it (it would block a fixed resubmit of
                # the same files, globus-cli#1056) and report what Globus said.
                self.cancel(task_id)
                status.state = "failed"
            if on_progress is not None:
                on_progress(status)
            if status.finished:
                return status
            if timeout is not None and self._clock() - start >= timeout:
                return status
            self._sleep(self.poll_interval)

    def cancel(self, task_id: str) -> TaskStatus:
        try:
            self.client.cancel_task(task_id)
        except globus_sdk.GlobusAPIError as err:
            if getattr(err, "code", "") != "TaskComplete":
                raise _translate(err, f"cancelling task {task_id}", []) from None
        status = self.status(task_id)
        if not status.finished:
            status.state = "canceled"
        return status


def _as_dir(path: str) -> str:
    return path.rstrip("/") + "/"


def _collections(request: TransferRequest) -> list[str]:
    ends = (request.source.globus_collection, request.destination.globus_collection)
    return [c for c in ends if c]


def _scoped_collections() -> list[str]:
    try:
        data = json.loads((globus_dir() / "collections.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [str(c) for c in data] if isinstance(data, list) else []


def remember_collections(collections: Iterable[str]) -> None:
    """Record collections whose data_access consent ``iosvc login`` asked for."""
    known = sorted({*_scoped_collections(), *collections})
    directory = globus_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / "collections.json").write_text(json.dumps(known))


def make_user_app(*, environ: Mapping[str, str] = os.environ) -> globus_sdk.UserApp:
    """The native (user) Globus app with refresh tokens kept under :func:`globus_dir`."""
    directory = globus_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    storage = JSONTokenStorage(directory / "tokens.json")
    config = globus_sdk.GlobusAppConfig(request_refresh_tokens=True, token_storage=storage)
    client_id = environ.get("IOSVC_GLOBUS_NATIVE_CLIENT_ID", DEFAULT_NATIVE_CLIENT_ID)
    return globus_sdk.UserApp("iosvc", client_id=client_id, config=config)


def make_app(*, environ: Mapping[str, str] = os.environ) -> globus_sdk.GlobusApp:
    """The Globus app ``iosvc stage`` acts as.

    With ``$IOSVC_GLOBUS_CLIENT_ID`` and ``$IOSVC_GLOBUS_CLIENT_SECRET`` set (automation, a
    service account), a confidential ``ClientApp``; otherwise the user app of ``iosvc login``.
    """
    cid, secret = environ.get("IOSVC_GLOBUS_CLIENT_ID"), environ.get("IOSVC_GLOBUS_CLIENT_SECRET")
    if bool(cid) != bool(secret):
        raise Unauthenticated(
            "set both IOSVC_GLOBUS_CLIENT_ID and IOSVC_GLOBUS_CLIENT_SECRET (or neither)"
        )
    if cid and secret:
        config = globus_sdk.GlobusAppConfig(token_storage="memory")
        return globus_sdk.ClientApp("iosvc", client_id=cid, client_secret=secret, config=config)
    return make_user_app(environ=environ)


def make_transfer_client(
    collections: Sequence[str] = (), *, environ: Mapping[str, str] = os.environ
) -> globus_sdk.TransferClient:
    """A ``TransferClient`` over :func:`make_app` for ``iosvc stage``; never prompts.

    Raises
    ------
    Unauthenticated
        If the user app has no login (the message says to run ``iosvc login``).
    """
    app = make_app(environ=environ)
    client = globus_sdk.TransferClient(app=app)
    scoped = [c for c in collections if c in set(_scoped_collections())]
    if scoped:
        client.add_app_data_access_scope(scoped)
    if isinstance(app, globus_sdk.UserApp) and app.login_required():
        raise Unauthenticated(
            "no Globus login for iosvc; run: iosvc login"
            + "".join(f" --collection {c}" for c in collections)
        )
    return client
